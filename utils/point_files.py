"""Point files of any common kind: read into one ``PointFile``, write back as PLY or LAS / LAZ.

    read_point_file("tile.laz")                       # LAS / LAZ through laspy (lazrs decompresses)
    read_point_file("scan.txt", ["x", "y", "z", "red", "green", "blue", "label"])
    write_point_file("out.las", points, {"classification": preds}, las_header=source.las_header)

Formats: ``.ply`` (``utils.ply``), ``.las`` / ``.laz``, text ``.txt`` / ``.xyz`` / ``.csv`` (one point a
line, numbers separated by commas or whitespace, ``#`` comments, and optionally a first line of
column names, read in lower case) and ``.npy`` (a float array [n, >= 3], or a structured array with
fields x, y, z).
Text and ``.npy`` columns are named by ``columns`` (default x, y, z, then ``column_3``, ``column_4``,
... by 0-based position). Every problem with a file raises ``PointFileError`` naming it.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POINT_FILE_SUFFIXES = (".ply", ".las", ".laz", ".txt", ".xyz", ".csv", ".npy")
_TEXT_SUFFIXES = (".txt", ".xyz", ".csv")
_LAS_SUFFIXES = (".las", ".laz")
_CHUNK_LINES = 1 << 20
# Colour field names, LAS / PLY first, then the short names of text columns.
_COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"))
# LAS files written without a template: LAS 1.4 point formats 6 (no colours) / 7 (colours), whose
# classification is a full byte, at millimetre resolution.
_LAS_SCALE = 0.001


class PointFileError(ValueError):
    """A point file is missing, unreadable, empty or malformed; the message names the file."""


@dataclass
class PointFile:
    """One point file.

    points: float64 [n, 3] (x, y, z); fields: every other per-point property by name, arrays [n]
    (e.g. red / green / blue, intensity, classification, label, scalar_*); las_header: the laspy
    header of LAS / LAZ input (a template to write results in the same coordinate frame), else None.
    """

    path: Path
    points: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    las_header: object | None = None


def read_point_file(path, columns: Sequence[str] | None = None) -> PointFile:
    """Reads ``path`` by its suffix (``POINT_FILE_SUFFIXES``); ``columns`` names the columns of text
    and plain ``.npy`` files (it must contain x, y and z; other formats ignore it)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in POINT_FILE_SUFFIXES:
        raise PointFileError(
            f"{path}: unknown point file extension {path.suffix!r}; known: {', '.join(POINT_FILE_SUFFIXES)}"
        )
    if columns is not None:
        columns = _check_columns(columns)
    if not path.is_file():
        raise PointFileError(f"{path}: no such file")
    if suffix == ".ply":
        point_file = _read_ply(path)
    elif suffix in _LAS_SUFFIXES:
        point_file = _read_las(path)
    elif suffix == ".npy":
        point_file = _read_npy(path, columns)
    else:
        point_file = _read_text(path, columns)
    if len(point_file.points) == 0:
        raise PointFileError(f"{path}: the file holds no points")
    return point_file


def _check_columns(columns: Sequence[str]) -> list[str]:
    columns = [str(c).strip() for c in columns]
    if len(set(columns)) != len(columns) or not {"x", "y", "z"} <= set(columns):
        raise ValueError(f"columns must be distinct names including x, y and z, got {columns}")
    return columns


def _default_columns(count: int) -> list[str]:
    return ["x", "y", "z"][:count] + [f"column_{i}" for i in range(3, count)]


def _from_named(path: Path, arrays: dict[str, np.ndarray], las_header=None, lines=None) -> PointFile:
    """Splits named columns [n] into points and fields; non-finite coordinates raise, naming the
    point (0-based) and, with ``lines`` (int [n], 1-based line numbers), its line."""
    missing = [name for name in ("x", "y", "z") if name not in arrays]
    if missing:
        raise PointFileError(f"{path}: no {', '.join(missing)} coordinates (has {sorted(arrays)})")
    points = np.stack([np.asarray(arrays[name], np.float64) for name in ("x", "y", "z")], 1)
    bad = np.flatnonzero(~np.isfinite(points).all(1))
    if bad.size:
        where = f"point {bad[0]}" + (f" (line {lines[bad[0]]})" if lines is not None else "")
        raise PointFileError(f"{path}: {where}: non-finite coordinates {points[bad[0]].tolist()}")
    fields = {
        name: np.ascontiguousarray(values) for name, values in arrays.items() if name not in ("x", "y", "z")
    }
    return PointFile(path, points, fields, las_header)


def _read_ply(path: Path) -> PointFile:
    from utils.ply import read_ply

    try:
        data = read_ply(path)
    # Truncated ASCII bodies surface as IndexError / ValueError from the row parsing.
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as err:
        raise PointFileError(f"{path}: unreadable PLY file ({err})") from err
    return _from_named(path, {name: data[name] for name in data.dtype.names})


