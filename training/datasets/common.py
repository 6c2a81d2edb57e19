"""Helpers shared by the readers of the original on-disk datasets.

Text tables are parsed in chunks with numpy's C parser (a malformed line or a non-finite value is then
located and named); clouds are grid-subsampled with the compiled op; subsampled clouds are cached as
npz under ``cache_root() / <dataset>``, keyed by the dataset root, split, grid size and options.
Readers take each input file of a split through ``SplitReads``, which applies ``dataset.on_bad_file``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.neighbors import KDTree

from kpconv_tf.config import BAD_FILE_POLICIES
from training.datasets.base import DatasetError, Scene, cache_root, discard_cache

# The original builds every scene KD-tree with this leaf size.
LEAF_SIZE = 50
_CHUNK_LINES = 1 << 20
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What reading a truncated, empty or overwritten npz / npy file raises (KeyError: an expected array is
# missing).
CACHE_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def read_table(
    path, columns: int, delimiter: str | None = None, names: Sequence[str] | None = None
) -> np.ndarray:
    """float32 [n, columns] from a text file of ``columns`` numbers per line (blank lines skipped).

    Raises DatasetError naming the file and, for a malformed line or a value that is not a finite
    float32 (NaN, +-Inf, beyond 3.4e38), the line (1-based, blank lines counted) and the column
    (1-based, with its name from ``names``).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {str(path)!r}")
    if names is not None and len(names) != columns:
        raise ValueError(f"names must give the {columns} column names, got {list(names)}")
    blocks = []
    with open(path, errors="replace") as f:
        first_line = 1
        while True:
            lines = list(itertools.islice(f, _CHUNK_LINES))
            if not lines:
                break
            try:
                block = np.loadtxt(lines, dtype=np.float64, delimiter=delimiter, ndmin=2)
                if block.size and block.shape[1] != columns:
                    raise ValueError
            except ValueError:
                _raise_bad_line(path, lines, first_line, columns, delimiter)
            # NaN fails the comparison too.
            finite = np.abs(block) <= _FLOAT32_MAX
            if not finite.all():
                _raise_non_finite(path, lines, first_line, np.argwhere(~finite)[0], delimiter, names)
            # float64 parsing then float32 keeps the nearest float32 of every written value.
            blocks.append(block.astype(np.float32).reshape(-1, columns))
            first_line += len(lines)
    return np.concatenate(blocks) if blocks else np.zeros((0, columns), np.float32)


def _raise_non_finite(path, lines, first_line, where, delimiter, names):
    """Names the line of data row ``where[0]`` of ``lines`` and the written value of column ``where[1]``."""
    row, column = int(where[0]), int(where[1])
    # np.loadtxt skips the lines that are blank once a '#' comment is cut off.
    data_lines = (i for i, line in enumerate(lines) if line.split("#", 1)[0].strip())
    offset = next(itertools.islice(data_lines, row, None))
    word = lines[offset].split("#", 1)[0].split(delimiter)[column].strip()
    beyond = " (beyond float32)" if np.isfinite(float(word)) else ""
    name = f" ({names[column]})" if names is not None else ""
    raise DatasetError(
        f"{path}: line {first_line + offset}: non-finite value in column {column + 1}{name}: {word}{beyond}"
    )


def _parses(words, columns) -> bool:
    if len(words) != columns:
        return False
    try:
        for word in words:
            float(word)
    except ValueError:
        return False
    return True


def _raise_bad_line(path, lines, first_line, columns, delimiter):
    for offset, line in enumerate(lines):
        if line.strip() and not _parses([w.strip() for w in line.split(delimiter)], columns):
            raise DatasetError(
                f"{path}: line {first_line + offset} is malformed (expected {columns} numbers"
                f"{' separated by ' + repr(delimiter) if delimiter else ''}): {line.strip()[:80]!r}"
            )
    raise DatasetError(f"{path}: unreadable lines {first_line}..{first_line + len(lines) - 1}")


