"""Minimal PLY reader/writer for point clouds (vertex element only).

``write_ply(path, fields)`` writes binary little-endian PLY from a dict {name: 1-D array} (all of one
length); ``read_ply(path)`` returns a numpy structured array with the vertex properties. Reading
accepts binary little/big endian and ASCII files; faces and other elements after the vertices are
ignored. ``read_ply_triangles(path)`` also returns the triangle faces.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_PLY_TO_NUMPY = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_NUMPY_TO_PLY = {
    "i1": "char",
    "u1": "uchar",
    "i2": "short",
    "u2": "ushort",
    "i4": "int",
    "u4": "uint",
    "f4": "float",
    "f8": "double",
}


class PlyError(ValueError):
    """The file is not a PLY file this reader understands."""


def write_ply(path: str | Path, fields: dict[str, np.ndarray]) -> None:
    """Writes vertices with the given named 1-D fields; the file appears atomically."""
    if not fields:
        raise ValueError("fields must name at least one property")
    arrays = {name: np.asarray(values) for name, values in fields.items()}
    lengths = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(lengths) != 1 or any(a.ndim != 1 for a in arrays.values()):
        raise ValueError("every field must be a 1-D array of the same length")
    dtype = []
    for name, a in arrays.items():
        code = a.dtype.str[1:]
        if a.dtype == np.int64:
            code = "i4"
        elif a.dtype == np.uint64:
            code = "u4"
        elif a.dtype == np.bool_:
            code = "u1"
        if code not in _NUMPY_TO_PLY:
            raise ValueError(f"field {name!r} has unsupported dtype {a.dtype}")
        dtype.append((name, "<" + code))
    n = lengths.pop()
    data = np.empty(n, dtype=dtype)
    for name, a in arrays.items():
        data[name] = a
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {_NUMPY_TO_PLY[code[1:]]} {name}" for name, code in dtype]
    header.append("end_header")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())
    os.replace(tmp, path)


def _read_header(f, path: Path):
    """Parses the header: (format, [[element name, count, [(property, numpy type or None for lists)]]])."""
    if f.readline().strip() != b"ply":
        raise PlyError(f"{path}: not a PLY file (first line is not 'ply')")
    fmt, elements, current = None, [], None
    while True:
        line = f.readline()
        if not line:
            raise PlyError(f"{path}: header has no end_header")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            current = [words[1], int(words[2]), []]
            elements.append(current)
        elif words[0] == "property":
            if current is None:
                raise PlyError(f"{path}: property before any element")
            if words[1] == "list":
                current[2].append((words[4], None, words[2:4]))
            else:
                if words[1] not in _PLY_TO_NUMPY:
                    raise PlyError(f"{path}: unknown property type {words[1]!r}")
                current[2].append((words[2], _PLY_TO_NUMPY[words[1]]))
        elif words[0] == "end_header":
            return fmt, elements


def _read_vertices(f, path: Path, fmt, elements) -> np.ndarray:
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None:
        raise PlyError(f"{path}: no vertex element")
    if elements[0] is not vertex and any(e[1] for e in elements[: elements.index(vertex)]):
        raise PlyError(f"{path}: elements before the vertices are not supported")
    if any(p[1] is None for p in vertex[2]):
        raise PlyError(f"{path}: list properties on vertices are not supported")
    if fmt == "ascii":
        dtype = [(name, t) for name, t in vertex[2]]
        rows = [f.readline().split() for _ in range(vertex[1])]
        out = np.empty(vertex[1], dtype=dtype)
        for i, (name, _) in enumerate(dtype):
            out[name] = [r[i] for r in rows]
        return out
    order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(fmt)
    if order is None:
        raise PlyError(f"{path}: unsupported format {fmt!r}")
    dtype = np.dtype([(name, order + t) for name, t in vertex[2]])
    raw = f.read(dtype.itemsize * vertex[1])
    if len(raw) < dtype.itemsize * vertex[1]:
        raise PlyError(f"{path}: file is truncated ({vertex[1]} vertices announced)")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))


def read_ply(path: str | Path) -> np.ndarray:
    """Reads the vertex element: numpy structured array, one field per property."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file not found: {path}")
    with open(path, "rb") as f:
        fmt, elements = _read_header(f, path)
        return _read_vertices(f, path, fmt, elements)


def read_ply_triangles(path: str | Path):
    """Reads a triangle mesh: (vertices as ``read_ply`` returns them, faces int64 [F, 3]).

    The face element must follow the vertices and hold one list property of 3 indices per face
    (binary files; ASCII too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file not found: {path}")
    with open(path, "rb") as f:
        fmt, elements = _read_header(f, path)
        vertices = _read_vertices(f, path, fmt, elements)
        names = [e[0] for e in elements]
        if "face" not in names:
            return vertices, np.zeros((0, 3), np.int64)
        face = elements[names.index("face")]
        if names.index("face") != names.index("vertex") + 1 or len(face[2]) != 1 or face[2][0][1] is not None:
            raise PlyError(f"{path}: faces must directly follow the vertices with a single list property")
        count_type, index_type = (_PLY_TO_NUMPY.get(t) for t in face[2][0][2])
        if count_type is None or index_type is None:
            raise PlyError(f"{path}: unknown face list types {face[2][0][2]}")
        if fmt == "ascii":
            rows = np.array([f.readline().split() for _ in range(face[1])], dtype=np.int64).reshape(
                face[1], -1
            )
        else:
            order = "<" if fmt == "binary_little_endian" else ">"
            dtype = np.dtype([("n", order + count_type), ("v", order + index_type, (3,))])
            raw = f.read(dtype.itemsize * face[1])
            if len(raw) < dtype.itemsize * face[1]:
                raise PlyError(f"{path}: file is truncated ({face[1]} faces announced)")
            data = np.frombuffer(raw, dtype=dtype)
            rows = np.concatenate([data["n"][:, None].astype(np.int64), data["v"].astype(np.int64)], 1)
        if rows.shape[1] != 4 or np.any(rows[:, 0] != 3):
            raise PlyError(f"{path}: only triangle faces are supported")
        return vertices, rows[:, 1:]