def _read_las(path: Path) -> PointFile:
    import laspy

    try:
        las = laspy.read(path)
        arrays = {
            name: np.array(las[name])
            for name in las.point_format.dimension_names
            if name not in ("X", "Y", "Z")
        }
        arrays.update(x=np.array(las.x), y=np.array(las.y), z=np.array(las.z))
    # laspy and its LAZ codec raise many types for damaged files (LaspyException, lazrs errors,
    # ValueError, EOFError, ...); each is a bad file here.
    except Exception as err:  # noqa: BLE001
        raise PointFileError(f"{path}: unreadable LAS/LAZ file ({type(err).__name__}: {err})") from err
    return _from_named(path, arrays, las_header=las.header)


def _read_npy(path: Path, columns: list[str] | None) -> PointFile:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise PointFileError(f"{path}: unreadable .npy file ({err})") from err
    if not isinstance(data, np.ndarray):
        raise PointFileError(f"{path}: not a .npy array")
    if data.dtype.names:
        if data.ndim != 1:
            raise PointFileError(f"{path}: a structured array must be 1-D, got shape {data.shape}")
        return _from_named(path, {name: data[name] for name in data.dtype.names})
    if data.ndim != 2 or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise PointFileError(f"{path}: expected a numeric array [n, >= 3], got {data.dtype} {data.shape}")
    names = columns or _default_columns(max(data.shape[1], 3))
    if data.shape[1] < len(names):
        raise PointFileError(
            f"{path}: {data.shape[1]} columns, fewer than the {len(names)} asked ({', '.join(names)})"
        )
    names = names + _default_columns(data.shape[1])[len(names) :]
    return _from_named(path, {name: data[:, i] for i, name in enumerate(names)})


def _is_data(line: str) -> bool:
    return bool(line.split("#", 1)[0].strip())


def _words(line: str, delimiter: str | None) -> list[str]:
    return [w.strip() for w in line.split("#", 1)[0].strip().split(delimiter)]


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _read_text(path: Path, columns: list[str] | None) -> PointFile:
    """Text tables, parsed in chunks of lines with numpy's C parser; a malformed line is then located."""
    try:
        with open(path, errors="replace") as f:
            return _parse_text(path, f, columns)
    except OSError as err:
        raise PointFileError(f"{path}: unreadable text file ({err})") from err


def _parse_text(path: Path, f, columns: list[str] | None) -> PointFile:
    head = list(itertools.islice(f, _CHUNK_LINES))
    first = next((i for i, line in enumerate(head) if _is_data(line)), None)
    if first is None:
        raise PointFileError(f"{path}: the file holds no points")
    delimiter = "," if "," in head[first] else None
    words = _words(head[first], delimiter)
    header = None
    if not any(_is_number(w) for w in words):
        # Names are matched in lower case; exporters such as CloudCompare start the line with "//".
        header = [w.lstrip("/").lower() for w in words]
        head[first] = "\n"  # the name line, kept as a blank line so that line numbers stay right
        first = next((i for i, line in enumerate(head) if _is_data(line)), None)
        if first is None:
            raise PointFileError(f"{path}: the file holds no points (only a line of column names)")
        words = _words(head[first], delimiter)
    count = len(words)
    names = columns or header or _default_columns(max(count, 3))
    if count < len(names):
        raise PointFileError(
            f"{path}: line {first + 1} has {count} columns, fewer than the {len(names)} "
            f"asked ({', '.join(names)})"
        )
    if header is not None and columns is None and len(set(header)) != len(header):
        raise PointFileError(f"{path}: the column names {header} repeat a name")
    names = names + _default_columns(count)[len(names) :]
    blocks, line_numbers, start = [], [], 1
    chunk = head
    while chunk:
        try:
            block = np.loadtxt(chunk, dtype=np.float64, delimiter=delimiter, ndmin=2)
            if block.size and block.shape[1] != count:
                raise ValueError
        except ValueError:
            _raise_bad_line(path, chunk, start, count, delimiter, names)
        blocks.append(block.reshape(-1, count))
        line_numbers.append(start + np.array([i for i, line in enumerate(chunk) if _is_data(line)], np.int64))
        start += len(chunk)
        chunk = list(itertools.islice(f, _CHUNK_LINES))
    table = np.concatenate(blocks)
    return _from_named(
        path, {name: table[:, i] for i, name in enumerate(names)}, lines=np.concatenate(line_numbers)
    )


def _raise_bad_line(path, lines, start, count, delimiter, names):
    for offset, line in enumerate(lines):
        if not _is_data(line):
            continue
        words = _words(line, delimiter)
        if len(words) < count:
            raise PointFileError(
                f"{path}: line {start + offset} has {len(words)} columns, fewer than the "
                f"{count} expected ({', '.join(names)}): {line.strip()[:80]!r}"
            )
        if len(words) != count or not all(_is_number(w) for w in words):
            raise PointFileError(
                f"{path}: line {start + offset} is malformed (expected {count} numbers"
                f"{' separated by commas' if delimiter else ''}): {line.strip()[:80]!r}"
            )
    raise PointFileError(f"{path}: unreadable lines {start}..{start + len(lines) - 1}")


