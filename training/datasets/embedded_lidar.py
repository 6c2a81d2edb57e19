"""Embedded lidar objects: outdoor objects as an aerial or mobile laser scanner sees them, no download.

Each object (building, car, pole, broadleaf tree, conifer, bush) is assembled in metres from surfaces
(walls, roofs, car bodies, poles) and volumes (crowns, bushes), placed on a ground patch with a random
heading, then scanned: rays on a jittered, anisotropic lattice (scan lines) come from one direction
(aerial: from above with up to 25 degrees of tilt; mobile: from the side, 0-20 degrees down), and
each ray returns the first surface it meets (one-sided visibility, hidden parts removed). Crowns and
bushes are porous: rays that hit foliage pass on with some probability and give further returns.
Then range noise, an occluder's shadow now and then, and a ground cut (points below a threshold
height removed, so a few ground returns remain, as after a real ground classification). Finally the
object is centred on its bounding box and scaled into the unit sphere, and normals are zero: what
object benchmarks extracted from lidar scenes look like.

``EmbeddedLidarObjects`` is the classification dataset (6 classes); generation is deterministic in
``seed``, takes a few seconds and is cached. ``python -m training.datasets.embedded_lidar DIR``
writes the same objects (full resolution) in the ModelNet40 layout, for ``--config modelnet40``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.datasets.embedded_shapes import EmbeddedObjectDataset

# ------------------------------------------------------------------------------------------------
# samplers: each returns (points [n, 3], normals [n, 3]); zero normals mark porous volumes


def _quad(rng, n, origin, edge_u, edge_v):
    """A parallelogram origin + a edge_u + b edge_v; its normal is edge_u x edge_v."""
    a, b = rng.random((2, n, 1))
    points = np.asarray(origin) + a * np.asarray(edge_u) + b * np.asarray(edge_v)
    normal = np.cross(edge_u, edge_v)
    return points, np.tile(normal / np.linalg.norm(normal), (n, 1))


def _quad_area(edge_u, edge_v):
    return float(np.linalg.norm(np.cross(edge_u, edge_v)))


def _triangle(rng, n, p0, p1, p2, outward):
    """A triangle, its normal turned towards ``outward``."""
    a, b = rng.random((2, n, 1))
    fold = (a + b) > 1
    a, b = np.where(fold, 1 - a, a), np.where(fold, 1 - b, b)
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    normal = np.cross(p1 - p0, p2 - p0)
    normal = normal / np.linalg.norm(normal) * np.sign(normal @ np.asarray(outward, np.float64) or 1.0)
    return p0 + a * (p1 - p0) + b * (p2 - p0), np.tile(normal, (n, 1))


def _triangle_area(p0, p1, p2):
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return float(np.linalg.norm(np.cross(p1 - p0, p2 - p0)) / 2)


def _cylinder_side(rng, n, radius, z0, z1, center=(0.0, 0.0), axis="z"):
    theta = rng.random(n) * 2 * np.pi
    t = z0 + rng.random(n) * (z1 - z0)
    c, s = np.cos(theta), np.sin(theta)
    if axis == "z":
        points = np.stack([center[0] + radius * c, center[1] + radius * s, t], 1)
        normals = np.stack([c, s, np.zeros(n)], 1)
    else:  # along y (wheels), center = (x, z)
        points = np.stack([center[0] + radius * c, t, center[1] + radius * s], 1)
        normals = np.stack([c, np.zeros(n), s], 1)
    return points, normals


def _volume(rng, n, radii, center, shell=0.25):
    """Porous ellipsoid: points mostly in its outer ``shell`` (fraction of the radius)."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    depth = 1.0 - shell * rng.random(n) ** 2
    return np.asarray(center) + direction * depth[:, None] * np.asarray(radii), np.zeros((n, 3))


