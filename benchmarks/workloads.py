"""The standard benchmark batches W1 and W2 (numpy only, seeded, deterministic).

W1, ModelNet40-like: 16 objects, each the union of 1-4 random surface primitives sampled with
10,000 points (area weighted), centred and scaled into the unit sphere, grid-subsampled at 0.02
-> 111,480 points. W2, S3DIS-like: one furnished 12 x 9 x 3.2 m room sampled at ~5,000 pts/m^2
with 2 mm noise, subsampled at 0.04, then 8 spheres of radius 2 m -> 88,492 points.

The random draws follow the shared workload definition exactly (same generator, same order of
calls), so the counts match those quoted in the issues; ``python -m benchmarks.workloads`` prints
them.
"""

from __future__ import annotations

import numpy as np

W1_COUNT = 111480
W2_COUNT = 88492


def voxel_subsample(points, dl):
    """Barycentre per occupied voxel (cell index in float32 like the C++ code); sorted by cell."""
    p = np.ascontiguousarray(points, dtype=np.float32)
    if len(p) == 0:
        return p.reshape(0, 3)
    size = np.float32(dl)
    origin = (np.floor(p.min(0) * (np.float32(1) / size)) * size).astype(np.float32)
    top = p.max(0)
    nx = np.int64(np.floor((top[0] - origin[0]) / size)) + 1
    ny = np.int64(np.floor((top[1] - origin[1]) / size)) + 1
    cell = np.floor((p - origin) / size).astype(np.int64)
    key = cell[:, 0] + nx * cell[:, 1] + nx * ny * cell[:, 2]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    sums = np.stack([np.bincount(inverse, weights=p[:, a].astype(np.float64)) for a in range(3)], 1)
    return (sums / counts[:, None]).astype(np.float32)


def stack_subsampled(points, lengths, dl):
    parts, sizes, start = [], [], 0
    for n in lengths:
        sub = voxel_subsample(points[start : start + int(n)], dl)
        parts.append(sub)
        sizes.append(len(sub))
        start += int(n)
    return np.concatenate(parts).astype(np.float32), np.asarray(sizes, np.int32)


# -- surfaces ----------------------------------------------------------------------------------


def _rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _box_surface(rng, n, a, b, c):
    face_areas = np.array([b * c, b * c, a * c, a * c, a * b, a * b])
    face = rng.choice(6, size=n, p=face_areas / face_areas.sum())
    pts = (rng.random((n, 3)) - 0.5) * np.array([a, b, c])
    axis = face // 2
    pts[np.arange(n), axis] = np.array([a, b, c])[axis] * np.where(face % 2 == 0, -0.5, 0.5)
    return pts


def _ellipsoid_surface(rng, n, a, b, c):
    parts, left = [], n
    g_max = max(b * c, a * c, a * b)
    while left > 0:
        m = int(left * 2.2) + 16
        u = rng.standard_normal((m, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        density = np.sqrt((b * c * u[:, 0]) ** 2 + (a * c * u[:, 1]) ** 2 + (a * b * u[:, 2]) ** 2)
        u = u[rng.random(m) < density / g_max][:left]
        parts.append(u * np.array([a, b, c]))
        left -= len(u)
    return np.concatenate(parts)


def _cylinder_surface(rng, n, r, h):
    side, cap = 2 * np.pi * r * h, np.pi * r * r
    part = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
    theta = rng.random(n) * 2 * np.pi
    rad = np.where(part == 0, r, r * np.sqrt(rng.random(n)))
    z = np.where(part == 0, (rng.random(n) - 0.5) * h, np.where(part == 1, -h / 2, h / 2))
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], 1)


def _torus_surface(rng, n, big, small):
    parts, left = [], n
    while left > 0:
        m = int(left * 2.2) + 16
        u = rng.random(m) * 2 * np.pi
        v = rng.random(m) * 2 * np.pi
        keep = rng.random(m) < (big + small * np.cos(v)) / (big + small)
        u, v = u[keep][:left], v[keep][:left]
        ring = big + small * np.cos(v)
        parts.append(np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1))
        left -= len(u)
    return np.concatenate(parts)


def _box_area(a, b, c):
    return 2.0 * (a * b + b * c + a * c)


