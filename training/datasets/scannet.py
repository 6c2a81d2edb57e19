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

As the original, the mesh faces are sampled densely (``mesh_sampling``, 3 mm) and the samples
gridded at 1 cm, every cell taking the colour and label of its most voted nearest mesh vertex, before
the subsampling at ``first_subsampling_dl``; ``mesh_sampling=None`` (or a mesh without faces) uses the
vertices alone. The full-resolution cloud (projection, full labels) is the mesh vertices, which the
benchmark scores. ``on_bad_file="skip"`` leaves out the scenes whose mesh, label or meta file is bad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.datasets.base import DatasetError, Scene, SceneDataset, require_dir
from training.datasets.common import (
    SplitReads,
    cached_scenes,
    check_bad_file_policy,
    check_finite,
    check_split,
    map_labels,
    option,
    read_ply_fields,
    subsample,
)

# nyu40 ids of the 20 ScanNet benchmark classes, in the original's order.
CLASS_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
CLASSES = [
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "desk",
    "curtain",
    "refridgerator",
    "shower curtain",
    "toilet",
    "sink",
    "bathtub",
    "otherfurniture",
]
LABELS = {i: (CLASS_IDS.index(i) if i in CLASS_IDS else -1) for i in range(41)}
MESH_GRID = 0.01  # the original grids the face samples at 1 cm
_CHUNK_SAMPLES = 1 << 20
LAYOUT = (
    "<root>/scans/<scene>/<scene>_vh_clean_2.ply and _vh_clean_2.labels.ply, <root>/scannetv2_val.txt, "
    "optional <root>/scannetv2_train.txt, <root>/scans_test/<scene>/<scene>_vh_clean_2.ply"
)