def _cone_volume(rng, n, radius, z0, z1):
    """Porous cone (conifer crown): points near its lateral surface, radius shrinking with height."""
    t = 1.0 - np.sqrt(rng.random(n))  # more area near the base
    theta = rng.random(n) * 2 * np.pi
    r = radius * (1.0 - t) * (1.0 - 0.3 * rng.random(n) ** 2)
    # Branch whorls: the radius pulses along the height.
    r *= 0.8 + 0.2 * np.cos(t * rng.uniform(25, 40))
    points = np.stack([r * np.cos(theta), r * np.sin(theta), z0 + t * (z1 - z0)], 1)
    return points, np.zeros((n, 3))


class _Surface:
    """A sampler with its area (m^2, or a pseudo-area for volumes) and a part role."""

    def __init__(self, sample: Callable, area: float, role: int):
        self.sample, self.area, self.role = sample, float(area), role


def _box_surfaces(size, center, role, skip_bottom=True):
    """The faces of an axis-aligned box (outward normals)."""
    sx, sy, sz = size
    cx, cy, cz = center
    x0, y0, z0 = cx - sx / 2, cy - sy / 2, cz - sz / 2
    faces = [
        ((x0, y0, z0 + sz), (sx, 0, 0), (0, sy, 0)),  # top
        ((x0, y0, z0), (0, sy, 0), (0, 0, sz)),  # -x
        ((x0 + sx, y0, z0), (0, 0, sz), (0, sy, 0)),  # +x
        ((x0, y0, z0), (0, 0, sz), (sx, 0, 0)),  # -y
        ((x0, y0 + sy, z0), (sx, 0, 0), (0, 0, sz)),
    ]  # +y
    if not skip_bottom:
        faces.append(((x0, y0, z0), (sx, 0, 0), (0, sy, 0)))
    return [_Surface(lambda rng, n, f=f: _quad(rng, n, *f), _quad_area(f[1], f[2]), role) for f in faces]


# ------------------------------------------------------------------------------------------------
# the classes: name -> (part names, builder(rng) -> list of surfaces), local frame, ground at z = 0


def _building(rng):
    w, d = rng.uniform(7, 20), rng.uniform(6, 14)
    h = rng.uniform(3, 10)
    walls = _box_surfaces((w, d, h), (0, 0, h / 2), 0)[1:]  # the top is the roof's
    roof_type = rng.choice(["flat", "gable", "hip", "shed"])
    rise = rng.uniform(1.5, 4.5)
    x0, y0, x1, y1 = -w / 2, -d / 2, w / 2, d / 2
    if roof_type == "flat":
        roof = [_Surface(lambda rng, n: _quad(rng, n, (x0, y0, h), (w, 0, 0), (0, d, 0)), w * d, 1)]
        parapet = rng.uniform(0.3, 1.0)
        roof += _box_surfaces((w, 0.3, parapet), (0, y0, h + parapet / 2), 1)
        roof += _box_surfaces((w, 0.3, parapet), (0, y1, h + parapet / 2), 1)
    elif roof_type == "gable":
        faces = [((x0, y0, h), (w, 0, 0), (0, d / 2, rise)), ((x0, y1, h), (0, -d / 2, rise), (w, 0, 0))]
        roof = [_Surface(lambda rng, n, f=f: _quad(rng, n, *f), _quad_area(f[1], f[2]), 1) for f in faces]
        for x in (x0, x1):  # gable ends
            corners = ((x, y0, h), (x, y1, h), (x, 0, h + rise))
            roof.append(
                _Surface(
                    lambda rng, n, c=corners, x=x: _triangle(rng, n, *c, (np.sign(x), 0, 0)), d * rise / 2, 0
                )
            )
    elif roof_type == "shed":
        roof = [
            _Surface(
                lambda rng, n: _quad(rng, n, (x0, y0, h), (w, 0, 0), (0, d, rise)),
                _quad_area((w, 0, 0), (0, d, rise)),
                1,
            )
        ]
        roof += [_Surface(lambda rng, n: _quad(rng, n, (x0, y1, h), (w, 0, 0), (0, 0, rise)), w * rise, 0)]
    else:  # hip: two trapezoids and two triangles meeting on a shortened ridge
        inset = min(w, d) / 2
        ridge0, ridge1 = (x0 + inset, 0, h + rise), (x1 - inset, 0, h + rise)
        roof = []
        for y, sign in ((y0, -1.0), (y1, 1.0)):  # each trapezoid as two triangles
            for corners in (((x0, y, h), (x1, y, h), ridge1), ((x0, y, h), ridge1, ridge0)):
                roof.append(
                    _Surface(
                        lambda rng, n, c=corners, s=sign: _triangle(rng, n, *c, (0, s, 1)),
                        _triangle_area(*corners),
                        1,
                    )
                )
        for x, ridge, sign in ((x0, ridge0, -1.0), (x1, ridge1, 1.0)):
            corners = ((x, y0, h), (x, y1, h), ridge)
            roof.append(
                _Surface(
                    lambda rng, n, c=corners, s=sign: _triangle(rng, n, *c, (s, 0, 1)),
                    _triangle_area(*corners),
                    1,
                )
            )
    parts = walls + roof
    if rng.random() < 0.4:  # a chimney or a roof box
        cw = rng.uniform(0.6, 1.5)
        parts += _box_surfaces(
            (cw, cw, rise + 1.0),
            (rng.uniform(-w / 4, w / 4), rng.uniform(-d / 4, d / 4), h + (rise + 1.0) / 2),
            1,
        )
    return parts


