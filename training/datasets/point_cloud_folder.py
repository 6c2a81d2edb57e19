"""One's own labelled point files as scenes (``dataset.name: PointCloudFolder``, KP-FCNN segmentation).

    <root>/train/**/<tile>.{ply,las,laz,txt,xyz,csv,npy}
    <root>/validation/**/...          (optional: defaults to the test files)
    <root>/test/**/...                (optional: defaults to the validation files; may be unlabelled)

Files are read with ``utils.point_files``. Options (``dataset.extra``):

* ``train`` / ``validation`` / ``test``: file names or glob patterns (``**`` recursive) relative to the
  root, a list or one string; they replace the subfolder of that name. Without ``train`` nor a
  ``train/`` folder, training takes every point file under the root that is not a validation or test
  file. A file may not be both a training and a held-out file.
* ``label_field``: the per-point label (integers); default ``classification`` for LAS / LAZ, ``label``
  otherwise. Training and validation files need it; test files without it give predictions only.
* ``class_names_file``: text file (relative to the root, or absolute) with one class name a line for
  label values 0, 1, ... or ``<value> <name>`` lines (e.g. LAS codes ``2 ground``). ``dataset.class_names``
  may give the names of values 0, 1, ... instead. Without either, the classes are the label values
  found in the training files, named ``class_<value>``, in increasing order. A validation or test file
  with a label value that is neither a class nor ignored is a bad file.
* ``ignored_labels``: label values that are not a class (their points carry -1: no loss, no metric).
* ``columns``: names of the columns of text and plain ``.npy`` files (list or "x,y,z,red,green,blue,label"),
  default x, y, z, ``column_3``, ...; a text file may name them in a first line instead.
* ``color_features``: what fills the three colour channels that ``dataset.in_features_dim`` 3, 4, 5
  and 7 use (as S3DIS's colours): ``rgb`` (red / green / blue, or r / g / b, scaled to [0, 1] by
  ``utils.point_files.colors_of``), ``intensity`` (the normalised intensity in all three, as NPM3D's
  reflectance) or ``auto`` (default: rgb when a file has it, else its intensity). A file lacking it is a
  bad file (``dataset.on_bad_file``) when the features use colours; otherwise its channels are zeros.
* ``intensity_scale``: intensities are divided by it and clipped to [0, 1]. Default: 65535 for LAS (the
  format's 16-bit convention) and 16-bit fields, 255 for 8-bit fields, else 1, 255 or 65535 by the
  largest value of the file; set it when files differ so that every file is scaled alike.

Coordinates are kept in float32: a file whose x or y reaches 10 km is moved by whole kilometres
towards the origin (its minimum corner floored to 1 km), so that millimetres survive; prediction files
of ``training.test`` are in those moved coordinates. Every split is grid-subsampled and cached (keyed by
the files' sizes and modification times, so an edited file is read again); validation and test keep
the projection of their full clouds. ``dataset.on_bad_file: skip`` leaves out the bad files.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.datasets.base import DatasetError, Scene, SceneDataset, require_dir
from training.datasets.common import (
    SplitReads,
    cached_scenes,
    check_bad_file_policy,
    check_finite,
    check_split,
    label_map,
    map_labels,
    option,
)
from utils.point_files import POINT_FILE_SUFFIXES, PointFileError, colors_of, read_point_file

SPLITS = ("train", "validation", "test")
OPTIONS = SPLITS + (
    "label_field",
    "class_names_file",
    "ignored_labels",
    "columns",
    "color_features",
    "intensity_scale",
)
COLOR_FEATURES = ("auto", "rgb", "intensity")
# in_features_dim values whose features hold the colour channels (training.pipeline._features).
COLOR_DIMS = (3, 4, 5, 7)
LAYOUT = (
    "<root>/{train,validation,test}/**/*.{ply,las,laz,txt,xyz,csv,npy}, "
    "or dataset.extra train / validation / test"
)
# Float32 keeps millimetres up to about 10 km; farther files move by whole kilometres.
_FAR, _STEP = 1.0e4, 1.0e3
_VALUE_LINE = re.compile(r"^(-?\d+)\s+(\S.*)$")


def _point_files(folder: Path, exclude: Sequence[Path]) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in POINT_FILE_SUFFIXES
        and not p.name.startswith(".")
        and p not in exclude
    )


def _matching(root: Path, split: str, patterns, exclude: Sequence[Path]) -> list[Path]:
    """The files named by ``patterns`` (names or glob patterns relative to ``root``), sorted."""
    if isinstance(patterns, str):
        patterns = [patterns]
    found = set()
    for pattern in patterns:
        pattern = str(pattern)
        if glob.has_magic(pattern):
            base = pattern if Path(pattern).is_absolute() else str(Path(glob.escape(str(root))) / pattern)
            paths = [Path(p) for p in glob.glob(base, recursive=True)]
            paths = [p for p in paths if p.is_file() and p not in exclude]
            if not paths:
                raise DatasetError(f"dataset.extra.{split}: {pattern!r} matches no file in {str(root)!r}")
        else:
            paths = [root / pattern]
            if not paths[0].is_file():
                raise DatasetError(f"dataset.extra.{split}: no file {str(paths[0])!r}")
        found.update(paths)
    return sorted(found)


def read_class_names(path) -> dict[int, str]:
    """Label value -> class name from a class names file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset.extra.class_names_file: no file {str(path)!r}")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"{path}: no class name")
    pairs = [_VALUE_LINE.match(line) for line in lines]
    if all(pairs):
        names = {}
        for match in pairs:
            value = int(match.group(1))
            if value in names:
                raise DatasetError(f"{path}: label value {value} is named twice")
            names[value] = match.group(2).strip()
    else:
        names = dict(enumerate(lines))
    if len(set(names.values())) != len(names):
        raise DatasetError(f"{path}: class names repeat: {list(names.values())}")
    return names