def _primitive(rng):
    kind = rng.choice(
        ["box", "plate", "ellipsoid", "cylinder", "rod", "torus"], p=[0.22, 0.30, 0.14, 0.14, 0.12, 0.08]
    )
    if kind in ("box", "plate"):
        if kind == "box":
            a, b, c = rng.uniform(0.15, 0.9, 3)
        else:
            a, b = rng.uniform(0.3, 1.2, 2)
            c = rng.uniform(0.01, 0.05)
        return _box_area(a, b, c), lambda n: _box_surface(rng, n, a, b, c)
    if kind == "ellipsoid":
        a, b, c = rng.uniform(0.08, 0.5, 3)
        p = 1.6075
        area = 4 * np.pi * ((a**p * b**p + a**p * c**p + b**p * c**p) / 3.0) ** (1 / p)
        return area, lambda n: _ellipsoid_surface(rng, n, a, b, c)
    if kind in ("cylinder", "rod"):
        if kind == "cylinder":
            r, h = rng.uniform(0.08, 0.4), rng.uniform(0.2, 1.2)
        else:
            r, h = rng.uniform(0.015, 0.05), rng.uniform(0.5, 1.5)
        return 2 * np.pi * r * h + 2 * np.pi * r * r, lambda n: _cylinder_surface(rng, n, r, h)
    big, small = rng.uniform(0.2, 0.5), rng.uniform(0.03, 0.12)
    return 4 * np.pi * np.pi * big * small, lambda n: _torus_surface(rng, n, big, small)


def _object(rng, n_points):
    prims = [_primitive(rng) for _ in range(int(rng.integers(1, 5)))]
    rotations = [_rotation(rng) for _ in prims]
    shifts = [rng.uniform(-0.4, 0.4, 3) for _ in prims]
    areas = np.array([area for area, _ in prims])
    counts = rng.multinomial(n_points, areas / areas.sum())
    pts = np.concatenate(
        [sample(int(c)) @ rot.T + t for (_, sample), rot, t, c in zip(prims, rotations, shifts, counts) if c]
    )
    rng.shuffle(pts, axis=0)
    pts -= pts.mean(0)
    return (pts / np.max(np.linalg.norm(pts, axis=1))).astype(np.float32)


