"""Kernel point dispositions (supplementary section B).

K points in the unit ball minimising  E = sum_{i<j} 1/|x_i - x_j| + 5 sum_i |x_i|^2  (the potential
whose gradient the original follows), by normalised gradient descent from several seeded random
starts; the start of lowest energy is kept (the original always kept its first start). The
non-centre points are then rescaled to a mean radius of 1.

Dispositions are cached as ``.ply`` in ``$KPCONV_TF_CACHE/kernels`` (default
``~/.cache/kpconv_tf/kernels``), never in the working directory. ``load_kernels`` scales a cached
disposition to a layer's kernel radius (1.5 x extent in KPConv) and, as the original, applies a
random rotation (about the vertical axis only for ``fixed='verticals'``) and a N(0, 0.01 radius)
jitter; pass a seed to make both reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kpconv_tf.cache import cache_home
from kpconv_tf.config import FIXED_MODES
from utils.ply import read_ply, write_ply


def cache_dir() -> Path:
    return cache_home() / "kernels"


def energy(points: np.ndarray) -> np.ndarray:
    """E for one [K, 3] or several [S, K, 3] dispositions."""
    p = np.asarray(points, dtype=np.float64)
    single = p.ndim == 2
    p = p[None] if single else p
    diff = p[:, :, None, :] - p[:, None, :, :]
    d = np.sqrt(np.sum(diff**2, axis=-1))
    k = p.shape[1]
    iu = np.triu_indices(k, 1)
    e = np.sum(1.0 / d[:, iu[0], iu[1]], axis=1) + 5.0 * np.sum(p**2, axis=(1, 2))
    return e[0] if single else e


def optimize_dispositions(
    num_points: int,
    fixed: str = "center",
    num_starts: int = 16,
    seed: int = 0,
    max_iter: int = 4000,
    tol: float = 1e-6,
):
    """Runs the optimisation from ``num_starts`` seeded starts.

    Returns (dispositions [S, K, 3] float64, each with non-centre mean radius 1; energies [S]
    computed before rescaling).
    """
    if fixed not in FIXED_MODES:
        raise ValueError(f"fixed must be one of {FIXED_MODES}, got {fixed!r}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if fixed == "verticals" and num_points < 3:
        raise ValueError("fixed='verticals' needs num_points >= 3")
    rng = np.random.default_rng(seed)
    # Uniform starts inside the ball of radius sqrt(0.5), as the original draws them.
    pts = rng.normal(size=(num_starts, num_points, 3))
    pts /= np.linalg.norm(pts, axis=-1, keepdims=True)
    pts *= np.sqrt(0.5) * rng.random((num_starts, num_points, 1)) ** (1 / 3)
    frozen = np.zeros((num_points,), dtype=bool)
    if fixed in ("center", "verticals"):
        pts[:, 0] = 0.0
        frozen[0] = True
    if fixed == "verticals":
        pts[:, 1] = [0.0, 0.0, 2.0 / 3.0]
        pts[:, 2] = [0.0, 0.0, -2.0 / 3.0]
    step = 1e-2
    previous = None
    for _ in range(max_iter):
        diff = pts[:, :, None, :] - pts[:, None, :, :]
        d2 = np.sum(diff**2, axis=-1)
        np.einsum("skk->sk", d2)[...] = np.inf
        grad = -np.sum(diff / d2[..., None] ** 1.5, axis=2) + 10.0 * pts
        if fixed == "verticals":
            grad[:, 1:3, :2] = 0.0  # the vertical points only slide along z
        grad[:, frozen] = 0.0
        norms = np.linalg.norm(grad, axis=-1)
        if previous is not None and np.max(np.abs(norms - previous)) < tol:
            break
        previous = norms
        move = np.minimum(step * norms, 0.05)
        pts -= (move / (norms + 1e-12))[..., None] * grad
        step *= 0.9995
    energies = energy(pts)
    radii = np.linalg.norm(pts, axis=-1)
    movable = radii[:, 1:] if fixed != "none" else radii
    pts = pts / np.mean(movable, axis=1)[:, None, None]
    return pts, energies


def kernel_disposition(num_points: int, fixed: str = "center") -> np.ndarray:
    """The cached best disposition [K, 3] float64 (non-centre mean radius 1), computed once."""
    if fixed not in FIXED_MODES:
        raise ValueError(f"fixed must be one of {FIXED_MODES}, got {fixed!r}")
    path = cache_dir() / f"k_{num_points:03d}_{fixed}.ply"
    if path.is_file():
        data = read_ply(path)
        return np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float64)
    dispositions, energies = optimize_dispositions(num_points, fixed)
    best = dispositions[int(np.argmin(energies))]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ply(path, {"x": best[:, 0], "y": best[:, 1], "z": best[:, 2]})
    return best


def random_rotation(rng: np.random.Generator, vertical_only: bool = False) -> np.ndarray:
    """A uniformly random rotation matrix [3, 3] (about z only when ``vertical_only``)."""
    if vertical_only:
        theta = rng.random() * 2 * np.pi
        c, s = np.cos(theta), np.sin(theta)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def load_kernels(
    radius: float,
    num_points: int,
    fixed: str = "center",
    seed: int | None = None,
    rotate: bool = True,
    jitter: float = 0.01,
) -> np.ndarray:
    """Kernel points of one layer: float32 [K, 3] at mean radius ``radius``.

    A random rotation (if ``rotate``) and N(0, jitter * radius) noise (jitter 0.01 as the original;
    never added to a fixed vertical axis) are drawn from ``seed`` (None: fresh entropy).
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    points = kernel_disposition(num_points, fixed) * radius
    rng = np.random.default_rng(seed)
    if rotate:
        points = points @ random_rotation(rng, vertical_only=fixed == "verticals")
    if jitter > 0 and fixed != "verticals":
        points = points + rng.normal(scale=jitter * radius, size=points.shape)
    return points.astype(np.float32)