def _car(rng):
    length, width = rng.uniform(3.6, 5.2), rng.uniform(1.6, 2.0)
    body_h = rng.uniform(0.55, 0.8)
    clearance = rng.uniform(0.15, 0.3)
    cabin_l = length * rng.uniform(0.45, 0.65)
    cabin_h = rng.uniform(0.45, 0.7)
    van = rng.random() < 0.25
    if van:
        cabin_l, cabin_h = length * rng.uniform(0.75, 0.9), rng.uniform(0.8, 1.2)
    shift = rng.uniform(-0.1, 0.1) * length
    parts = _box_surfaces((length, width, body_h), (0, 0, clearance + body_h / 2), 0)
    parts += _box_surfaces((cabin_l, width * 0.9, cabin_h), (shift, 0, clearance + body_h + cabin_h / 2), 1)
    radius = rng.uniform(0.3, 0.38)
    for x in (-length * 0.32, length * 0.32):
        for y in (-width / 2, width / 2):
            parts.append(
                _Surface(
                    lambda rng, n, x=x, y=y: _cylinder_side(
                        rng, n, radius, y - 0.1, y + 0.1, (x, radius), axis="y"
                    ),
                    2 * np.pi * radius * 0.2,
                    2,
                )
            )
    return parts


def _pole(rng):
    h = rng.uniform(4, 11)
    r = rng.uniform(0.07, 0.18)
    parts = [_Surface(lambda rng, n: _cylinder_side(rng, n, r, 0, h), 2 * np.pi * r * h * 3, 0)]
    kind = rng.choice(["light", "sign", "plain"])
    if kind == "light":
        arm = rng.uniform(1.0, 2.5)
        parts += _box_surfaces((arm, 0.12, 0.12), (arm / 2, 0, h - 0.1), 1)
        parts += _box_surfaces((0.6, 0.35, 0.25), (arm, 0, h - 0.3), 1)
    elif kind == "sign":
        sw, sh = rng.uniform(0.6, 1.5), rng.uniform(0.5, 1.2)
        parts += _box_surfaces((0.06, sw, sh), (r + 0.05, 0, h - sh / 2), 1)
    return parts