def make_w1(seed=0, n_objects=16, n_points=10000, dl=0.02):
    """W1: stacked subsampled objects, float32 [N, 3] and int32 lengths [16]."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([_object(rng, n_points) for _ in range(n_objects)])
    return stack_subsampled(raw, np.full(n_objects, n_points), dl)


# -- W2: a furnished room ------------------------------------------------------------------------


def _room(rng, lx, ly, h):
    surfaces = []

    def rect(o, u, v):
        o, u, v = (np.asarray(x, np.float64) for x in (o, u, v))
        surfaces.append(
            (np.linalg.norm(np.cross(u, v)), lambda n: o + rng.random((n, 1)) * u + rng.random((n, 1)) * v)
        )

    def box(cx, cy, z0, a, b, c, theta=0.0):
        rz = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        t = np.array([cx, cy, z0 + c / 2])
        surfaces.append((_box_area(a, b, c), lambda n: _box_surface(rng, n, a, b, c) @ rz.T + t))

    for o, u, v in (
        ([0, 0, 0], [lx, 0, 0], [0, ly, 0]),
        ([0, 0, h], [lx, 0, 0], [0, ly, 0]),
        ([0, 0, 0], [lx, 0, 0], [0, 0, h]),
        ([0, ly, 0], [lx, 0, 0], [0, 0, h]),
        ([0, 0, 0], [0, ly, 0], [0, 0, h]),
        ([lx, 0, 0], [0, ly, 0], [0, 0, h]),
    ):
        rect(o, u, v)
    box(1.2, 0.03, 0.0, 0.9, 0.05, 2.1)
    box(lx - 0.03, ly - 1.5, 0.0, 0.05, 0.9, 2.1)
    box(lx / 2, ly - 0.02, 0.9, 2.5, 0.03, 1.2)
    box(0.02, ly / 2, 1.0, 0.03, 1.8, 1.0)
    box(lx * 0.66, ly / 2, h - 0.4, 0.35, ly, 0.4)
    box(0.25, 0.25, 0.0, 0.5, 0.5, h)
    for _ in range(3):  # tables, legs, chairs, clutter
        tx, ty = rng.uniform(1.5, lx - 1.5), rng.uniform(1.5, ly - 1.5)
        th = rng.uniform(0, np.pi)
        a, b = rng.uniform(1.2, 2.0), rng.uniform(0.7, 1.0)
        box(tx, ty, 0.72, a, b, 0.04, th)
        for sx in (-1, 1):
            for sy in (-1, 1):
                box(
                    tx + np.cos(th) * sx * (a / 2 - 0.05) - np.sin(th) * sy * (b / 2 - 0.05),
                    ty + np.sin(th) * sx * (a / 2 - 0.05) + np.cos(th) * sy * (b / 2 - 0.05),
                    0.0,
                    0.05,
                    0.05,
                    0.72,
                    th,
                )
        for c in range(int(rng.integers(2, 5))):
            ang = th + c * np.pi / 2 + rng.uniform(-0.3, 0.3)
            dist = rng.uniform(0.7, 1.0)
            cx, cy = tx + dist * np.cos(ang), ty + dist * np.sin(ang)
            box(cx, cy, 0.42, 0.45, 0.45, 0.05, ang)
            box(cx + 0.22 * np.cos(ang), cy + 0.22 * np.sin(ang), 0.47, 0.04, 0.45, 0.45, ang)
            box(cx, cy, 0.0, 0.06, 0.06, 0.42, ang)
        for _ in range(int(rng.integers(1, 4))):
            box(
                tx + rng.uniform(-0.4, 0.4),
                ty + rng.uniform(-0.2, 0.2),
                0.76,
                rng.uniform(0.1, 0.4),
                rng.uniform(0.1, 0.3),
                rng.uniform(0.02, 0.3),
                th,
            )
    for wall in range(4):  # cabinets and their shelves
        depth, width, height = rng.uniform(0.35, 0.6), rng.uniform(0.8, 2.0), rng.uniform(0.8, 2.2)
        pos = rng.uniform(1.5, (lx if wall < 2 else ly) - 1.5)
        centre = [
            (pos, depth / 2 + 0.01),
            (pos, ly - depth / 2 - 0.01),
            (depth / 2 + 0.01, pos),
            (lx - depth / 2 - 0.01, pos),
        ][wall]
        size = (width, depth) if wall < 2 else (depth, width)
        box(centre[0], centre[1], 0.0, size[0], size[1], height)
        shelf = (width * 0.9, depth * 1.05) if wall < 2 else (depth * 1.05, width * 0.9)
        for s in range(int(height / 0.4)):
            box(centre[0], centre[1], 0.4 * s, shelf[0], shelf[1], 0.02)
    for k in range(4):  # lamps
        box(lx * (0.25 + 0.5 * (k % 2)), ly * (0.25 + 0.5 * (k // 2)), h - 0.06, 1.2, 0.3, 0.05)
    return surfaces


def make_w2_room(seed=0, density=5000.0, noise=0.002, dl=0.04, size=(12.0, 9.0, 3.2)):
    """Dense room cloud and its subsampled version (float32)."""
    rng = np.random.default_rng(seed + 1000)
    surfaces = _room(rng, *size)
    areas = np.array([a for a, _ in surfaces])
    counts = rng.multinomial(int(round(density * areas.sum())), areas / areas.sum())
    pts = np.concatenate([sample(int(c)) for (_, sample), c in zip(surfaces, counts) if c])
    pts += rng.normal(scale=noise, size=pts.shape)
    pts += np.array([0.0137, 0.0271, 0.0193])  # keeps walls off voxel boundaries
    pts = pts.astype(np.float32)
    return pts, voxel_subsample(pts, dl)


def make_w2(seed=0, n_spheres=8, dl=0.04, in_radius=2.0):
    """W2: 8 input spheres (centred), float32 [N, 3] and int32 lengths [8]."""
    _, sub = make_w2_room(seed=seed, dl=dl)
    rng = np.random.default_rng(seed + 2000)
    sub64 = sub.astype(np.float64)
    parts, sizes = [], []
    for _ in range(n_spheres):
        pick = sub64[rng.integers(len(sub))] + rng.normal(scale=in_radius / 10, size=3)
        inds = np.nonzero(np.sum((sub64 - pick) ** 2, axis=1) <= in_radius**2)[0]
        rng.shuffle(inds)
        parts.append((sub[inds] - pick).astype(np.float32))
        sizes.append(len(inds))
    return np.concatenate(parts), np.asarray(sizes, np.int32)


def pyramid_radii(name):
    """Per layer: (conv radius, subsampling dl for the next layer, pool radius, upsample radius).

    W1 follows the ModelNet40 KP-CNN pipeline (no upsampling; the strided deformable block ending
    layer 3 pools with 2 r_normal); W2 the S3DIS KP-FCNN pipeline (upsample = 2 x pool radius).
    """
    dl0 = {"W1": 0.02, "W2": 0.04}[name]
    layers = []
    for l in range(5):
        r = dl0 * 2.5 * 2**l
        if l == 4:
            layers.append((r, None, None, None))
        elif name == "W1":
            layers.append((r, 2 * r / 2.5, 2 * r if l == 3 else r, None))
        else:
            layers.append((r, 2 * r / 2.5, r, 2 * r))
    return layers


if __name__ == "__main__":
    p1, l1 = make_w1()
    p2, l2 = make_w2()
    print(f"W1: {len(p1)} points (expected {W1_COUNT}), per object {l1.tolist()}")
    print(f"W2: {len(p2)} points (expected {W2_COUNT}), per sphere {l2.tolist()}")