def colors_of(point_file: PointFile) -> np.ndarray | None:
    """float32 [n, 3] colours in [0, 1], or None when the file has no red / green / blue fields.

    Floats already in [0, 1] are kept; otherwise values up to 255 are 8-bit (/ 255, also LAS files
    that store 8-bit colours in their 16-bit fields) and larger ones 16-bit (/ 65535).
    """
    for names in _COLOR_NAMES:
        if all(name in point_file.fields for name in names):
            break
    else:
        return None
    rgb = np.stack([np.asarray(point_file.fields[name], np.float64) for name in names], 1)
    if not len(rgb):
        return rgb.astype(np.float32)
    low, high = float(np.min(rgb)), float(np.max(rgb))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise PointFileError(
            f"{point_file.path}: colours {names} must be finite values in [0, 65535], got [{low}, {high}]"
        )
    floats = all(np.issubdtype(point_file.fields[name].dtype, np.floating) for name in names)
    if not (floats and high <= 1):
        rgb = rgb / (255.0 if high <= 255 else 65535.0)
    return rgb.astype(np.float32)


def write_point_file(path, points, fields: dict[str, np.ndarray], las_header=None) -> Path:
    """Writes points float [n, 3] and ``fields`` (name -> array [n]) to ``path``, atomically.

    ``.ply``: every field as a vertex property. ``.las`` / ``.laz``: fields named as a dimension of
    the point format (``classification``, ``intensity``, ``red``, ...) fill it, the others become
    extra dimensions; ``las_header`` (e.g. ``PointFile.las_header``) gives the point format, scales,
    offsets and VLRs (coordinate system), else LAS 1.4 format 6 (7 with red, green, blue) at 1 mm.
    """
    path = Path(path)
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape [n, 3], got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points must be finite")
    fields = {str(name): np.asarray(values) for name, values in fields.items()}
    for name, values in fields.items():
        if values.shape != (len(points),):
            raise ValueError(f"field {name!r} must have shape [{len(points)}], got {values.shape}")
        if name.lower() in ("x", "y", "z"):
            raise ValueError(f"field {name!r} collides with the coordinates")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        from utils.ply import write_ply

        try:
            write_ply(path, {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], **fields})
        except BaseException:
            # write_ply renames its temporary file into place; an interrupted write leaves only that one.
            path.with_name(f".{path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)
            raise
        return path
    if suffix not in _LAS_SUFFIXES:
        raise ValueError(f"{path}: point files are written as .ply, .las or .laz, not {path.suffix!r}")
    las = _las_data(points, fields, las_header)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            las.write(f, do_compress=suffix == ".laz")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # An interrupted or failed write leaves neither a partial file nor the temporary one.
        tmp.unlink(missing_ok=True)
        raise
    return path


def _las_data(points: np.ndarray, fields: dict[str, np.ndarray], las_header):
    import laspy

    if las_header is not None:
        header = copy.deepcopy(las_header)
    else:
        has_rgb = all(name in fields for name in _COLOR_NAMES[0])
        header = laspy.LasHeader(point_format=7 if has_rgb else 6, version="1.4")
        header.scales = np.full(3, _LAS_SCALE)
        header.offsets = np.floor(points.min(0)) if len(points) else np.zeros(3)
    standard = set(header.point_format.dimension_names) - {"X", "Y", "Z"}
    extra = []
    for name, values in fields.items():
        if name in standard:
            continue
        dtype = np.dtype(np.uint8) if values.dtype == np.bool_ else values.dtype
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise ValueError(f"field {name!r} has dtype {values.dtype}; LAS extra dimensions are numbers")
        extra.append(laspy.ExtraBytesParams(name=name, type=dtype))
    if extra:
        header.add_extra_dims(extra)
    las = laspy.LasData(header, points=laspy.ScaleAwarePointRecord.zeros(len(points), header=header))
    try:
        las.x, las.y, las.z = points[:, 0], points[:, 1], points[:, 2]
    except OverflowError as err:
        raise ValueError(
            f"points do not fit the LAS scales {list(header.scales)} and offsets "
            f"{list(header.offsets)}: {err}"
        ) from err
    kinds = {dim.name: dim.dtype for dim in header.point_format.dimensions}
    for name, values in fields.items():
        if name in standard:
            values = _fit_dimension(name, values, kinds[name])
        try:
            las[name] = values
        except (OverflowError, ValueError) as err:
            raise ValueError(f"field {name!r} does not fit the LAS dimension: {err}") from err
    return las


def _fit_dimension(name: str, values: np.ndarray, dtype) -> np.ndarray:
    """``values`` cast to a standard LAS dimension's integer type (``None``: a bit field, which laspy
    checks itself); ValueError for values that would wrap or lose their fraction."""
    if dtype is None or not np.issubdtype(dtype, np.integer):
        return values
    if len(values):
        info = np.iinfo(dtype)
        if not np.all(np.isfinite(values)) or values.min() < info.min or values.max() > info.max:
            raise ValueError(
                f"field {name!r} holds values outside the LAS {dtype} range [{info.min}, {info.max}]"
            )
        if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
            raise ValueError(f"field {name!r} must hold integers for its LAS {dtype} dimension")
    return values.astype(dtype)