def _read_list(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, spacing: float):
    """Points on the triangles, no farther than ``spacing`` apart along the longest side of each.

    Each face gets a regular barycentric grid of m = ceil(longest side / spacing) steps (its corners
    included). Returns points float32 [p, 3] and, per point, the index int64 [p] of the nearest
    (Euclidean) vertex of its face. Degenerate faces (a side under 1e-9) are skipped.
    """
    corners = vertices[faces].astype(np.float64)  # [F, 3, 3]
    sides = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2)
    keep = sides.min(1) > 1e-9
    faces, corners, sides = faces[keep], corners[keep], sides[keep]
    steps = np.maximum(np.ceil(sides.max(1) / spacing), 1).astype(np.int64)
    points, nearest = [], []
    for m in np.unique(steps):
        group = steps == m
        i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
        inside = i + j <= m
        bary = np.stack([i[inside], j[inside], m - i[inside] - j[inside]], 1) / m  # [K, 3]
        group_corners, group_faces = corners[group], faces[group]
        # Chunks of about a million samples bound the temporaries on real scans.
        step = max(1, _CHUNK_SAMPLES // len(bary))
        for start in range(0, len(group_faces), step):
            c = group_corners[start : start + step]
            p = np.einsum("kb,fbd->fkd", bary, c)  # [f, K, 3]
            d = ((p[:, :, None, :] - c[:, None, :, :]) ** 2).sum(3)  # [f, K, 3]
            points.append(p.reshape(-1, 3).astype(np.float32))
            nearest.append(
                np.take_along_axis(group_faces[start : start + step], d.argmin(2), axis=1).reshape(-1)
            )
    if not points:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    return np.concatenate(points), np.concatenate(nearest)


def _alignment(path: Path) -> np.ndarray | None:
    """The 4x4 axisAlignment of a scene's meta file, or None."""
    if not path.is_file():
        return None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.replace("=", " ").split()
            if words and words[0] == "axisAlignment":
                try:
                    align = np.array([float(w) for w in words[1:]], np.float64).reshape(4, 4)
                except ValueError as err:
                    raise DatasetError(f"{path}: line {number}: axisAlignment needs 16 numbers") from err
                if not np.all(np.isfinite(align)):
                    raise DatasetError(
                        f"{path}: line {number}: non-finite value in axisAlignment: {align.ravel().tolist()}"
                    )
                return align
    return None


class Scannet(SceneDataset):
    """ScanNet v2 scenes, 20 classes."""

    name = "Scannet"
    label_names = list(CLASSES)
    has_colors = True
    version = 1

    def __init__(
        self,
        root,
        first_subsampling_dl: float = 0.04,
        mesh_sampling: float | None = 0.003,
        on_bad_file: str = "error",
    ):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        if mesh_sampling is not None and not mesh_sampling > 0:
            raise ValueError(f"mesh_sampling must be > 0 or None, got {mesh_sampling}")
        self.mesh_sampling = None if mesh_sampling is None else float(mesh_sampling)
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        scans = self.root / "scans"
        if not scans.is_dir():
            raise DatasetError(f"missing folder {str(scans)!r}; expected layout: {LAYOUT}")
        val = _read_list(self.root / "scannetv2_val.txt")
        if val is None:
            val = _read_list(self.root / "scannet_v2_val.txt")  # the original's name
        if val is None:
            raise DatasetError(
                f"missing file {str(self.root / 'scannetv2_val.txt')!r}; expected layout: {LAYOUT}"
            )
        train = _read_list(self.root / "scannetv2_train.txt")
        if train is None:
            train = sorted(d.name for d in scans.iterdir() if d.is_dir() and d.name not in set(val))
        test = _read_list(self.root / "scannetv2_test.txt")
        test_dir = self.root / "scans_test"
        if test is None:
            test = sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
        self.splits = {"train": sorted(train), "validation": sorted(val), "test": sorted(test)}
        self._scenes: dict[str, list[Scene]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "splits": self.splits, "mesh": self.mesh_sampling}

    def _folder(self, scene: str, labelled: bool) -> Path:
        if not labelled and (self.root / "scans_test" / scene).is_dir():
            return self.root / "scans_test" / scene
        return self.root / "scans" / scene

    def scenes(self, split: str) -> list[Scene]:
        check_split(split, ("train", "validation", "test"))
        if split not in self._scenes:
            if not self.splits[split]:
                raise DatasetError(f"no {split} scene in {str(self.root)!r}; expected layout: {LAYOUT}")
            key = {
                "root": str(self.root.resolve()),
                "scenes": self.splits[split],
                "mesh": self.mesh_sampling,
                "version": self.version,
            }
            reads = SplitReads(self.on_bad_file, split, "scenes")
            self._scenes[split] = cached_scenes(
                self.name,
                split,
                self.dl,
                key,
                self.splits[split],
                lambda scene: reads.read(self._read, scene, split != "test"),
                keep_full=split != "train",
                reads=reads,
            )
            reads.finish(len(self._scenes[split]))
        return self._scenes[split]

    def _read(self, scene: str, labelled: bool):
        """The scene cloud: face samples (or vertices) with colours and labels, and the vertices."""
        vertices, faces, colors, labels = self._read_mesh(scene, labelled)
        if self.mesh_sampling is None or len(faces) == 0:
            return scene, vertices, colors, labels, None
        samples, nearest = sample_mesh(vertices, faces, self.mesh_sampling)
        cells, votes = subsample(samples, MESH_GRID, labels=nearest.astype(np.int32))
        cloud = (cells, colors[votes], None if labels is None else labels[votes])
        return scene, *cloud, (vertices, labels)

    def _read_mesh(self, scene: str, labelled: bool):
        from utils.ply import PlyError, read_ply_triangles

        folder = self._folder(scene, labelled)
        mesh = folder / f"{scene}_vh_clean_2.ply"
        if not mesh.is_file():
            raise DatasetError(f"missing file {str(mesh)!r}; expected layout: {LAYOUT}")
        try:
            data, faces = read_ply_triangles(mesh)
        except PlyError as err:
            raise DatasetError(str(err)) from err
        missing = [k for k in ("x", "y", "z", "red", "green", "blue") if k not in data.dtype.names]
        if missing:
            raise DatasetError(f"{mesh}: vertex properties {missing} are missing")
        check_finite(mesh, {k: data[k] for k in ("x", "y", "z", "red", "green", "blue")})
        if faces.size and (faces.min() < 0 or faces.max() >= len(data)):
            raise DatasetError(f"{mesh}: face vertex indices outside [0, {len(data)})")
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
        return points.astype(np.float32), faces, colors, labels


def from_config(config) -> Scannet:
    """Scannet at ``config.dataset.path``; ``dataset.extra['mesh_sampling']`` (metres, or null for the
    vertices alone) overrides the original's 3 mm face sampling."""
    return Scannet(
        config.dataset.path,
        config.model.first_subsampling_dl,
        mesh_sampling=option(config, "mesh_sampling", 0.003),
        on_bad_file=config.dataset.on_bad_file,
    )
