"""ModelNet40 classification in its ``modelnet40_normal_resampled`` layout.

    <root>/modelnet40_shape_names.txt        one class name per line
    <root>/modelnet40_train.txt, _test.txt   one shape id per line, e.g. airplane_0001
    <root>/<class>/<shape id>.txt            one "x,y,z,nx,ny,nz" line per point

Class names come from the shape-names file, so any dataset laid out this way works. Every shape is
grid-subsampled at ``first_subsampling_dl`` (normals averaged per cell, not renormalised, as the
original) and the result cached. ``on_bad_file="skip"`` leaves out the shapes whose file is bad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.datasets.base import DatasetError, ObjectCloud, ObjectDataset, require_dir, skip_empty
from training.datasets.common import (
    SplitReads,
    cache_file,
    check_bad_file_policy,
    check_split,
    load_or_build,
    read_table,
    subsample,
)

COLUMNS = ("x", "y", "z", "normal_x", "normal_y", "normal_z")
LAYOUT = (
    "<root>/modelnet40_shape_names.txt, <root>/modelnet40_{train,test}.txt listing shape ids "
    "(e.g. airplane_0001), <root>/<class>/<shape id>.txt with 'x,y,z,nx,ny,nz' lines"
)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing file {str(path)!r}; expected layout: {LAYOUT}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


class ModelNet40(ObjectDataset):
    """ModelNet40 (or any dataset in its layout): splits "train" and "test"."""

    name = "ModelNet40"
    task = "classification"
    version = 1

    def __init__(self, root, first_subsampling_dl: float = 0.02, on_bad_file: str = "error"):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        self.label_names = _read_lines(self.root / "modelnet40_shape_names.txt")
        if len(set(self.label_names)) != len(self.label_names):
            raise DatasetError(f"{self.root / 'modelnet40_shape_names.txt'}: class names must be distinct")
        self.num_parts = None
        self._clouds: dict[str, list[ObjectCloud]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "classes": self.label_names}

    def clouds(self, split: str) -> list[ObjectCloud]:
        check_split(split, ("train", "test"))
        if split not in self._clouds:
            path = cache_file(
                self.name,
                split,
                self.dl,
                {"root": str(self.root.resolve()), "classes": self.label_names, "version": self.version},
            )
            reads = SplitReads(self.on_bad_file, split)
            arrays = load_or_build(path, lambda: self._build(split, reads), reads)
            reads.finish(len(arrays["labels"]))
            bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
            self._clouds[split] = [
                ObjectCloud(
                    points=arrays["points"][a:b],
                    normals=arrays["normals"][a:b],
                    label=int(label),
                    name=str(name),
                )
                for a, b, label, name in zip(bounds[:-1], bounds[1:], arrays["labels"], arrays["names"])
            ]
        return self._clouds[split]

    def _read_shape(self, list_file: Path, shape: str) -> np.ndarray:
        """float32 [n, 6] (x, y, z, normal) of the shape ``shape`` listed in ``list_file``."""
        class_name = shape.rsplit("_", 1)[0]
        if class_name not in self.label_names:
            raise DatasetError(
                f"{list_file}: shape {shape!r} has class {class_name!r}, which is not in "
                f"modelnet40_shape_names.txt"
            )
        return read_table(self.root / class_name / f"{shape}.txt", 6, delimiter=",", names=COLUMNS)

    def _build(self, split: str, reads: SplitReads) -> dict[str, np.ndarray]:
        list_file = self.root / f"modelnet40_{split}.txt"
        index = {name: i for i, name in enumerate(self.label_names)}
        points, normals, labels, names = [], [], [], []
        for shape in _read_lines(list_file):
            data = reads.read(self._read_shape, list_file, shape)
            if data is None or skip_empty(shape, data):
                continue
            class_name = shape.rsplit("_", 1)[0]
            sub_points, sub_normals = subsample(data[:, :3], self.dl, features=data[:, 3:])
            points.append(sub_points)
            normals.append(sub_normals)
            labels.append(index[class_name])
            names.append(shape)
        return {
            "points": np.concatenate(points) if points else np.zeros((0, 3), np.float32),
            "normals": np.concatenate(normals) if normals else np.zeros((0, 3), np.float32),
            "lengths": np.array([len(p) for p in points], np.int64),
            "labels": np.array(labels, np.int32),
            "names": np.array(names, dtype=str),
        }


def from_config(config) -> ModelNet40:
    """ModelNet40 at ``config.dataset.path``, subsampled at ``config.model.first_subsampling_dl``."""
    return ModelNet40(config.dataset.path, config.model.first_subsampling_dl, config.dataset.on_bad_file)
