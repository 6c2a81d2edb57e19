"""Independent float64 numpy reference of the original KPConv formulation (tiled differences)."""

import numpy as np


def influence(d2, extent, influence, aggregation, deformable=False):
    if influence == "constant":
        w = (d2 < extent**2).astype(np.float64) if deformable else np.ones_like(d2)
    elif influence == "linear":
        w = np.maximum(1.0 - np.sqrt(d2) / extent, 0.0)
    else:
        w = np.exp(-d2 / (2 * (0.3 * extent) ** 2 + 1e-9))
    if aggregation == "closest":
        onehot = np.zeros_like(d2)
        idx = np.argmin(d2, axis=-1)
        np.put_along_axis(onehot, idx[..., None], 1.0, axis=-1)
        w = w * onehot
    return w


def kpconv_reference(q, s, n, f, kp, weights, extent, infl, agg, offsets=None, modulations=None):
    """Rigid (offsets None) or deformable KPConv in float64, as the original: loops-free but tiled."""
    q, s, f, kp, weights = (np.asarray(a, np.float64) for a in (q, s, f, kp, weights))
    deformable = offsets is not None
    shadow = 1000.0 if deformable else 1e6
    s_pad = np.concatenate([s, np.full((1, 3), shadow)], 0)
    f_pad = np.concatenate([f, np.zeros((1, f.shape[1]))], 0)
    y = s_pad[n] - q[:, None, :]  # [N, H, 3]
    kpts = kp[None] + np.asarray(offsets, np.float64) if deformable else kp[None]
    d2 = np.sum((y[:, :, None, :] - kpts[:, None, :, :]) ** 2, axis=-1)  # [N, H, K]
    w = influence(d2, extent, infl, agg, deformable)
    nf = f_pad[n]
    if deformable:
        in_range = np.any(d2 < extent**2, axis=-1)
        nf = nf * in_range[..., None]
    per_kernel = np.einsum("nhk,nhd->nkd", w, nf)
    if modulations is not None:
        per_kernel = per_kernel * np.asarray(modulations, np.float64)[:, :, None]
    return np.einsum("nkd,kde->ne", per_kernel, weights)


def random_problem(rng, nq=60, ns=90, h=12, d_in=4, d_out=5, k=15, extent=0.3, empty_rows=3):
    """Random clouds with sorted radius neighbours (2.5 extent), some queries isolated."""
    s = rng.uniform(-1, 1, (ns, 3)).astype(np.float32)
    q = np.concatenate(
        [
            s[: nq - empty_rows] + rng.normal(scale=0.05, size=(nq - empty_rows, 3)),
            rng.uniform(5, 6, (empty_rows, 3)),
        ]
    ).astype(np.float32)
    d = np.linalg.norm(q[:, None, :] - s[None], axis=-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :h]
    within = np.take_along_axis(d, order, 1) <= 2.5 * extent
    n = np.where(within, order, ns).astype(np.int32)
    f = rng.normal(size=(ns, d_in)).astype(np.float32)
    kp = (rng.normal(size=(k, 3)) * extent).astype(np.float32)
    kp[0] = 0.01 * extent
    w = (rng.normal(size=(k, d_in, d_out)) * 0.3).astype(np.float32)
    return q, s, n, f, kp, w
