"""Minimal PLY reader/writer for point clouds (vertex element only).

``write_ply(path, fields)`` writes binary little-endian PLY from a dict {name: 1-D array} (all of one
length); ``read_ply(path)`` returns a numpy structured array with the vertex properties. Reading
accepts binary little/big endian and ASCII files; faces and other elements after the vertices are
ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import numpy as np

_PLY_TO_NUMPY = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NUMPY_TO_PLY = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
                 "u4": "uint", "f4": "float", "f8": "double"}


class PlyError(ValueError):
    """The file is not a PLY file this reader understands."""


def write_ply(path: Union[str, Path], fields: Dict[str, np.ndarray]) -> None:
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


def read_ply(path: Union[str, Path]) -> np.ndarray:
    """Reads the vertex element: numpy structured array, one field per property."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file not found: {path}")
    with open(path, "rb") as f:
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
                    current[2].append((words[4], None))
                else:
                    if words[1] not in _PLY_TO_NUMPY:
                        raise PlyError(f"{path}: unknown property type {words[1]!r}")
                    current[2].append((words[2], _PLY_TO_NUMPY[words[1]]))
            elif words[0] == "end_header":
                break
        vertex = next((e for e in elements if e[0] == "vertex"), None)
        if vertex is None:
            raise PlyError(f"{path}: no vertex element")
        if elements[0] is not vertex and any(e[1] for e in elements[:elements.index(vertex)]):
            raise PlyError(f"{path}: elements before the vertices are not supported")
        if any(t is None for _, t in vertex[2]):
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
