"""S3DIS indoor scene segmentation from the ``Stanford3dDataset_v1.2*`` annotation files.

    <root>/Area_N/<room>/Annotations/<class>_<k>.txt    "x y z r g b" per line (colours 0-255)

(``<root>`` may also be the folder holding one ``Stanford3dDataset_v1.2*`` directory.) As the
original, every Area is one scene merged from the annotation files of its rooms (room files are not
needed), the class is the file name less its ``_<k>`` ("stairs" counts as clutter when clutter is a
class and stairs is not), colours go to [0, 1], and the test area (default 5) is the "validation" and
"test" split, the other areas "train". Scenes are grid-subsampled and cached with their KD-tree; the
test area keeps the projection of its full cloud.

The classes are S3DIS's 13 when every annotation name of all areas is one of them; otherwise (one's
own scenes in this layout, e.g. forest plots of ground, tree, clutter) the sorted annotation names.
``class_names`` (``dataset.class_names``) fixes the list and its order instead, e.g. to add a class
that no file has yet; a file whose class is not listed is then a bad file.
``on_bad_file="skip"`` leaves out the annotation files that are bad (the rest of the area is kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.datasets.base import DatasetError, Scene, SceneDataset, require_dir
from training.datasets.common import (
    SplitReads,
    cached_scenes,
    check_bad_file_policy,
    check_split,
    option,
    read_table,
)

CLASSES = [
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "chair",
    "table",
    "bookcase",
    "sofa",
    "board",
    "clutter",
]
# Annotation names the original folds into a class.
ALIASES = {"stairs": "clutter"}
COLUMNS = ("x", "y", "z", "red", "green", "blue")
LAYOUT = (
    "<root>/Area_N/<room>/Annotations/<class>_<k>.txt with 'x y z r g b' lines"
    " (root may hold Stanford3dDataset_v1.2*)"
)


def _find_areas(root: Path) -> dict[int, Path]:
    def areas_in(folder):
        found = {}
        for child in folder.iterdir():
            if child.is_dir() and child.name.startswith("Area_") and child.name[5:].isdigit():
                found[int(child.name[5:])] = child
        return found

    areas = areas_in(root)
    if not areas:
        for child in sorted(root.glob("Stanford3dDataset_v1.2*")):
            if child.is_dir():
                areas = areas_in(child)
                if areas:
                    break
    if not areas:
        raise DatasetError(f"no Area_N folder in {str(root)!r}; expected layout: {LAYOUT}")
    return areas


def class_of(path: Path) -> str:
    """The class an annotation file name gives: ``<class>_<k>.txt`` -> ``<class>``."""
    name, _, number = path.stem.rpartition("_")
    return name if name and number.isdigit() else path.stem


class S3DIS(SceneDataset):
    """S3DIS-layout areas as scenes; ``test_area`` is held out ("validation" and "test").

    ``label_names``: the classes (see the module docstring), S3DIS's 13 for S3DIS's own files.
    """

    name = "S3DIS"
    has_colors = True
    version = 1

    def __init__(
        self,
        root,
        first_subsampling_dl: float = 0.04,
        test_area: int = 5,
        on_bad_file: str = "error",
        class_names: Sequence[str] = (),
    ):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        self.areas = _find_areas(self.root)
        self.test_area = int(test_area)
        if self.test_area not in self.areas:
            raise DatasetError(
                f"test area Area_{self.test_area} not found in {str(self.root)!r} "
                f"(found {[f'Area_{a}' for a in sorted(self.areas)]})"
            )
        self.label_names = self._classes(list(class_names))
        self._scenes: dict[str, list[Scene]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "test_area": self.test_area}

    def scenes(self, split: str) -> list[Scene]:
        check_split(split, ("train", "validation", "test"))
        held_out = split != "train"
        if held_out not in self._scenes:
            areas = [self.test_area] if held_out else [a for a in sorted(self.areas) if a != self.test_area]
            scenes = []
            reads = SplitReads(self.on_bad_file, split)
            for area in areas:
                key = {
                    "root": str(self.areas[area].resolve()),
                    "keep_full": held_out,
                    "version": self.version,
                    "classes": self.label_names,
                }
                scenes += cached_scenes(
                    self.name,
                    f"Area_{area}",
                    self.dl,
                    key,
                    [area],
                    lambda area: self._read_area(area, reads),
                    keep_full=held_out,
                    reads=reads,
                )
            reads.finish(len(scenes))
            self._scenes[held_out] = scenes
        return self._scenes[held_out]

    def _classes(self, class_names: list[str]) -> list[str]:
        if class_names:
            if len(set(class_names)) != len(class_names) or not all(class_names):
                raise ValueError(f"dataset.class_names must be distinct non-empty names, got {class_names}")
            return class_names
        found = {
            class_of(path) for folder in self.areas.values() for path in folder.glob("*/Annotations/*.txt")
        }
        if all(ALIASES.get(name, name) in CLASSES for name in found):
            return list(CLASSES)
        return sorted(found)

    def _read_annotation(self, path: Path):
        """(class index, float32 [n, 6] table) of one annotation file."""
        name = class_of(path)
        if name not in self.label_names:
            name = ALIASES.get(name, name)
        if name not in self.label_names:
            raise DatasetError(
                f"{path}: unknown class {class_of(path)!r} in the file name; classes: {self.label_names}"
            )
        return self.label_names.index(name), read_table(path, 6, names=COLUMNS)

    def _read_area(self, area: int, reads: SplitReads):
        folder = self.areas[area]
        points, colors, labels = [], [], []
        rooms = sorted(d for d in folder.iterdir() if (d / "Annotations").is_dir())
        if not rooms:
            warnings.warn(f"{folder} has no <room>/Annotations folder", stacklevel=2)
        for room in rooms:
            for path in sorted((room / "Annotations").glob("*.txt")):
                read = reads.read(self._read_annotation, path)
                if read is None:
                    continue
                label, data = read
                points.append(data[:, :3])
                # The original stores colours as uint8 before averaging them.
                colors.append(np.clip(data[:, 3:6], 0, 255).astype(np.uint8).astype(np.float32) / 255)
                labels.append(np.full(len(data), label, np.int32))
        if not points:
            return (
                folder.name,
                np.zeros((0, 3), np.float32),
                np.zeros((0, 3), np.float32),
                np.zeros(0, np.int32),
            )
        return folder.name, np.concatenate(points), np.concatenate(colors), np.concatenate(labels)


def from_config(config) -> S3DIS:
    """S3DIS at ``config.dataset.path``; the test area is ``dataset.extra['test_area']`` or
    ``dataset.split`` ("Area_5" or "5"), default 5; the classes ``dataset.class_names`` (empty: from
    the annotation file names)."""
    area = option(config, "test_area")
    if area is None and config.dataset.split:
        text = config.dataset.split[5:] if config.dataset.split.startswith("Area_") else config.dataset.split
        if not text.isdigit():
            raise ValueError(
                f"dataset.split must name the S3DIS test area (e.g. 'Area_5'), got {config.dataset.split!r}"
            )
        area = int(text)
    return S3DIS(
        config.dataset.path,
        config.model.first_subsampling_dl,
        test_area=5 if area is None else area,
        on_bad_file=config.dataset.on_bad_file,
        class_names=config.dataset.class_names,
    )
