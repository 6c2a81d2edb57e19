"""Semantic3D (reduced-8 / semantic-8) outdoor scans in their original text format.

    <root>/<scan>.txt       "x y z intensity r g b" per line (colours 0-255)
    <root>/<scan>.labels    one label per line, 0 (unlabelled, ignored) or 1..8; absent for test scans

(``<root>`` may also be the folder holding ``original_data/``.) As the original: labelled scans are
first grid-subsampled at 1 cm (this is their "full resolution" cloud), the original's two validation
scans are held out ("validation"), the other labelled scans are "train" and the unlabelled scans
"test" (kept at full resolution for the projection); intensity is not used (though, as every value,
it must be finite). ``on_bad_file="skip"`` leaves out the scans whose text or label file is bad.
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
    read_table,
    subsample,
)

CLASSES = [
    "man-made terrain",
    "natural terrain",
    "high vegetation",
    "low vegetation",
    "buildings",
    "hard scape",
    "scanning artefacts",
    "cars",
]
# Original label values: 0 is "unlabeled" and ignored; 1..8 are CLASSES.
LABELS = label_map(range(9), ignored=(0,))
# The sorted training scans the original holds out (its all_splits entries equal to validation_split).
VALIDATION = ("domfountain_station1_xyz_intensity_rgb", "untermaederbrunnen_station3_xyz_intensity_rgb")
PRESAMPLE_DL = 0.01
COLUMNS = ("x", "y", "z", "intensity", "red", "green", "blue")
LAYOUT = "<root>/<scan>.txt with 'x y z intensity r g b' lines, <root>/<scan>.labels (training scans)"


class Semantic3D(SceneDataset):
    """Semantic3D scans, 8 classes; ``validation_clouds`` names the held-out labelled scans."""

    name = "Semantic3D"
    label_names = list(CLASSES)
    has_colors = True
    version = 1

    def __init__(
        self,
        root,
        first_subsampling_dl: float = 0.06,
        validation_clouds: Sequence[str] = VALIDATION,
        on_bad_file: str = "error",
    ):
        if not first_subsampling_dl > PRESAMPLE_DL:
            raise ValueError(
                f"first_subsampling_dl must be > {PRESAMPLE_DL} (scans are presampled at 1 cm), "
                f"got {first_subsampling_dl}"
            )
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        root = require_dir(root, LAYOUT)
        self.root = root / "original_data" if (root / "original_data").is_dir() else root
        self.dl = float(first_subsampling_dl)
        self.files = sorted(self.root.glob("*.txt"))
        if not self.files:
            raise DatasetError(f"no <scan>.txt file in {str(self.root)!r}; expected layout: {LAYOUT}")
        self.validation_clouds = sorted(validation_clouds)
        self._scenes: dict[str, list[Scene]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "validation": self.validation_clouds}

    def _split_of(self, path: Path) -> str:
        if not path.with_suffix(".labels").is_file():
            return "test"
        return "validation" if path.stem in self.validation_clouds else "train"

    def scenes(self, split: str) -> list[Scene]:
        check_split(split, ("train", "validation", "test"))
        if split not in self._scenes:
            files = [f for f in self.files if self._split_of(f) == split]
            if not files:
                rule = {
                    "train": "labelled scans (<scan>.labels) outside the validation scans",
                    "validation": (
                        f"labelled scans named {self.validation_clouds} (dataset.extra.validation_clouds)"
                    ),
                    "test": "unlabelled scans (no <scan>.labels)",
                }[split]
                raise DatasetError(f"no {split} scan in {str(self.root)!r}: the split takes {rule}")
            key = {
                "root": str(self.root.resolve()),
                "files": [f.name for f in files],
                "version": self.version,
            }
            reads = SplitReads(self.on_bad_file, split, "scans")
            self._scenes[split] = cached_scenes(
                self.name,
                split,
                self.dl,
                key,
                files,
                lambda path: reads.read(self._read, path),
                keep_full=split != "train",
                reads=reads,
            )
            reads.finish(len(self._scenes[split]))
        return self._scenes[split]

    def _read(self, path: Path):
        data = read_table(path, 7, names=COLUMNS)
        points = data[:, :3]
        # The original stores colours as uint8 before averaging them.
        colors = np.clip(data[:, 4:7], 0, 255).astype(np.uint8).astype(np.float32) / 255
        label_file = path.with_suffix(".labels")
        if not label_file.is_file():
            return path.stem, points, colors, None
        raw = read_table(label_file, 1, names=["label"])[:, 0]
        if len(raw) != len(points):
            raise DatasetError(f"{label_file}: {len(raw)} labels for the {len(points)} points of {path.name}")
        labels = map_labels(raw, LABELS, label_file)
        points, colors, labels = subsample(points, PRESAMPLE_DL, features=colors, labels=labels)
        return path.stem, points, colors, labels


def from_config(config) -> Semantic3D:
    """Semantic3D at ``config.dataset.path``; ``dataset.extra['validation_clouds']`` overrides the
    original's held-out scans."""
    return Semantic3D(
        config.dataset.path,
        config.model.first_subsampling_dl,
        validation_clouds=option(config, "validation_clouds", VALIDATION),
        on_bad_file=config.dataset.on_bad_file,
    )
