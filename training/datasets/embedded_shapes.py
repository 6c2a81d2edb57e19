"""Embedded procedural object datasets: shape classification and part segmentation, no download.

Every shape is assembled from surface primitives (boxes, cylinders, spheres, cones, tori) with random
proportions, so classes differ by their parts and how they are arranged rather than by size or global
spread: several share most parts (a table, a shelf and a chair share thin boards; a lamp and a
mushroom share a stem; a mug, a bottle and a ring stand share round bodies). Each shape then gets a
random anisotropic stretch, a random size, a random vertical rotation and a small tilt, a random
point budget with a density gradient, and Gaussian noise. Generation is deterministic in
``seed`` and takes a few seconds; results are cached.

``EmbeddedShapes`` (classification, 12 classes) and ``EmbeddedParts`` (multi-category part
segmentation; the label of a point is the role of the primitive it was sampled on).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets.base import ObjectCloud, ObjectDataset, cache_root
from training.datasets.common import load_or_build

# ------------------------------------------------------------------------------------------------
# surface primitives: each returns (points [n, 3], normals [n, 3]) in a local frame, and its area


def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _box(rng, n, size):
    size = np.asarray(size, np.float64)
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]] * 2)
    face = rng.choice(6, size=n, p=areas / areas.sum())
    axis = face % 3
    sign = np.where(face < 3, 1.0, -1.0)
    points = (rng.random((n, 3)) - 0.5) * size
    points[np.arange(n), axis] = sign * size[axis] / 2
    normals = np.zeros((n, 3))
    normals[np.arange(n), axis] = sign
    return points, normals


def _box_area(size):
    x, y, z = size
    return 2 * (x * y + y * z + x * z)


def _cylinder(rng, n, radius, height, caps=True):
    side = 2 * np.pi * radius * height
    cap = np.pi * radius**2 if caps else 0.0
    on_side = rng.random(n) < side / (side + 2 * cap)
    theta = rng.random(n) * 2 * np.pi
    points = np.empty((n, 3))
    normals = np.zeros((n, 3))
    points[:, 0] = radius * np.cos(theta)
    points[:, 1] = radius * np.sin(theta)
    points[:, 2] = (rng.random(n) - 0.5) * height
    normals[:, 0], normals[:, 1] = np.cos(theta), np.sin(theta)
    caps_idx = np.flatnonzero(~on_side)
    r = radius * np.sqrt(rng.random(len(caps_idx)))
    points[caps_idx, 0] = r * np.cos(theta[caps_idx])
    points[caps_idx, 1] = r * np.sin(theta[caps_idx])
    top = rng.random(len(caps_idx)) < 0.5
    points[caps_idx, 2] = np.where(top, height / 2, -height / 2)
    normals[caps_idx] = 0
    normals[caps_idx, 2] = np.where(top, 1.0, -1.0)
    return points, normals


def _cylinder_area(radius, height, caps=True):
    return 2 * np.pi * radius * height + (2 * np.pi * radius**2 if caps else 0.0)


def _sphere(rng, n, radius, min_z=-1.0):
    normals = _unit(rng.normal(size=(n, 3)))
    normals[:, 2] = np.maximum(normals[:, 2], min_z)  # min_z > -1 squashes the bottom: domes
    normals = _unit(normals)
    return radius * normals, normals


def _cone(rng, n, radius, height):
    # Uniform on the lateral surface: the radius fraction is sqrt-distributed.
    t = np.sqrt(rng.random(n))
    theta = rng.random(n) * 2 * np.pi
    points = np.stack([t * radius * np.cos(theta), t * radius * np.sin(theta), height * (1 - t)], 1)
    normals = _unit(np.stack([height * np.cos(theta), height * np.sin(theta), np.full(n, radius)], 1))
    return points, normals


def _torus(rng, n, major, minor):
    # Rejection-free approximation: the density factor (R + r cos phi) is matched by resampling.
    u = rng.random(4 * n) * 2 * np.pi
    phi = rng.random(4 * n) * 2 * np.pi
    keep = rng.random(4 * n) < (major + minor * np.cos(phi)) / (major + minor)
    u, phi = u[keep][:n], phi[keep][:n]
    ring = np.stack([np.cos(u), np.sin(u), np.zeros_like(u)], 1)
    normals = ring * np.cos(phi)[:, None] + np.array([0, 0, 1.0]) * np.sin(phi)[:, None]
    points = major * ring + minor * normals
    return points, normals


@dataclass
class _Part:
    """A primitive placed in the shape frame: sampler(rng, n) -> (points, normals), its area,
    rotation [3, 3], translation [3] and the part role (label for part segmentation)."""

    sample: Callable
    area: float
    role: int
    rotation: np.ndarray = None
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _rot_x(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def box(size, role, offset=(0, 0, 0), rotation=None):
    return _Part(lambda rng, n: _box(rng, n, size), _box_area(size), role, rotation, offset)


def cylinder(radius, height, role, offset=(0, 0, 0), rotation=None, caps=True):
    return _Part(
        lambda rng, n: _cylinder(rng, n, radius, height, caps),
        _cylinder_area(radius, height, caps),
        role,
        rotation,
        offset,
    )


def sphere(radius, role, offset=(0, 0, 0), min_z=-1.0):
    area = 4 * np.pi * radius**2 * (1 + max(min_z, -1.0)) / 2 if min_z > -1 else 4 * np.pi * radius**2
    return _Part(lambda rng, n: _sphere(rng, n, radius, min_z), area, role, None, offset)


def cone(radius, height, role, offset=(0, 0, 0)):
    return _Part(
        lambda rng, n: _cone(rng, n, radius, height),
        np.pi * radius * np.hypot(radius, height),
        role,
        None,
        offset,
    )


def torus(major, minor, role, offset=(0, 0, 0), rotation=None):
    return _Part(
        lambda rng, n: _torus(rng, n, major, minor), 4 * np.pi**2 * major * minor, role, rotation, offset
    )


# ------------------------------------------------------------------------------------------------
# the classes: name -> (part names, builder(rng) -> list of parts)


def _legs(rng, positions, radius, height, z, role, square=False):
    parts = []
    for x, y in positions:
        if square:
            parts.append(box((2 * radius, 2 * radius, height), role, (x, y, z)))
        else:
            parts.append(cylinder(radius, height, role, (x, y, z)))
    return parts


def _table(rng):
    w, d, h = rng.uniform(0.9, 1.3), rng.uniform(0.5, 0.8), rng.uniform(0.6, 0.8)
    t = rng.uniform(0.04, 0.07)
    r = rng.uniform(0.03, 0.05)
    corners = [(sx * (w / 2 - 2 * r), sy * (d / 2 - 2 * r)) for sx in (-1, 1) for sy in (-1, 1)]
    return [box((w, d, t), 0, (0, 0, h))] + _legs(rng, corners, r, h, h / 2, 1, square=rng.random() < 0.5)


def _shelf(rng):
    # An open bookcase: two side panels, a back and 3-5 shelves; the shelves share the table's
    # thin horizontal boards, the sides the panels of an arch.
    w, d, h = rng.uniform(0.6, 1.0), rng.uniform(0.25, 0.4), rng.uniform(0.9, 1.4)
    t = rng.uniform(0.03, 0.05)
    parts = [
        box((t, d, h), 0, (-w / 2, 0, h / 2)),
        box((t, d, h), 0, (w / 2, 0, h / 2)),
        box((w, t, h), 0, (0, d / 2, h / 2)),
    ]
    levels = int(rng.integers(3, 6))
    for z in np.linspace(t / 2, h - t / 2, levels):
        parts.append(box((w, d, t), 1, (0, 0, z)))
    return parts


def _chair(rng):
    w, h = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.5)
    back = rng.uniform(0.4, 0.6)
    leg = rng.uniform(0.025, 0.04)
    corners = [(sx * (w / 2 - leg), sy * (w / 2 - leg)) for sx in (-1, 1) for sy in (-1, 1)]
    return (
        [box((w, w, 0.05), 0, (0, 0, h))]
        + _legs(rng, corners, leg, h, h / 2, 1, square=True)
        + [box((w, 0.04, back), 2, (0, w / 2 - 0.02, h + back / 2))]
    )


def _lamp(rng):
    h = rng.uniform(0.8, 1.2)
    base = rng.uniform(0.15, 0.25)
    shade_r, shade_h = rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.3)
    return [
        cylinder(base, 0.04, 0, (0, 0, 0.02)),
        cylinder(rng.uniform(0.015, 0.03), h, 1, (0, 0, h / 2), caps=False),
        cone(shade_r, shade_h, 2, (0, 0, h - shade_h * 0.4)),
    ]


def _mug(rng):
    r, h = rng.uniform(0.25, 0.35), rng.uniform(0.5, 0.8)
    handle = rng.uniform(0.12, 0.18)
    return [
        cylinder(r, h, 0, (0, 0, h / 2)),
        torus(handle, rng.uniform(0.025, 0.04), 1, (r + handle * 0.7, 0, h / 2), _rot_x(np.pi / 2)),
    ]


def _bottle(rng):
    r, h = rng.uniform(0.2, 0.3), rng.uniform(0.6, 0.9)
    neck_h = rng.uniform(0.2, 0.35)
    return [
        cylinder(r, h, 0, (0, 0, h / 2)),
        cone(r, r * 0.8, 0, (0, 0, h)),
        cylinder(r * rng.uniform(0.25, 0.4), neck_h, 1, (0, 0, h + r * 0.5 + neck_h / 2)),
    ]


def _dumbbell(rng):
    length = rng.uniform(0.8, 1.2)
    r = rng.uniform(0.15, 0.25)
    return [
        sphere(r, 0, (-length / 2, 0, 0)),
        sphere(r * rng.uniform(0.9, 1.1), 0, (length / 2, 0, 0)),
        cylinder(rng.uniform(0.03, 0.05), length, 1, (0, 0, 0), _rot_y90(), caps=False),
    ]


def _rot_y90():
    return np.array([[0, 0, 1.0], [0, 1, 0], [-1, 0, 0]])


def _snowman(rng):
    r1 = rng.uniform(0.3, 0.4)
    r2 = r1 * rng.uniform(0.6, 0.75)
    r3 = r2 * rng.uniform(0.6, 0.75)
    z2 = r1 + r2 * 0.8
    parts = [sphere(r1, 0, (0, 0, 0)), sphere(r2, 1, (0, 0, z2))]
    if rng.random() < 0.7:
        parts.append(sphere(r3, 2, (0, 0, z2 + r2 * 0.8 + r3 * 0.8)))
    return parts


def _mushroom(rng):
    stem_h = rng.uniform(0.4, 0.7)
    cap = rng.uniform(0.35, 0.5)
    return [
        cylinder(rng.uniform(0.08, 0.14), stem_h, 0, (0, 0, stem_h / 2), caps=False),
        sphere(cap, 1, (0, 0, stem_h - cap * 0.2), min_z=0.0),
    ]


def _arch(rng):
    gap, h = rng.uniform(0.5, 0.9), rng.uniform(0.7, 1.0)
    s = rng.uniform(0.12, 0.2)
    return [
        box((s, s, h), 0, (-gap / 2 - s / 2, 0, h / 2)),
        box((s, s, h), 0, (gap / 2 + s / 2, 0, h / 2)),
        box((gap + 2 * s, s, s), 1, (0, 0, h + s / 2)),
    ]


def _cross(rng):
    length = rng.uniform(0.9, 1.3)
    s = rng.uniform(0.08, 0.14)
    return [box((length, s, s), 0), box((s, length, s), 0), box((s, s, length * rng.uniform(0.6, 1.0)), 1)]


def _ring_stand(rng):
    # A torus standing on a small box: the torus alone is the mug's handle, the box a stool's seat.
    major = rng.uniform(0.3, 0.45)
    base = rng.uniform(0.25, 0.4)
    return [
        box((base, base, 0.08), 0, (0, 0, 0.04)),
        torus(major, rng.uniform(0.04, 0.07), 1, (0, 0, 0.08 + major), _rot_x(np.pi / 2)),
    ]


SHAPES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "table": (("top", "leg"), _table),
    "shelf": (("frame", "shelf"), _shelf),
    "chair": (("seat", "leg", "back"), _chair),
    "lamp": (("base", "pole", "shade"), _lamp),
    "mug": (("body", "handle"), _mug),
    "bottle": (("body", "neck"), _bottle),
    "dumbbell": (("weight", "bar"), _dumbbell),
    "snowman": (("bottom", "middle", "head"), _snowman),
    "mushroom": (("stem", "cap"), _mushroom),
    "arch": (("pillar", "beam"), _arch),
    "cross": (("bar", "post"), _cross),
    "ring_stand": (("base", "ring"), _ring_stand),
}


def sample_shape(
    name: str,
    rng: np.random.Generator,
    points_range=(1500, 4000),
    noise_range=(0.002, 0.01),
    size_range=(0.5, 1.0),
    stretch_range=(0.5, 2.0),
    max_tilt=0.15,
):
    """One procedural shape: (points float32 [n, 3], normals float32 [n, 3], part roles int32 [n]).

    The shape is stretched along each axis by a factor in ``stretch_range`` (so that global
    proportions overlap between classes), centred, scaled to a size in ``size_range`` (the
    geometric mean of its bounding radius and of the radius of a sphere of the same area), rotated
    about the vertical by a random angle and tilted by up to ``max_tilt`` radians. Points are spread
    over the primitives by area with a density gradient along a random direction, then noised.
    """
    _, builder = SHAPES[name]
    parts = builder(rng)
    n_total = int(rng.integers(*points_range))
    # Oversample, then thin with a linear density gradient so density varies within a shape.
    areas = np.array([p.area for p in parts])
    counts = rng.multinomial(2 * n_total, areas / areas.sum())
    points, normals, roles = [], [], []
    for part, count in zip(parts, counts):
        if count == 0:
            continue
        p, nrm = part.sample(rng, int(count))
        if part.rotation is not None:
            p, nrm = p @ part.rotation.T, nrm @ part.rotation.T
        points.append(p + np.asarray(part.offset))
        normals.append(nrm)
        roles.append(np.full(len(p), part.role, np.int32))
    points, normals, roles = np.concatenate(points), np.concatenate(normals), np.concatenate(roles)
    stretch = rng.uniform(*stretch_range, size=3)
    points = points * stretch
    normals = _unit(normals / stretch)
    points -= (points.max(0) + points.min(0)) / 2
    # Half of the size comes from the bounding sphere, half from the surface area, so that neither
    # the extent nor the number of subsampled points identifies a class.
    radius = np.linalg.norm(points, axis=1).max()
    area = sum(p.area for p in parts) * np.prod(stretch) ** (2 / 3)
    points *= rng.uniform(*size_range) / np.sqrt(radius * np.sqrt(area / (4 * np.pi)))
    direction = _unit(rng.normal(size=(1, 3)))[0]
    along = points @ direction
    weight = 1.0 + rng.uniform(0.0, 0.8) * (along - along.min()) / max(np.ptp(along), 1e-9)
    keep = rng.random(len(points)) < weight / weight.max()
    # A random subset: the points are grouped by part, so a prefix would drop the last parts.
    keep_idx = np.sort(rng.permutation(np.flatnonzero(keep))[:n_total])
    points, normals, roles = points[keep_idx], normals[keep_idx], roles[keep_idx]
    tilt_axis = _rot_z(rng.uniform(0, 2 * np.pi))
    rotation = _rot_z(rng.uniform(0, 2 * np.pi)) @ tilt_axis @ _rot_x(rng.uniform(0, max_tilt)) @ tilt_axis.T
    points, normals = points @ rotation.T, normals @ rotation.T
    points += rng.normal(scale=rng.uniform(*noise_range), size=points.shape)
    return points.astype(np.float32), normals.astype(np.float32), roles


class EmbeddedObjectDataset(ObjectDataset):
    """Shared generation and caching of the embedded object datasets.

    Subclasses set ``name``, ``version``, ``catalogue`` (class name -> (part names, builder)) and may
    override ``samples``; clouds are grid-subsampled at ``first_subsampling_dl`` and cached.
    """

    version = 3
    catalogue = SHAPES

    def __init__(self, first_subsampling_dl=0.04, shapes_per_class=(60, 20), seed=0, classes=None):
        if first_subsampling_dl <= 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        self.dl = float(first_subsampling_dl)
        self.per_class = {"train": int(shapes_per_class[0]), "test": int(shapes_per_class[1])}
        self.seed = int(seed)
        self.classes = list(classes or self.catalogue)
        unknown = [c for c in self.classes if c not in self.catalogue]
        if unknown:
            raise ValueError(f"classes: unknown names {unknown}; known: {sorted(self.catalogue)}")
        self._clouds = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {
            "per_class": self.per_class,
            "seed": self.seed,
            "classes": self.classes,
            "version": self.version,
        }

    def _key(self, split):
        spec = json.dumps(
            [self.name, self.version, self.dl, self.per_class[split], self.seed, self.classes, split]
        )
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def clouds(self, split: str) -> list[ObjectCloud]:
        if split not in self.per_class:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._clouds:
            self._clouds[split] = self._load_or_generate(split)
        return self._clouds[split]

    def _load_or_generate(self, split):
        path = cache_root() / self.name / f"{split}_{self._key(split)}.npz"
        data = load_or_build(path, lambda: self._generate(split))
        bounds = np.concatenate([[0], np.cumsum(data["lengths"])])
        return [
            ObjectCloud(
                points=data["points"][a:b],
                normals=data["normals"][a:b] if "normals" in data else np.zeros((b - a, 3), np.float32),
                label=int(label),
                point_labels=data["roles"][a:b] if "roles" in data else None,
                name=f"{split}_{i:05d}",
            )
            for i, (a, b, label) in enumerate(zip(bounds[:-1], bounds[1:], data["labels"]))
        ]

    def samples(self, split):
        """Yields (label, points [n, 3], normals [n, 3] or None, part roles [n] or None) at full
        resolution, ``per_class`` objects of every class interleaved by class."""
        # Train and test draw from separate streams so that changing one size keeps the other.
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        for _ in range(self.per_class[split]):
            for label, name in enumerate(self.classes):
                yield (label, *sample_shape(name, rng))

    def _generate(self, split):
        import tf_custom_ops as ops

        arrays = {"points": [], "normals": [], "roles": [], "labels": [], "lengths": []}
        for label, points, normals, roles in self.samples(split):
            extras = {
                key: value for key, value in (("features", normals), ("labels", roles)) if value is not None
            }
            out = ops.grid_subsampling(points, self.dl, **extras)
            out = out if isinstance(out, tuple) else (out,)
            arrays["points"].append(out[0].numpy())
            if normals is not None:
                arrays["normals"].append(_unit(out[1].numpy()).astype(np.float32))
            if roles is not None:
                arrays["roles"].append(out[-1].numpy().astype(np.int32))
            arrays["labels"].append(label)
            arrays["lengths"].append(len(out[0]))
        return {
            "points": np.concatenate(arrays["points"]),
            "labels": np.array(arrays["labels"], np.int32),
            "lengths": np.array(arrays["lengths"], np.int64),
            **{key: np.concatenate(arrays[key]) for key in ("normals", "roles") if arrays[key]},
        }


class EmbeddedShapes(EmbeddedObjectDataset):
    """Procedural shape classification (12 classes by default)."""

    name = "EmbeddedShapes"
    task = "classification"

    @property
    def label_names(self):
        return list(self.classes)

    def clouds(self, split: str) -> list[ObjectCloud]:
        return [ObjectCloud(c.points, c.normals, c.label, None, c.name) for c in super().clouds(split)]


class EmbeddedParts(EmbeddedObjectDataset):
    """Procedural multi-category part segmentation: label = category, point_labels = part role."""

    name = "EmbeddedParts"
    task = "multi_segmentation"

    @property
    def label_names(self):
        return list(self.classes)

    @property
    def num_parts(self):
        return [len(SHAPES[c][0]) for c in self.classes]

    @property
    def part_names(self):
        return [list(SHAPES[c][0]) for c in self.classes]


def shapes_from_config(config):
    extra = dict(config.dataset.extra)
    return EmbeddedShapes(
        config.model.first_subsampling_dl,
        (extra.get("train_per_class", 60), extra.get("test_per_class", 20)),
        extra.get("seed", 0),
        extra.get("classes"),
    )


def parts_from_config(config):
    extra = dict(config.dataset.extra)
    return EmbeddedParts(
        config.model.first_subsampling_dl,
        (extra.get("train_per_class", 40), extra.get("test_per_class", 10)),
        extra.get("seed", 0),
        extra.get("classes"),
    )


def write_new_shapes(out_dir, per_class: int = 1, seed: int = 0, classes=None) -> list:
    """Writes ``per_class`` new full-resolution shapes of every class as ``<class>_<k>.ply`` (fields
    x, y, z, nx, ny, nz) into ``out_dir``: clouds to try ``training.predict`` on. They come from
    their own random stream, so they are neither training nor test shapes. Returns the paths."""
    from utils.point_files import write_point_file

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])  # streams 0 and 1 are the train and test splits
    paths = []
    for k in range(per_class):
        for name in classes or SHAPES:
            points, normals, _ = sample_shape(name, rng)
            fields = dict(zip(("nx", "ny", "nz"), normals.T))
            paths.append(write_point_file(out_dir / f"{name}_{k}.ply", points, fields))
    return paths


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m training.datasets.embedded_shapes",
        description="Write new procedural shapes as .ply files (to try training.predict on).",
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument("--per-class", type=int, default=1, help="shapes of every class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    paths = write_new_shapes(args.out, args.per_class, args.seed)
    print(f"wrote {len(paths)} shapes to {args.out}")


if __name__ == "__main__":
    main()