def _broadleaf(rng):
    trunk_h = rng.uniform(1.5, 4.0)
    trunk_r = rng.uniform(0.12, 0.4)
    crown = np.array([rng.uniform(2.0, 5.5), 0.0, rng.uniform(2.0, 5.0)])
    crown[1] = crown[0] * rng.uniform(0.75, 1.25)
    center = (rng.normal(0, 0.3), rng.normal(0, 0.3), trunk_h + crown[2] * 0.85)
    volume_area = 4 * np.pi * (crown[0] * crown[1] * crown[2]) ** (2 / 3)
    parts = [
        _Surface(
            lambda rng, n: _cylinder_side(rng, n, trunk_r, 0, trunk_h + crown[2] * 0.6),
            2 * np.pi * trunk_r * trunk_h * 2,
            0,
        ),
        _Surface(lambda rng, n: _volume(rng, n, crown, center, shell=rng.uniform(0.2, 0.5)), volume_area, 1),
    ]
    if rng.random() < 0.5:  # a second, smaller lobe: irregular crowns
        lobe = crown * rng.uniform(0.4, 0.7)
        offset = (
            center[0] + rng.normal(0, crown[0] / 2),
            center[1] + rng.normal(0, crown[1] / 2),
            center[2] + rng.normal(0, crown[2] / 3),
        )
        parts.append(_Surface(lambda rng, n: _volume(rng, n, lobe, offset), volume_area * 0.3, 1))
    return parts


def _conifer(rng):
    h = rng.uniform(6, 20)
    base = h * rng.uniform(0.1, 0.3)
    radius = h * rng.uniform(0.15, 0.28)
    trunk_r = rng.uniform(0.1, 0.35)
    return [
        _Surface(
            lambda rng, n: _cylinder_side(rng, n, trunk_r, 0, base + 0.2 * h), 2 * np.pi * trunk_r * h, 0
        ),
        _Surface(lambda rng, n: _cone_volume(rng, n, radius, base, h), np.pi * radius * h, 1),
    ]


def _bush(rng):
    if rng.random() < 0.4:  # a hedge: long and low
        radii = np.array([rng.uniform(2.0, 6.0), rng.uniform(0.4, 0.9), rng.uniform(0.5, 1.2)])
    else:
        r = rng.uniform(0.6, 2.0)
        radii = np.array([r, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.5, 0.9)])
    parts = [
        _Surface(
            lambda rng, n: _volume(rng, n, radii, (0, 0, radii[2] * 0.8), shell=0.4),
            4 * np.pi * np.prod(radii) ** (2 / 3),
            0,
        )
    ]
    if rng.random() < 0.5:
        small = radii * rng.uniform(0.5, 0.8)
        offset = (rng.normal(0, radii[0] / 2), rng.normal(0, radii[1] / 2), small[2] * 0.8)
        parts.append(
            _Surface(
                lambda rng, n: _volume(rng, n, small, offset, shell=0.4),
                4 * np.pi * np.prod(small) ** (2 / 3),
                0,
            )
        )
    return parts


OBJECTS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "building": (("wall", "roof"), _building),
    "car": (("body", "cabin", "wheel"), _car),
    "pole": (("pole", "fixture"), _pole),
    "broadleaf_tree": (("trunk", "crown"), _broadleaf),
    "conifer": (("trunk", "crown"), _conifer),
    "bush": (("foliage",), _bush),
}

GROUND_ROLE = -1  # part role of ground returns that survive the ground cut


def _unit(v):
    return v / np.linalg.norm(v)


