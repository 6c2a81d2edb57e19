"""ScanNet v2 indoor scans from the released meshes.

    <root>/scans/<scene>/<scene>_vh_clean_2.ply          mesh vertices: x, y, z, red, green, blue
    <root>/scans/<scene>/<scene>_vh_clean_2.labels.ply   the same vertices with a nyu40 ``label``
    <root>/scans/<scene>/<scene>.txt                     optional "axisAlignment = <16 numbers>"
    <root>/scans_test/<scene>/<scene>_vh_clean_2.ply     test meshes (unlabelled)
    <root>/scannetv2_val.txt (or scannet_v2_val.txt)     validation scene ids; optional
    <root>/scannetv2_train.txt, scannetv2_test.txt       training / test scene ids

Split rules of the original: "validation" is the validation list, "train" every other labelled scene
(or the training list when given), "test" the test scenes (test list, else every scene of
``scans_test``), unlabelled. Labels are nyu40 ids; the 20 benchmark classes are predicted, every
other id (0 included) is ignored. Scenes are aligned with their axisAlignment when given.

Simplification: the original samples the mesh faces densely (3 mm, then 1 cm grid) before the
subsampling; here the mesh vertices are the point cloud. The full-resolution cloud is the vertices
in both versions (the benchmark scores vertices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from training.datasets.base import DatasetError, Scene, SceneDataset, require_dir
from training.datasets.common import cached_scenes, check_split, map_labels, read_ply_fields

# nyu40 ids of the 20 ScanNet benchmark classes, in the original's order.
CLASS_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
CLASSES = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
           "counter", "desk", "curtain", "refridgerator", "shower curtain", "toilet", "sink", "bathtub",
           "otherfurniture"]
LABELS = {i: (CLASS_IDS.index(i) if i in CLASS_IDS else -1) for i in range(41)}
LAYOUT = ("<root>/scans/<scene>/<scene>_vh_clean_2.ply and _vh_clean_2.labels.ply, <root>/scannetv2_val.txt, "
          "optional <root>/scannetv2_train.txt, <root>/scans_test/<scene>/<scene>_vh_clean_2.ply")


def _read_list(path: Path) -> Optional[List[str]]:
    if not path.is_file():
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _alignment(path: Path) -> Optional[np.ndarray]:
    """The 4x4 axisAlignment of a scene's meta file, or None."""
    if not path.is_file():
        return None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.replace("=", " ").split()
            if words and words[0] == "axisAlignment":
                try:
                    return np.array([float(w) for w in words[1:]], np.float64).reshape(4, 4)
                except ValueError as err:
                    raise DatasetError(f"{path}: line {number}: axisAlignment needs 16 numbers") from err
    return None


class Scannet(SceneDataset):
    """ScanNet v2 scenes, 20 classes."""

    name = "Scannet"
    label_names = list(CLASSES)
    has_colors = True
    version = 1

    def __init__(self, root, first_subsampling_dl: float = 0.04):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        scans = self.root / "scans"
        if not scans.is_dir():
            raise DatasetError(f"missing folder {str(scans)!r}; expected layout: {LAYOUT}")
        val = _read_list(self.root / "scannetv2_val.txt") or _read_list(self.root / "scannet_v2_val.txt")
        if val is None:
            raise DatasetError(f"missing file {str(self.root / 'scannetv2_val.txt')!r}; expected layout: {LAYOUT}")
        train = _read_list(self.root / "scannetv2_train.txt")
        if train is None:
            train = sorted(d.name for d in scans.iterdir() if d.is_dir() and d.name not in set(val))
        test = _read_list(self.root / "scannetv2_test.txt")
        test_dir = self.root / "scans_test"
        if test is None:
            test = sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
        self.splits = {"train": sorted(train), "validation": sorted(val), "test": sorted(test)}
        self._scenes: Dict[str, List[Scene]] = {}

    def _folder(self, scene: str, labelled: bool) -> Path:
        if not labelled and (self.root / "scans_test" / scene).is_dir():
            return self.root / "scans_test" / scene
        return self.root / "scans" / scene

    def scenes(self, split: str) -> List[Scene]:
        check_split(split, ("train", "validation", "test"))
        if split not in self._scenes:
            key = {"root": str(self.root.resolve()), "scenes": self.splits[split], "version": self.version}
            self._scenes[split] = cached_scenes(self.name, split, self.dl, key, self.splits[split],
                                                lambda scene: self._read(scene, labelled=split != "test"),
                                                keep_full=split != "train")
        return self._scenes[split]

    def _read(self, scene: str, labelled: bool):
        folder = self._folder(scene, labelled)
        mesh = folder / f"{scene}_vh_clean_2.ply"
        data = read_ply_fields(mesh, ["x", "y", "z", "red", "green", "blue"])
        points = np.stack([data["x"], data["y"], data["z"]], 1).astype(np.float64)
        colors = np.stack([data["red"], data["green"], data["blue"]], 1).astype(np.float32) / 255
        align = _alignment(folder / f"{scene}.txt")
        if align is not None:
            points = points @ align[:3, :3].T + align[:3, 3]
        labels = None
        if labelled:
            label_file = folder / f"{scene}_vh_clean_2.labels.ply"
            raw = read_ply_fields(label_file, ["label"])["label"]
            if len(raw) != len(points):
                raise DatasetError(f"{label_file}: {len(raw)} vertices, {mesh.name} has {len(points)}")
            labels = map_labels(raw, LABELS, label_file)
        return scene, points.astype(np.float32), colors, labels


def from_config(config) -> Scannet:
    """Scannet at ``config.dataset.path``."""
    return Scannet(config.dataset.path, config.model.first_subsampling_dl)