def read_ply_fields(path, fields: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The named vertex properties of a PLY file (and those of ``optional`` it has); DatasetError when
    the file or a required property is missing or a value is not a finite float32 (``check_finite``)."""
    from utils.ply import PlyError, read_ply

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {str(path)!r}")
    try:
        data = read_ply(path)
    except PlyError as err:
        raise DatasetError(str(err)) from err
    missing = [name for name in fields if name not in data.dtype.names]
    if missing:
        raise DatasetError(f"{path}: vertex properties {missing} are missing (has {list(data.dtype.names)})")
    out = {name: np.asarray(data[name]) for name in list(fields) + list(optional) if name in data.dtype.names}
    check_finite(path, out)
    return out


def check_finite(path, properties: dict[str, np.ndarray]) -> None:
    """DatasetError naming ``path``, the first vertex (0-based index) and the property holding a value
    that is not a finite float32 (NaN, +-Inf, beyond 3.4e38); properties: name -> values [n]."""
    first = None
    for name, values in properties.items():
        if np.issubdtype(values.dtype, np.floating):
            # NaN fails the comparison too.
            bad = np.flatnonzero(~(np.abs(values) <= _FLOAT32_MAX))
            if bad.size and (first is None or bad[0] < first[0]):
                first = (int(bad[0]), name, values[bad[0]])
    if first is not None:
        index, name, value = first
        beyond = " (beyond float32)" if np.isfinite(value) else ""
        raise DatasetError(f"{path}: vertex {index}: non-finite value in property {name!r}: {value}{beyond}")


def subsample(points, dl: float, features=None, labels=None):
    """Grid subsampling (barycentres, averaged features, majority labels) as numpy arrays.

    Returns sub_points float32 [m, 3] followed by sub_features float32 [m, d] and/or sub_labels
    int32 [m] when given.
    """
    import tf_custom_ops as ops

    points = np.ascontiguousarray(points, np.float32)
    args = {}
    if features is not None:
        args["features"] = np.ascontiguousarray(features, np.float32)
    if labels is not None:
        args["labels"] = np.ascontiguousarray(labels, np.int32)
    out = ops.grid_subsampling(points, float(dl), **args)
    if not isinstance(out, tuple):
        return out.numpy()
    return tuple(t.numpy() for t in out)


def label_map(raw_values: Sequence[int], ignored: Sequence[int] = ()) -> dict[int, int]:
    """Original label value -> class index (ignored values -> -1), in increasing raw order."""
    mapping, index = {}, 0
    for value in sorted(raw_values):
        if value in ignored:
            mapping[int(value)] = -1
        else:
            mapping[int(value)] = index
            index += 1
    return mapping


def map_labels(raw, mapping: dict[int, int], path) -> np.ndarray:
    """int32 class indices of original labels ``raw``; DatasetError naming ``path`` for unknown values."""
    raw = np.asarray(raw)
    if raw.size and np.issubdtype(raw.dtype, np.floating) and not np.all(raw == np.round(raw)):
        raise DatasetError(f"{path}: labels must be integers")
    raw = raw.astype(np.int64)
    known = np.array(sorted(mapping), np.int64)
    unknown = np.setdiff1d(np.unique(raw), known)
    if unknown.size:
        raise DatasetError(
            f"{path}: labels {unknown[:10].tolist()} are outside the class list {known.tolist()}"
        )
    lookup = np.full(known.max() - known.min() + 1, -1, np.int32)
    for value, index in mapping.items():
        lookup[value - known.min()] = index
    return lookup[raw - known.min()]


def check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")


def cache_file(dataset: str, split: str, dl: float, key: dict) -> Path:
    """``cache_root()/<dataset>/<split>_<dl>_<hash of key>.npz``."""
    spec = json.dumps({"split": split, "dl": float(dl), **key}, sort_keys=True, default=str)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
    return cache_root() / dataset / f"{split}_{dl:.4f}_{digest}.npz"


class SplitReads:
    """Reads the input files of one split under a ``dataset.on_bad_file`` policy (BAD_FILE_POLICIES).

    "error": a DatasetError of a file propagates. "skip": the file is reported on stderr (one line)
    and left out; ``finish`` then reports the count and fails when nothing of the split is left.
    ``unit`` names what one read is in these reports (files, scans, scenes).
    """

    def __init__(self, policy: str, split: str, unit: str = "files"):
        check_bad_file_policy(policy)
        self.policy, self.split, self.unit = policy, split, unit
        self.count = 0
        self.skipped: list[str] = []

    def read(self, read: Callable, *args):
        """``read(*args)``; None when it raised a DatasetError and the policy is "skip"."""
        self.count += 1
        try:
            return read(*args)
        except DatasetError as err:
            if self.policy == "error":
                raise
            self.skipped.append(str(err))
            print(
                f"warning: split {self.split!r}: skipped (dataset.on_bad_file: skip): {err}",
                file=sys.stderr,
                flush=True,
            )
            return None

    def finish(self, kept: int) -> None:
        """After a split is read: prints the count of skipped reads; DatasetError when some were
        skipped and the split kept nothing (``kept`` clouds or scenes)."""
        if not self.skipped:
            return
        skipped = f"{len(self.skipped)} of {self.count} {self.unit}"
        print(
            f"warning: skipped {skipped} read for split {self.split!r} (dataset.on_bad_file: skip)",
            file=sys.stderr,
            flush=True,
        )
        if kept == 0:
            raise DatasetError(
                f"split {self.split!r} has nothing left: {skipped} read are bad; the first: {self.skipped[0]}"
            )


def check_bad_file_policy(policy: str) -> None:
    if policy not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {list(BAD_FILE_POLICIES)}, got {policy!r}")


def load_or_build(
    path: Path,
    build: Callable[[], dict[str, np.ndarray]],
    reads: SplitReads | None = None,
    check: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays cached at ``path``; built (and written atomically) when absent or unusable.

    A cache that cannot be read (truncated, empty, overwritten) or fails ``check(arrays)`` (raising
    one of CACHE_ERRORS) is reported on stderr, deleted and rebuilt. With ``reads``, a build that
    skipped a bad file is returned but not written: caches hold complete reads only, so one cache
    entry serves both ``on_bad_file`` policies, and a skipping run reports its bad files again (and
    takes repaired ones) instead of silently reusing a partial split.
    """
    if path.exists():
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an npz archive")
            with data:
                arrays = {k: data[k] for k in data.files}
            if check is not None:
                check(arrays)
            return arrays
        except CACHE_ERRORS as err:
            discard_cache(path, err)
    skipped = len(reads.skipped) if reads is not None else 0
    arrays = build()
    if reads is None or len(reads.skipped) == skipped:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return arrays


def save_full_points(cache: Path, index: int, points: np.ndarray) -> str:
    """Writes a full-resolution cloud beside the cache file; returns its file name."""
    name = f"{cache.stem}_full_{index}.npy"
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{name}.{os.getpid()}.tmp.npy")
    np.save(tmp, np.ascontiguousarray(points, np.float32))
    tmp.replace(cache.with_name(name))
    return name


def scene_arrays(
    index: int, name: str, points, colors, labels, dl: float, cache: Path, keep_full: bool, full=None
) -> dict[str, np.ndarray]:
    """Subsamples one scene; with ``keep_full`` also the projection indices of the full-resolution
    cloud, its labels and (in a separate file) its points, for test-time reprojection.

    points float32 [m, 3]; colors float32 [m, 3] in [0, 1]; labels int32 [m] (-1 ignored) or None;
    full: (points float32 [k, 3], labels int32 [k] or None), the full-resolution cloud when it is not
    ``points`` itself (e.g. mesh vertices when the faces were sampled).
    """
    out = subsample(points, dl, features=colors, labels=labels)
    sub_points, sub_colors = out[0], out[1]
    arrays = {
        f"name_{index}": np.array(name),
        f"points_{index}": sub_points.astype(np.float32),
        f"colors_{index}": np.clip(sub_colors, 0, 1).astype(np.float32),
    }
    if labels is not None:
        arrays[f"labels_{index}"] = out[2].astype(np.int32)
    if keep_full:
        if full is not None:
            points, labels = full
        tree = KDTree(sub_points, leaf_size=LEAF_SIZE)
        arrays[f"projection_{index}"] = tree.query(points, return_distance=False)[:, 0].astype(np.int32)
        if labels is not None:
            arrays[f"full_labels_{index}"] = np.asarray(labels, np.int32)
        arrays[f"full_file_{index}"] = np.array(save_full_points(cache, index, points))
    return arrays


def scenes_from_arrays(arrays: dict[str, np.ndarray], cache: Path) -> list[Scene]:
    """The Scenes stored by ``scene_arrays`` (indices 0, 1, ...), with fresh KD-trees."""
    scenes = []
    for i in itertools.count():
        if f"points_{i}" not in arrays:
            break
        points = arrays[f"points_{i}"]
        full_file = arrays.get(f"full_file_{i}")
        loader = None
        if full_file is not None:
            full_path = cache.with_name(str(full_file))
            loader = lambda full_path=full_path: np.load(full_path)  # noqa: E731
        scenes.append(
            Scene(
                name=str(arrays[f"name_{i}"]),
                points=points,
                colors=arrays[f"colors_{i}"],
                labels=arrays.get(f"labels_{i}"),
                tree=KDTree(points, leaf_size=LEAF_SIZE),
                projection=arrays.get(f"projection_{i}"),
                full_labels=arrays.get(f"full_labels_{i}"),
                full_points_loader=loader,
            )
        )
    return scenes


def check_full_files(arrays: dict[str, np.ndarray], cache: Path) -> None:
    """ValueError naming the full-resolution cloud stored by ``scene_arrays`` beside ``cache`` that is
    missing, unreadable or not float32 [k, 3] with k the scene's projection length."""
    for key in arrays:
        if key.startswith("full_file_"):
            index = key[len("full_file_") :]
            full_path = cache.with_name(str(arrays[key]))
            if not full_path.is_file():
                raise ValueError(f"{full_path} is missing")
            try:
                # A memory map reads the header and checks the size, not the points.
                points = np.load(full_path, mmap_mode="r", allow_pickle=False)
            except CACHE_ERRORS as err:
                raise ValueError(f"{full_path} is unreadable ({err})") from err
            expected = (len(arrays[f"projection_{index}"]), 3)
            if points.dtype != np.float32 or points.shape != expected:
                raise ValueError(
                    f"{full_path} holds {points.dtype} {points.shape}, expected float32 {expected}"
                )


def cached_scenes(
    dataset: str,
    split: str,
    dl: float,
    key: dict,
    sources: Sequence,
    read: Callable,
    keep_full: bool,
    reads: SplitReads | None = None,
) -> list[Scene]:
    """Scenes of ``split`` from the cache, or read with ``read(source) -> (name, points, colors,
    labels[, full])`` (see ``scene_arrays``) or None for a source skipped by ``reads`` (see
    ``load_or_build``), subsampled and cached. Empty clouds are skipped with a warning; a cache whose
    full-resolution clouds are gone or damaged is rebuilt."""
    from training.datasets.base import skip_empty

    path = cache_file(dataset, split, dl, key)

    def build():
        arrays, index = {}, 0
        for source in sources:
            scene = read(source)
            if scene is None:
                continue
            name, points, colors, labels, *full = scene
            if skip_empty(name, points):
                continue
            arrays.update(scene_arrays(index, name, points, colors, labels, dl, path, keep_full, *full))
            index += 1
        return arrays

    arrays = load_or_build(path, build, reads, check=lambda arrays: check_full_files(arrays, path))
    return scenes_from_arrays(arrays, path)


def option(config, key: str, default=None):
    """``config.dataset.extra[key]`` or ``default``."""
    return dict(config.dataset.extra or {}).get(key, default)
