"""What every dataset hands to the pipeline: object clouds or scenes, already subsampled and cached.

Object datasets (classification, part segmentation) return ``ObjectCloud`` lists per split; scene
datasets (S3DIS, Scannet, Semantic3D, NPM3D, the embedded rooms) return ``Scene`` lists, from which
the pipeline cuts spheres. Labels are always indices into ``label_names`` (the classes the network
predicts); points whose original label is ignored (e.g. "unclassified") carry -1.

Caches live in ``cache_root() / <dataset> / ...``, never in the dataset or working directory.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kpconv_tf.cache import cache_home


class DatasetError(ValueError):
    """A dataset root, file or label is missing or malformed; the message names the path."""


def cache_root() -> Path:
    """``$KPCONV_TF_CACHE/datasets`` (default ``~/.cache/kpconv_tf/datasets``)."""
    return cache_home() / "datasets"


def discard_cache(path: Path, err: Exception) -> None:
    """Deletes the unusable cache file ``path`` after a one-line warning on stderr naming it."""
    print(
        f"warning: cannot use the cache file {path} ({type(err).__name__}: {err}); "
        "deleting and rebuilding it",
        file=sys.stderr,
        flush=True,
    )
    Path(path).unlink(missing_ok=True)


def require_dir(path, layout: str) -> Path:
    """Returns ``path`` as a Path, or raises DatasetError naming it and the expected ``layout``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset root {str(path)!r} does not exist; expected layout: {layout}")
    return path


@dataclass
class ObjectCloud:
    """One object, subsampled at ``first_subsampling_dl``.

    points: float32 [n, 3]; normals: float32 [n, 3] or None; label: the object's class index
    (classification) or category index (part segmentation); point_labels: int32 [n] part labels
    (0..num_parts[label]-1 for multi-category part segmentation) or None; name: a stable id.
    """

    points: np.ndarray
    normals: np.ndarray | None
    label: int
    point_labels: np.ndarray | None = None
    name: str = ""


@dataclass
class Scene:
    """One scene (room, scan), subsampled at ``first_subsampling_dl``.

    points: float32 [n, 3] in metres; colors: float32 [n, 3] in [0, 1] (zeros when the dataset has
    none); labels: int32 [n] class indices, -1 for ignored points, or None for unlabelled scenes;
    tree: a ``sklearn.neighbors.KDTree`` over ``points``; projection: int32 [m], for every point of
    the full-resolution cloud the index of its nearest subsampled point (test reprojection), or
    None; full_labels: int32 [m] labels of the full cloud (same convention) or None.
    ``full_points()`` loads the full-resolution points float32 [m, 3] (for writing predictions).
    """

    name: str
    points: np.ndarray
    colors: np.ndarray
    labels: np.ndarray | None
    tree: object
    projection: np.ndarray | None = None
    full_labels: np.ndarray | None = None
    full_points_loader: object | None = None

    def full_points(self) -> np.ndarray:
        if self.full_points_loader is None:
            raise DatasetError(f"scene {self.name!r} keeps no full-resolution cloud")
        return self.full_points_loader()


class ObjectDataset:
    """Base of object datasets. Subclasses set the attributes and implement ``clouds``.

    Attributes:
        name: e.g. "ModelNet40".
        task: "classification" | "segmentation" (one category) | "multi_segmentation".
        label_names: class names (classification) or object category names (part segmentation).
        num_parts: parts per category (part segmentation), else None.
        part_names: optional part names per category.
    """

    name = ""
    task = "classification"
    label_names: list[str] = []
    num_parts: list[int] | None = None

    def clouds(self, split: str) -> list[ObjectCloud]:
        """Clouds of ``split`` ("train" | "test"), subsampled and cached; empty clouds skipped."""
        raise NotImplementedError


class SceneDataset:
    """Base of scene datasets. Subclasses set the attributes and implement ``scenes``.

    Attributes:
        name: e.g. "S3DIS".
        label_names: the predicted classes (ignored original labels excluded).
        has_colors: whether ``Scene.colors`` carries real colours.
    """

    name = ""
    task = "scene_segmentation"
    label_names: list[str] = []
    has_colors = True

    def scenes(self, split: str) -> list[Scene]:
        """Scenes of ``split`` ("train" | "validation" | "test"), subsampled and cached."""
        raise NotImplementedError


def skip_empty(name: str, points: np.ndarray) -> bool:
    """True (and a warning naming the cloud) when ``points`` is empty."""
    if len(points) == 0:
        warnings.warn(f"skipping empty cloud {name}", stacklevel=2)
        return True
    return False
