"""NPM3D / Paris-Lille-3D urban scans in their original PLY layout.

    <root>/training_points/<scan>.ply   vertices with x, y, z, reflectance and class (0 = unclassified)
    <root>/test_points/<scan>.ply       vertices with x, y, z, reflectance (no class)

As the original: the reflectance, clipped at 50 and divided by 50, is the per-point feature (it
fills the three ``Scene.colors`` channels; scans without it get zeros); class 0 is ignored; the
sorted training scan at index 1 (Lille1_2) is "validation", the others "train", and the test scans
"test". Scans are grid-subsampled and cached; validation and test keep their projection.
``on_bad_file="skip"`` leaves out the scans whose file is bad.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.datasets.base import DatasetError, Scene, SceneDataset, require_dir
from training.datasets.common import (
    SplitReads,
    cached_scenes,
    check_bad_file_policy,
    check_split,
    label_map,
    map_labels,
    option,
    read_ply_fields,
)

CLASSES = [
    "ground",
    "buildings",
    "poles",
    "bollards",
    "trash_cans",
    "barriers",
    "pedestrians",
    "cars",
    "natural",
]
# Original class values: 0 is "unclassified" and ignored; 1..9 are CLASSES.
LABELS = label_map(range(10), ignored=(0,))
VALIDATION = ("Lille1_2",)
MAX_REFLECTANCE = 50.0
LAYOUT = (
    "<root>/training_points/<scan>.ply (x, y, z, reflectance, class), "
    "<root>/test_points/<scan>.ply (x, y, z, reflectance)"
)


class NPM3D(SceneDataset):
    """Paris-Lille-3D scans, 9 classes; ``validation_clouds`` names the held-out training scans."""

    name = "NPM3D"
    label_names = list(CLASSES)
    has_colors = True  # the reflectance, in every channel
    version = 1

    def __init__(
        self,
        root,
        first_subsampling_dl: float = 0.08,
        validation_clouds: Sequence[str] = VALIDATION,
        on_bad_file: str = "error",
    ):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        train_dir = self.root / "training_points"
        if not train_dir.is_dir():
            raise DatasetError(f"missing folder {str(train_dir)!r}; expected layout: {LAYOUT}")
        self.train_files = sorted(train_dir.glob("*.ply"))
        self.test_files = sorted((self.root / "test_points").glob("*.ply"))
        self.validation_clouds = sorted(validation_clouds)
        self._scenes: dict[str, list[Scene]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "validation": self.validation_clouds}

    def scenes(self, split: str) -> list[Scene]:
        check_split(split, ("train", "validation", "test"))
        if split not in self._scenes:
            if split == "test":
                files = self.test_files
            else:
                files = [
                    f
                    for f in self.train_files
                    if (f.stem in self.validation_clouds) == (split == "validation")
                ]
            if not files:
                rule = {
                    "train": "training_points/*.ply outside the validation scans",
                    "validation": f"training_points/<name>.ply for names {self.validation_clouds} "
                    "(dataset.extra.validation_clouds)",
                    "test": "test_points/*.ply",
                }[split]
                raise DatasetError(f"no {split} scan in {str(self.root)!r}: the split takes {rule}")
            key = {
                "root": str(self.root.resolve()),
                "files": [f.name for f in files],
                "version": self.version,
            }
            reads = SplitReads(self.on_bad_file, split)
            self._scenes[split] = cached_scenes(
                self.name,
                split,
                self.dl,
                key,
                files,
                lambda path: reads.read(self._read, path, split != "test"),
                keep_full=split != "train",
                reads=reads,
            )
            reads.finish(len(self._scenes[split]))
        return self._scenes[split]

    def _read(self, path: Path, labelled: bool):
        data = read_ply_fields(
            path, ["x", "y", "z"] + (["class"] if labelled else []), optional=["reflectance"]
        )
        points = np.stack([data["x"], data["y"], data["z"]], 1).astype(np.float32)
        reflectance = data.get("reflectance", np.zeros(len(points))).astype(np.float32)
        colors = np.repeat(np.minimum(reflectance, MAX_REFLECTANCE)[:, None] / MAX_REFLECTANCE, 3, axis=1)
        labels = map_labels(data["class"], LABELS, path) if labelled else None
        return path.stem, points, colors, labels


def from_config(config) -> NPM3D:
    """NPM3D at ``config.dataset.path``; ``dataset.extra['validation_clouds']`` overrides Lille1_2."""
    return NPM3D(
        config.dataset.path,
        config.model.first_subsampling_dl,
        validation_clouds=option(config, "validation_clouds", VALIDATION),
        on_bad_file=config.dataset.on_bad_file,
    )