class PointCloudFolder(SceneDataset):
    """The point files of ``root`` as scenes; options as in the module docstring.

    ``label_names``: the classes, label values in increasing order (ignored values excluded).
    """

    name = "PointCloudFolder"
    version = 1

    def __init__(
        self,
        root,
        first_subsampling_dl: float,
        splits: dict[str, object] | None = None,
        label_field: str | None = None,
        class_names: Sequence[str] = (),
        class_names_file: str | None = None,
        ignored_labels: Sequence[int] = (),
        columns=None,
        color_features: str = "auto",
        intensity_scale: float = 0.0,
        needs_colors: bool = True,
        on_bad_file: str = "error",
    ):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        if color_features not in COLOR_FEATURES:
            raise ValueError(
                f"dataset.extra.color_features must be one of {list(COLOR_FEATURES)}, got {color_features!r}"
            )
        if not intensity_scale >= 0:
            raise ValueError(
                f"dataset.extra.intensity_scale must be >= 0 (0: automatic), got {intensity_scale}"
            )
        unknown = sorted(set(splits or {}) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}; splits are {list(SPLITS)}")
        check_bad_file_policy(on_bad_file)
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        self.label_field = label_field
        self.ignored = sorted({int(v) for v in ignored_labels})
        self.columns = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else columns
        if self.columns is not None and not {"x", "y", "z"} <= set(self.columns):
            raise ValueError(f"dataset.extra.columns must name x, y and z, got {self.columns}")
        self.color_features, self.intensity_scale = color_features, float(intensity_scale)
        self.needs_colors, self.on_bad_file = bool(needs_colors), on_bad_file
        names_file = None
        if class_names_file:
            names_file = Path(class_names_file).expanduser()
            names_file = names_file if names_file.is_absolute() else self.root / names_file
        if names_file is not None and class_names:
            raise ValueError(
                "give the class names once: dataset.class_names or dataset.extra.class_names_file"
            )
        self.class_values: dict[int, str] | None = None  # label value -> name; None: from the data
        if names_file is not None:
            self.class_values = read_class_names(names_file)
        elif class_names:
            if len(set(class_names)) != len(class_names) or not all(class_names):
                raise ValueError(
                    f"dataset.class_names must be distinct non-empty names, got {list(class_names)}"
                )
            self.class_values = dict(enumerate(class_names))
        self.files = self._split_files(dict(splits or {}), [names_file] if names_file else [])
        self._raw: dict[str, list[Scene]] = {}
        self._scenes: dict[str, list[Scene]] = {}
        self._mapping: dict[int, int] | None = None

    def _split_files(self, patterns: dict[str, object], exclude: list[Path]) -> dict[str, list[Path]]:
        files: dict[str, list[Path] | None] = {}
        for split in SPLITS:
            if split in patterns:
                files[split] = _matching(self.root, split, patterns[split], exclude)
            elif (self.root / split).is_dir():
                files[split] = _point_files(self.root / split, exclude)
            else:
                files[split] = None
        if files["validation"] is None:
            files["validation"] = files["test"]
        if files["test"] is None:
            files["test"] = files["validation"]
        held_out = set(files["validation"] or []) | set(files["test"] or [])
        if files["train"] is None:
            files["train"] = [p for p in _point_files(self.root, exclude) if p not in held_out]
        both = sorted(set(files["train"]) & held_out)
        if both:
            raise DatasetError(
                f"{both[0]} is both a training and a validation / test file "
                f"({len(both)} such files); see dataset.extra train / validation / test"
            )
        return {split: paths or [] for split, paths in files.items()}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {
            "root": str(self.root.resolve()),
            "files": {split: [str(p) for p in paths] for split, paths in self.files.items()},
        }

    @property
    def label_names(self) -> list[str]:
        values = self._class_values()
        return [values[v] for v in sorted(values) if v not in self.ignored]

    def _class_values(self) -> dict[int, str]:
        if self.class_values is None:
            found = set()
            for scene in self._raw_scenes("train"):
                found.update(np.unique(scene.labels).tolist())
            found -= set(self.ignored)
            if not found:
                raise DatasetError(
                    f"no class found: the training files of {str(self.root)!r} carry no "
                    "label outside dataset.extra.ignored_labels"
                )
            self.class_values = {int(v): f"class_{v}" for v in sorted(found)}
        return self.class_values

    def scenes(self, split: str) -> list[Scene]:
        check_split(split, SPLITS)
        if split not in self._scenes:
            if self._mapping is None:
                self._mapping = label_map(sorted(set(self._class_values()) | set(self.ignored)), self.ignored)
            mapped = []
            for scene in self._raw_scenes(split):
                where = f"{self.root}: scene {scene.name}"
                labels, full = (
                    None if a is None else map_labels(a, self._mapping, where)
                    for a in (scene.labels, scene.full_labels)
                )
                mapped.append(dataclasses.replace(scene, labels=labels, full_labels=full))
            self._scenes[split] = mapped
        return self._scenes[split]

    def _raw_scenes(self, split: str) -> list[Scene]:
        """The scenes of ``split`` with their files' own label values (what the cache holds)."""
        if split not in self._raw:
            files = self.files[split]
            if not files:
                raise DatasetError(
                    f"no {split} file in {str(self.root)!r}: give a {split}/ folder or "
                    f"dataset.extra.{split} (names or glob patterns); layout: {LAYOUT}"
                )
            sources = list(zip(files, self._scene_names(files)))
            stats = [
                (
                    str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p),
                    p.stat().st_size,
                    p.stat().st_mtime_ns,
                )
                for p in files
            ]
            known = None if self.class_values is None and split == "train" else sorted(self._class_values())
            key = {
                "root": str(self.root.resolve()),
                "files": stats,
                "label_field": self.label_field,
                "columns": self.columns,
                "colors": self.color_features,
                "intensity_scale": self.intensity_scale,
                "needs_colors": self.needs_colors,
                "classes": known,
                "ignored": self.ignored,
                "version": self.version,
            }
            reads = SplitReads(self.on_bad_file, split)
            labelled = split != "test"
            self._raw[split] = cached_scenes(
                self.name,
                split,
                self.dl,
                key,
                sources,
                lambda source: reads.read(self._read, *source, labelled, known),
                keep_full=split != "train",
                reads=reads,
            )
            reads.finish(len(self._raw[split]))
        return self._raw[split]

    def _scene_names(self, files: list[Path]) -> list[str]:
        """File stems, or relative paths (separators and dots as ``_``) when stems repeat."""
        stems = [p.stem for p in files]
        if len(set(stems)) == len(stems):
            return stems
        return [
            re.sub(r"[/\\.]", "_", str(p.relative_to(self.root) if p.is_relative_to(self.root) else p))
            for p in files
        ]

    def _read(self, path: Path, name: str, labelled: bool, known: list[int] | None):
        try:
            point_file = read_point_file(path, self.columns)
            colors = self._colors(point_file)
        except PointFileError as err:
            raise DatasetError(str(err)) from err
        field = self.label_field or ("classification" if path.suffix.lower() in (".las", ".laz") else "label")
        labels = point_file.fields.get(field)
        if labels is None and labelled:
            raise DatasetError(
                f"{path}: no label field {field!r} (fields: {sorted(point_file.fields)}); "
                "see dataset.extra.label_field and, for text and .npy files, columns"
            )
        if labels is not None:
            labels = self._labels(path, field, labels, known)
        points = point_file.points
        far = np.abs(points[:, :2]).max(0) >= _FAR
        origin = np.where(far, np.floor(points[:, :2].min(0) / _STEP) * _STEP, 0.0)
        points = np.concatenate([points[:, :2] - origin, points[:, 2:]], 1).astype(np.float32)
        return name, points, colors, labels

    def _labels(self, path: Path, field: str, values: np.ndarray, known: list[int] | None) -> np.ndarray:
        """int32 [n] label values; DatasetError for non-integers and, with ``known``, unknown values."""
        values = np.asarray(values)
        if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
            raise DatasetError(f"{path}: label field {field!r} holds {values.dtype}, not numbers")
        wide = values.astype(np.float64)
        bad = np.flatnonzero(~((wide == np.round(wide)) & (np.abs(wide) < 2**31)))
        if bad.size:
            raise DatasetError(
                f"{path}: point {bad[0]}: label field {field!r} holds {values[bad[0]]}, not an integer label"
            )
        values = values.astype(np.int32)
        if known is not None:
            unknown = sorted(set(np.unique(values).tolist()) - set(known) - set(self.ignored))
            if unknown:
                raise DatasetError(
                    f"{path}: label values {unknown[:10]} of field {field!r} are neither "
                    f"classes {known} nor ignored {self.ignored}; "
                    "see dataset.extra.class_names_file"
                )
        return values

    def _colors(self, point_file) -> np.ndarray:
        """float32 [n, 3] in [0, 1]: what ``color_features`` puts in the colour channels."""
        path, n = point_file.path, len(point_file.points)
        rgb = colors_of(point_file)
        intensity = point_file.fields.get("intensity")
        source = self.color_features
        if source == "auto":
            source = "rgb" if rgb is not None else ("intensity" if intensity is not None else None)
        if source == "rgb" and rgb is not None:
            return rgb
        if source == "intensity" and intensity is not None:
            return np.repeat(self._intensity(point_file, intensity)[:, None], 3, axis=1)
        if source is not None:
            wanted = "red, green, blue" if source == "rgb" else "intensity"
            raise DatasetError(
                f"{path}: no {wanted} field (dataset.extra.color_features: "
                f"{self.color_features}; fields: {sorted(point_file.fields)})"
            )
        if self.needs_colors:
            raise DatasetError(
                f"{path}: neither colours (red, green, blue) nor intensity, which the colour "
                f"channels of dataset.in_features_dim {list(COLOR_DIMS)} need; fields: "
                f"{sorted(point_file.fields)}; use in_features_dim 1 or 2 for geometry only"
            )
        return np.zeros((n, 3), np.float32)

    def _intensity(self, point_file, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        wide = values.astype(np.float64)
        check_finite(point_file.path, {"intensity": wide})
        scale = self.intensity_scale
        if not scale:
            high = float(wide.max(initial=0))
            if point_file.las_header is not None or values.dtype == np.uint16:
                scale = 65535.0
            elif values.dtype == np.uint8:
                scale = 255.0
            else:
                scale = 1.0 if high <= 1 else (255.0 if high <= 255 else 65535.0)
        return np.clip(wide / scale, 0, 1).astype(np.float32)


def from_config(config) -> PointCloudFolder:
    """The folder ``config.dataset.path``; options from ``dataset.extra`` (module docstring)."""
    unknown = sorted(set(config.dataset.extra or {}) - set(OPTIONS))
    if unknown:
        raise ValueError(f"dataset.extra: unknown PointCloudFolder options {unknown}; known: {list(OPTIONS)}")
    splits = {split: option(config, split) for split in SPLITS if option(config, split) is not None}
    return PointCloudFolder(
        config.dataset.path,
        config.model.first_subsampling_dl,
        splits=splits,
        label_field=option(config, "label_field"),
        class_names=config.dataset.class_names,
        class_names_file=option(config, "class_names_file"),
        ignored_labels=option(config, "ignored_labels", ()),
        columns=option(config, "columns"),
        color_features=option(config, "color_features", "auto"),
        intensity_scale=float(option(config, "intensity_scale", 0.0)),
        needs_colors=config.dataset.in_features_dim in COLOR_DIMS,
        on_bad_file=config.dataset.on_bad_file,
    )