def scan_object(name: str, rng: np.random.Generator, points_range=(1200, 6000)):
    """One scanned object: (points float32 [n, 3] centred, in the unit sphere; part roles int32 [n],
    -1 for ground returns).

    The object is sampled densely (about 12 samples per scan cell), given a random heading, put on a
    noisy ground patch, scanned from one direction with a first-return z-buffer on a jittered lattice
    whose spacing gives ``points_range`` returns, then noised, occluded, ground-cut and normalised.
    """
    _, builder = OBJECTS[name]
    parts = builder(rng)
    heading = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(heading), np.sin(heading)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aerial = rng.random() < 0.7
    if aerial:
        tilt, azimuth = rng.uniform(0, np.radians(25)), rng.uniform(0, 2 * np.pi)
        direction = _unit(
            np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), -np.cos(tilt)])
        )
    else:
        down, azimuth = rng.uniform(0, np.radians(20)), rng.uniform(0, 2 * np.pi)
        direction = _unit(
            np.array([np.cos(down) * np.cos(azimuth), np.cos(down) * np.sin(azimuth), -np.sin(down)])
        )
    # Lattice axes in the plane seen by the sensor, turned by a random scan angle.
    helper = np.array([0, 0, 1.0]) if abs(direction[2]) < 0.9 else np.array([1.0, 0, 0])
    axis_u = _unit(np.cross(direction, helper))
    axis_v = np.cross(direction, axis_u)
    angle = rng.uniform(0, np.pi)
    axis_u, axis_v = (
        np.cos(angle) * axis_u + np.sin(angle) * axis_v,
        -np.sin(angle) * axis_u + np.cos(angle) * axis_v,
    )

    # A first coarse pass measures the projected footprint, which sets the lattice spacing.
    areas = np.array([p.area for p in parts])
    coarse = _sample_parts(parts, areas, rng, 4000)[0] @ rotation.T
    uv = np.stack([coarse @ axis_u, coarse @ axis_v], 1)
    probe = max(np.ptp(uv, axis=0).max() / 60, 1e-3)
    footprint = len(np.unique(np.floor(uv / probe).astype(np.int64), axis=0)) * probe**2
    target = rng.uniform(*points_range)
    anisotropy = rng.uniform(0.6, 1.6)
    spacing = np.sqrt(footprint / target)
    step_u, step_v = spacing * anisotropy, spacing / anisotropy

    dense_count = int(np.clip(12 * target * max(1.0, areas.sum() / max(footprint, 1e-6)) / 2, 20000, 250000))
    points, normals, roles = _sample_parts(parts, areas, rng, dense_count)
    points, normals = points @ rotation.T, normals @ rotation.T
    # The ground patch reaches just past the object, as after a tight segmentation.
    extent = np.abs(points[:, :2]).max() * 1.05 + 0.3
    ground_n = int(dense_count * 0.2)
    ground = np.stack(
        [
            rng.uniform(-extent, extent, ground_n),
            rng.uniform(-extent, extent, ground_n),
            rng.normal(0, 0.02, ground_n),
        ],
        1,
    )
    points = np.concatenate([points, ground])
    normals = np.concatenate([normals, np.tile([0, 0, 1.0], (ground_n, 1))])
    roles = np.concatenate([roles, np.full(ground_n, GROUND_ROLE, np.int32)])
    porous = ~normals.any(axis=1)
    # Back faces never return a first echo.
    facing = porous | (normals @ direction < 0)
    points, roles, porous = points[facing], roles[facing], porous[facing]

    depth = points @ direction
    u = points @ axis_u / step_u + rng.uniform(-0.35, 0.35, len(points))
    v = points @ axis_v / step_v
    cells = np.floor(u).astype(np.int64) * 1_000_003 + np.floor(v).astype(np.int64)
    order = np.lexsort((depth, cells))
    cells = cells[order]
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    rank = np.arange(len(cells)) - np.repeat(starts, np.diff(np.r_[starts, len(cells)]))
    # Porous hits let the ray go on: a point is returned if everything before it in its ray is
    # foliage, with a probability that falls with the number of foliage samples before it.
    solid_before = np.cumsum(~porous[order]) - ~porous[order]
    solid_before -= np.repeat(solid_before[starts], np.diff(np.r_[starts, len(cells)]))
    clear = solid_before == 0
    keep = (rank == 0) | (clear & (rng.random(len(rank)) < 0.08 * np.exp(-rank / 8.0)))
    chosen = order[keep]
    if len(chosen) > 1.5 * points_range[1]:
        chosen = rng.choice(chosen, int(1.5 * points_range[1]), replace=False)
    points, roles = points[chosen], roles[chosen]
    points = points + direction * rng.normal(0, rng.uniform(0.01, 0.04), (len(points), 1))
    points = points + rng.normal(0, 0.01, points.shape)

    if rng.random() < 0.4:  # the shadow of something between the sensor and the object
        uv = np.stack([points @ axis_u, points @ axis_v], 1)
        center = uv[rng.integers(len(uv))]
        radius = rng.uniform(0.1, 0.3) * np.ptp(uv, axis=0).max()
        outside = np.linalg.norm(uv - center, axis=1) > radius
        if outside.sum() > 0.6 * len(points):
            points, roles = points[outside], roles[outside]
    cut = rng.uniform(0.12, 0.3)
    above = points[:, 2] > cut
    points, roles = points[above], roles[above]
    points = points - (points.max(0) + points.min(0)) / 2
    points = points / np.linalg.norm(points, axis=1).max()
    return points.astype(np.float32), roles.astype(np.int32)


