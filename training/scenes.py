"""Scene machinery: spheres cut from scenes, potentials, probability voting and prediction files.

The original release cuts spheres of ``in_radius`` around picked points of the subsampled scene
(``datasets/S3DIS.py`` and siblings) and, at test time, smooths the network's probabilities per
subsampled point with a running average before reprojecting them to the full-resolution cloud
(``utils/tester.py``). Everything here is numpy / scikit-learn; the tf.data pipeline wraps it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets.base import Scene


@dataclass
class SphereCrop:
    """One sphere cut from a scene.

    points: float32 [n, 3] relative to ``center`` (metres); colors: float32 [n, 3];
    heights: float32 [n] absolute z of the points in the scene (the original's height feature);
    labels: int32 [n] or None (unlabelled scene); input_indices: int32 [n] indices into
    ``scene.points``; scene_index: the scene's index in the sampler's list; center: float32 [3] the
    sphere centre (picked point plus noise) in scene coordinates.
    """

    points: np.ndarray
    colors: np.ndarray
    heights: np.ndarray
    labels: np.ndarray | None
    input_indices: np.ndarray
    scene_index: int
    center: np.ndarray


def _check_scenes(scenes) -> list[Scene]:
    scenes = list(scenes)
    if not scenes:
        raise ValueError("scenes must hold at least one Scene")
    for i, scene in enumerate(scenes):
        if not isinstance(scene, Scene):
            raise TypeError(f"scenes[{i}] must be a Scene, got {type(scene).__name__}")
        if len(scene.points) == 0:
            raise ValueError(f"scenes[{i}] ({scene.name!r}) has no points")
    return scenes


class SphereSampler:
    """Picks spheres of ``in_radius`` in a list of scenes.

    mode "potentials" (the original's generator for every split): every subsampled point starts with
    a potential uniform in [0, 1e-3); the centre is the point of lowest potential in the scene whose
    minimum potential is lowest, moved by Gaussian noise of std ``in_radius / 10``; the points of the
    sphere then get ``(1 - d^2 / r^2)^2`` added to their potential, so spheres sweep the scenes
    regularly and ``min_potential()`` counts how often every point has been (well) covered.
    mode "random": a uniformly random scene and point as centre, with the same noise, no potentials.

    ``max_points`` replays the original's guard for very dense areas: a sphere with more points
    keeps a random ``max_points - 1`` of them (after the potentials were updated with all of them).
    """

    MODES = ("random", "potentials")

    def __init__(
        self,
        scenes: Sequence[Scene],
        in_radius: float,
        mode: str = "potentials",
        seed: int = 0,
        max_points: int | None = None,
    ):
        self.scenes = _check_scenes(scenes)
        if not in_radius > 0:
            raise ValueError(f"in_radius must be > 0, got {in_radius}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if max_points is not None and max_points < 2:
            raise ValueError(f"max_points must be >= 2 or None, got {max_points}")
        self.in_radius = float(in_radius)
        self.mode = mode
        self.max_points = max_points
        self.rng = np.random.default_rng(seed)
        self.potentials = [self.rng.random(len(s.points)) * 1e-3 for s in self.scenes]
        self._min_potentials = np.array([p.min() for p in self.potentials])

    def min_potential(self) -> float:
        """Lowest potential over all scenes (potentials mode; 0 coverage in random mode)."""
        return float(self._min_potentials.min())

    def sample(self) -> SphereCrop:
        if self.mode == "potentials":
            scene_index = int(np.argmin(self._min_potentials))
            point_index = int(np.argmin(self.potentials[scene_index]))
        else:
            scene_index = int(self.rng.integers(len(self.scenes)))
            point_index = int(self.rng.integers(len(self.scenes[scene_index].points)))
        scene = self.scenes[scene_index]
        points = scene.points
        center = points[point_index].astype(np.float64)
        noise = self.rng.normal(scale=self.in_radius / 10, size=3)
        pick = center + noise
        indices = scene.tree.query_radius(pick[None], r=self.in_radius)[0]
        if len(indices) == 0:
            # Noise of ten standard deviations: fall back to the picked point itself.
            pick = center
            indices = scene.tree.query_radius(pick[None], r=self.in_radius)[0]
        if self.mode == "potentials":
            d2 = np.sum(np.square(points[indices] - pick), axis=1)
            r2 = self.in_radius**2
            weights = np.square(1 - d2 / r2)
            weights[d2 > r2] = 0
            self.potentials[scene_index][indices] += weights
            self._min_potentials[scene_index] = self.potentials[scene_index].min()
        if self.max_points is not None and len(indices) > self.max_points:
            indices = self.rng.choice(indices, size=self.max_points - 1, replace=False)
        indices = indices.astype(np.int32)
        return SphereCrop(
            points=(points[indices] - pick).astype(np.float32),
            colors=scene.colors[indices].astype(np.float32),
            heights=points[indices, 2].astype(np.float32),
            labels=None if scene.labels is None else scene.labels[indices].astype(np.int32),
            input_indices=indices,
            scene_index=scene_index,
            center=pick.astype(np.float32),
        )

    def get_state(self) -> dict[str, object]:
        """RNG state and potentials (copies) for an exact resume with ``set_state``."""
        return {"rng": self.rng.bit_generator.state, "potentials": [p.copy() for p in self.potentials]}

    def set_state(self, state: dict[str, object]) -> None:
        potentials = [np.asarray(p, np.float64) for p in state["potentials"]]
        if [len(p) for p in potentials] != [len(s.points) for s in self.scenes]:
            raise ValueError("state['potentials'] does not match the sampler's scenes")
        self.rng.bit_generator.state = state["rng"]
        self.potentials = [p.copy() for p in potentials]
        self._min_potentials = np.array([p.min() for p in self.potentials])


# The original's scene input features by in_features_dim: columns in order (rgb is 3 wide, xyz the
# centred crop points, height the absolute z).
SCENE_FEATURES = {
    1: ("ones",),
    2: ("ones", "height"),
    3: ("rgb",),
    4: ("ones", "rgb"),
    5: ("ones", "rgb", "height"),
    7: ("ones", "rgb", "xyz"),
}


def scene_feature_columns(in_features_dim: int) -> tuple[str, ...]:
    if in_features_dim not in SCENE_FEATURES:
        raise ValueError(
            f"dataset.in_features_dim must be one of {sorted(SCENE_FEATURES)} for scenes, "
            f"got {in_features_dim}"
        )
    return SCENE_FEATURES[in_features_dim]


def features_for(
    crop: SphereCrop,
    in_features_dim: int,
    points: np.ndarray | None = None,
    colors: np.ndarray | None = None,
) -> np.ndarray:
    """The original's scene input features (``SCENE_FEATURES``), float32 [n, in_features_dim].

    ``points`` / ``colors`` replace the crop's when given (the original uses the augmented points
    for xyz and the colours after colour dropping).
    """
    parts = {
        "ones": np.ones((len(crop.points), 1), np.float32),
        "rgb": crop.colors if colors is None else colors,
        "height": crop.heights[:, None],
        "xyz": crop.points if points is None else points,
    }
    columns = scene_feature_columns(in_features_dim)
    return np.concatenate([parts[c] for c in columns], axis=1).astype(np.float32)


class SceneVoter:
    """Running average of predicted probabilities per subsampled point (the original's test votes).

    Each vote does ``p[i] = smoothing * p[i] + (1 - smoothing) * probs`` for the sphere's points,
    starting from zeros, as ``utils/tester.py`` does with ``test_smooth = 0.98``.
    """

    def __init__(self, scenes: Sequence[Scene], num_classes: int, smoothing: float = 0.98):
        self.scenes = _check_scenes(scenes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.num_classes = int(num_classes)
        self.smoothing = float(smoothing)
        self.probs = [np.zeros((len(s.points), num_classes), np.float32) for s in self.scenes]

    def update(self, scene_index: int, input_indices: np.ndarray, probs: np.ndarray) -> None:
        """Adds one sphere's probabilities float [n, C] for the points ``input_indices`` int [n]."""
        if not 0 <= scene_index < len(self.scenes):
            raise IndexError(f"scene_index {scene_index} out of range [0, {len(self.scenes)})")
        input_indices = np.asarray(input_indices)
        probs = np.asarray(probs, np.float32)
        if probs.shape != (len(input_indices), self.num_classes):
            raise ValueError(
                f"probs must have shape [{len(input_indices)}, {self.num_classes}], got {list(probs.shape)}"
            )
        target = self.probs[scene_index]
        target[input_indices] = self.smoothing * target[input_indices] + (1 - self.smoothing) * probs

    def predictions(self, scene_index: int) -> np.ndarray:
        """int32 [n] class of every subsampled point."""
        return np.argmax(self.probs[scene_index], axis=1).astype(np.int32)

    def full_probabilities(self, scene_index: int) -> np.ndarray:
        """float32 [m, C] probabilities reprojected to the full cloud (subsampled if no projection)."""
        projection = self.scenes[scene_index].projection
        probs = self.probs[scene_index]
        return probs if projection is None else probs[projection]

    def full_predictions(self, scene_index: int) -> np.ndarray:
        """int32 [m] class of every full-resolution point (subsampled points if no projection)."""
        return np.argmax(self.full_probabilities(scene_index), axis=1).astype(np.int32)


_SEMANTIC3D_SUFFIXES = ("_rgb_intensity", "_xyz_intensity_rgb", "_intensity_rgb")


def semantic3d_submission_name(scene_name: str) -> str:
    """The benchmark's ``.labels`` file name for a Semantic3D point file name (without extension).

    e.g. ``sg27_station10_intensity_rgb`` -> ``sg27_10.labels``,
    ``MarketplaceFeldkirch_Station4_rgb_intensity-reduced`` -> ``marketsquarefeldkirch4-reduced.labels``.
    """
    name = Path(scene_name).name
    if name.endswith(".ply") or name.endswith(".txt"):
        name = name[:-4]
    name = name.lower()
    for suffix in _SEMANTIC3D_SUFFIXES:
        name = name.replace(suffix, "")
    name = name.replace("marketplace", "marketsquare")
    # sg27 / sg28 keep an underscore before the station number, the other sites do not.
    name = re.sub(r"^(sg\d+)_station", r"\1_", name)
    name = name.replace("_station", "")
    return name + ".labels"


FORMATS = ("ply", "semantic3d", "npm3d")


def write_predictions(
    out_dir,
    scene: Scene,
    predictions: np.ndarray,
    label_names: Sequence[str],
    probs: np.ndarray | None = None,
    formats: Sequence[str] = ("ply",),
    potentials: np.ndarray | None = None,
) -> list[Path]:
    """Writes a scene's predicted classes, returns the written paths.

    ``predictions`` int [m] for the full-resolution cloud (``scene.full_points()``, needs
    ``scene.projection``) or int [n] for the subsampled points. Layout as the original tester:
    "ply" -> ``out_dir/predictions/<scene>.ply`` with x, y, z, preds (class index), labels (when the
    scene is labelled), pots (when ``potentials`` [same length] is given), and with ``probs`` [m, C]
    ``out_dir/probs/<scene>.ply`` with x, y, z and one column per class name;
    "semantic3d" -> ``predictions/<benchmark name>.labels``; "npm3d" -> ``predictions/<scene>.txt``;
    both one label per line, class index + 1 (label 0, "unclassified", is never predicted).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    predictions = np.asarray(predictions)
    if predictions.ndim != 1 or not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(
            f"predictions must be a 1-D integer array, got {predictions.dtype} {predictions.shape}"
        )
    if len(predictions) and (predictions.min() < 0 or predictions.max() >= len(label_names)):
        raise ValueError(f"predictions must lie in [0, {len(label_names)}) (label_names)")
    full = scene.projection is not None and len(predictions) == len(scene.projection)
    if full:
        points, labels = scene.full_points(), scene.full_labels
    elif len(predictions) == len(scene.points):
        points, labels = scene.points, scene.labels
    else:
        raise ValueError(
            f"predictions has {len(predictions)} entries; scene {scene.name!r} has "
            f"{len(scene.points)} subsampled points and "
            f"{None if scene.projection is None else len(scene.projection)} full-resolution points"
        )
    if len(points) != len(predictions):
        raise ValueError(
            f"scene {scene.name!r}: full_points() has {len(points)} points, projection {len(predictions)}"
        )
    for name, array in (("probs", probs), ("potentials", potentials)):
        if array is not None and len(array) != len(predictions):
            raise ValueError(f"{name} must have {len(predictions)} rows, got {len(array)}")
    if probs is not None and np.shape(probs)[1:] != (len(label_names),):
        raise ValueError(
            f"probs must have shape [{len(predictions)}, {len(label_names)}], got {np.shape(probs)}"
        )

    out_dir = Path(out_dir)
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    written = []
    predictions = predictions.astype(np.int32)
    if "ply" in formats:
        from utils.ply import write_ply

        xyz = {
            "x": points[:, 0].astype(np.float32),
            "y": points[:, 1].astype(np.float32),
            "z": points[:, 2].astype(np.float32),
        }
        fields = dict(xyz, preds=predictions)
        if labels is not None:
            fields["labels"] = np.asarray(labels, np.int32)
        if potentials is not None:
            fields["pots"] = np.asarray(potentials, np.float32)
        path = pred_dir / f"{scene.name}.ply"
        write_ply(path, fields)
        written.append(path)
        if probs is not None:
            prob_dir = out_dir / "probs"
            prob_dir.mkdir(parents=True, exist_ok=True)
            columns = ["_".join(str(n).split()) for n in label_names]
            if len(set(columns)) != len(columns) or set(columns) & set(xyz):
                raise ValueError(f"label_names must give distinct column names other than x, y, z: {columns}")
            probs = np.asarray(probs, np.float32)
            path = prob_dir / f"{scene.name}.ply"
            write_ply(path, dict(xyz, **{c: probs[:, i] for i, c in enumerate(columns)}))
            written.append(path)
    for fmt, name in (("semantic3d", semantic3d_submission_name(scene.name)), ("npm3d", f"{scene.name}.txt")):
        if fmt in formats:
            path = pred_dir / name
            np.savetxt(path, predictions + 1, fmt="%d")
            written.append(path)
    return written