def _sample_parts(parts, areas, rng, count):
    counts = rng.multinomial(count, areas / areas.sum())
    points, normals, roles = [], [], []
    for part, n in zip(parts, counts):
        if n:
            p, nrm = part.sample(rng, int(n))
            points.append(p)
            normals.append(nrm)
            roles.append(np.full(int(n), part.role, np.int32))
    return np.concatenate(points), np.concatenate(normals), np.concatenate(roles)


def generate(classes, per_class: int, seed: int, split: str):
    """Yields (label, points float32 [n, 3], roles int32 [n]) for ``per_class`` objects of every class,
    interleaved by class; train and test draw from separate streams."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, 7])
    for _ in range(per_class):
        for label, name in enumerate(classes):
            points, roles = scan_object(name, rng)
            yield label, points, roles


class EmbeddedLidarObjects(EmbeddedObjectDataset):
    """Procedural lidar object classification (6 classes by default), splits "train" and "test";
    clouds have zero normals."""

    name = "EmbeddedLidarObjects"
    task = "classification"
    version = 1
    catalogue = OBJECTS

    @property
    def label_names(self):
        return list(self.classes)

    def samples(self, split):
        for label, points, _ in generate(self.classes, self.per_class[split], self.seed, split):
            yield label, points, None, None


def from_config(config) -> EmbeddedLidarObjects:
    extra = dict(config.dataset.extra)
    return EmbeddedLidarObjects(
        config.model.first_subsampling_dl,
        (extra.get("train_per_class", 60), extra.get("test_per_class", 20)),
        extra.get("seed", 0),
        extra.get("classes"),
    )


def write_modelnet40_layout(root, per_class=(60, 20), seed=0, classes=None):
    """Writes the objects (full resolution, normals zero) in the ModelNet40 layout under ``root``."""
    root = Path(root)
    classes = list(classes or OBJECTS)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("".join(f"{c}\n" for c in classes))
    for split, count in zip(("train", "test"), per_class):
        ids, number = [], dict.fromkeys(classes, 0)
        for label, points, _ in generate(classes, count, seed, split):
            name = classes[label]
            number[name] += 1
            shape_id = f"{name}_{number[name] + (0 if split == 'train' else 10000):05d}"
            (root / name).mkdir(exist_ok=True)
            table = np.concatenate([points, np.zeros_like(points)], axis=1)
            np.savetxt(root / name / f"{shape_id}.txt", table, fmt="%.6f", delimiter=",")
            ids.append(shape_id)
        (root / f"modelnet40_{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training.datasets.embedded_lidar",
        description="Writes the embedded lidar objects in the ModelNet40 layout.",
    )
    parser.add_argument("root", help="output folder")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_modelnet40_layout(args.root, (args.train_per_class, args.test_per_class), args.seed)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
