"""Functional kernel point convolutions (rigid and deformable), standard TF ops only.

Both functions reproduce the original release's numerics, shadow conventions included:

* ``neighbors`` rows index the supports; the shadow index is ``Ns`` (number of supports). Shadow
  neighbours carry zero features, so they never contribute, and sit far away: at 1e6 in the rigid
  form and at 1000 in the deformable form (the offset losses see that 1000).
* Influence of kernel point k on a centred neighbour y, with d = |y - k|: ``constant`` is 1 for every
  neighbour in the rigid form and ``d < extent`` in the deformable form; ``linear`` is
  max(0, 1 - d / extent); ``gaussian`` is exp(-d^2 / (2 sigma^2 + 1e-9)) with sigma = 0.3 extent.
* ``closest`` keeps, per neighbour, only the nearest kernel point (first index on ties).
* Deformable: a neighbour is used only if it lies within ``extent`` (strict) of at least one deformed
  kernel point. The original compacts the neighbour list and redirects the others to the shadow
  index; zeroing their features is the same sum, needs no data-dependent shape (XLA-friendly), and is
  what we do. ``in_range_compaction`` gives the original's compacted indices for inspection.

The [N, H, K, 3] difference tensor that the original tiles is never built: squared distances come
from |y|^2 - 2 y.k + |k|^2 on query-centred coordinates, which keeps memory at [N, H, K].

``implementation`` chooses how the neighbour sums are computed: ``"standard"`` (default) uses only
standard TF ops, so it runs on any device and under XLA; ``"fused"`` uses the compiled CPU op
``tf_custom_ops.kernel_aggregate`` (float32 only; no [N, H, *] tensor, only non-zero influences are
accumulated); ``"auto"`` takes the fused op for float32 on a machine without a visible GPU and the
standard ops otherwise. Do not use the fused op inside ``jit_compile=True`` functions (it has no
XLA kernel).
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from kpconv_tf.config import AGGREGATIONS, INFLUENCES

IMPLEMENTATIONS = ("standard", "fused", "auto")

_RIGID_SHADOW = 1e6
_DEFORM_SHADOW = 1000.0


def _check_modes(influence: str, aggregation: str) -> None:
    if influence not in INFLUENCES:
        raise ValueError(f"influence must be one of {INFLUENCES}, got {influence!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


_FUSED_UNAVAILABLE = []  # the reason, once the compiled ops failed to load


def _fused_ops():
    """The compiled ops module, or None (with the reason recorded) when it cannot be built."""
    if _FUSED_UNAVAILABLE:
        return None
    try:
        import tf_custom_ops
    except Exception as error:  # a missing compiler or a failed build: fall back, say why once
        _FUSED_UNAVAILABLE.append(str(error))
        warnings.warn(
            f"kpconv_tf: the fused KPConv op is unavailable, using standard TF ops ({error})", stacklevel=3
        )
        return None
    return tf_custom_ops


def resolve_implementation(implementation: str, dtype=tf.float32) -> str:
    """``"standard"`` or ``"fused"`` for an ``implementation`` choice and the features' dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "standard":
        return "standard"
    if implementation == "fused":
        if tf.as_dtype(dtype) != tf.float32:
            raise TypeError(f"implementation='fused' needs float32 features, got {tf.as_dtype(dtype).name}")
        if _fused_ops() is None:
            raise RuntimeError(f"implementation='fused' needs the compiled ops: {_FUSED_UNAVAILABLE[0]}")
        return "fused"
    usable = tf.as_dtype(dtype) == tf.float32 and not tf.config.list_logical_devices("GPU")
    return "fused" if usable and _fused_ops() is not None else "standard"


def centred_neighbors(query_points, support_points, neighbors, shadow_value):
    """Neighbour coordinates relative to their query: float32 [Nq, H, 3].

    Shadow indices (== Ns) read a point at ``shadow_value`` on every axis.
    """
    shadow = tf.fill([1, 3], tf.cast(shadow_value, support_points.dtype))
    padded = tf.concat([support_points, shadow], axis=0)
    return tf.gather(padded, neighbors) - query_points[:, None, :]


def squared_distances(centred, kernel_points):
    """Squared distances between neighbours and kernel points without an [.., K, 3] tensor.

    ``centred`` [Nq, H, 3]; ``kernel_points`` [K, 3] (shared) or [Nq, K, 3] (per query).
    Returns [Nq, H, K], clamped at 0 against round-off.
    """
    y2 = tf.reduce_sum(tf.square(centred), axis=-1, keepdims=True)  # [Nq, H, 1]
    if kernel_points.shape.rank == 2:
        cross = tf.einsum("nhc,kc->nhk", centred, kernel_points)
        k2 = tf.reduce_sum(tf.square(kernel_points), axis=-1)[None, None, :]
    else:
        cross = tf.einsum("nhc,nkc->nhk", centred, kernel_points)
        k2 = tf.reduce_sum(tf.square(kernel_points), axis=-1)[:, None, :]
    return tf.maximum(y2 - 2.0 * cross + k2, 0.0)


def _safe_sqrt(d2):
    # sqrt has an infinite slope at 0; a neighbour exactly on a kernel point would give NaN gradients.
    return tf.sqrt(tf.maximum(d2, 1e-30))


def influence_weights(d2, extent, influence, aggregation, deformable=False):
    """Kernel point influences [Nq, H, K] from squared distances [Nq, H, K]."""
    extent = tf.cast(extent, d2.dtype)
    if influence == "constant":
        weights = tf.cast(d2 < tf.square(extent), d2.dtype) if deformable else tf.ones_like(d2)
    elif influence == "linear":
        weights = tf.maximum(1.0 - _safe_sqrt(d2) / extent, 0.0)
    else:
        sigma = 0.3 * extent
        weights = tf.exp(-d2 / (2.0 * tf.square(sigma) + 1e-9))
    if aggregation == "closest":
        nearest = tf.argmin(d2, axis=-1, output_type=tf.int32)
        weights = weights * tf.one_hot(nearest, tf.shape(d2)[-1], dtype=d2.dtype)
    return weights


def _kernel_sums(
    query_points,
    support_points,
    neighbors,
    features,
    kernel_points,
    extent,
    influence,
    aggregation,
    implementation,
    geometry_gradients=True,
):
    """sum_h w[n,h,k] f[neighbors[n,h],:] -> [Nq, K, Din].

    ``kernel_points`` [K, 3] is the rigid form; [Nq, K, 3] (kernel points plus offsets) the
    deformable one, which drops neighbours outside every influence sphere. Without
    ``geometry_gradients`` only the features get a gradient.
    """
    if resolve_implementation(implementation, features.dtype) == "fused":
        return _fused_ops().kernel_aggregate(
            query_points,
            support_points,
            neighbors,
            features,
            kernel_points,
            extent,
            influence,
            aggregation,
            geometry_gradients=geometry_gradients,
        )
    if not geometry_gradients:
        query_points, support_points, kernel_points = (
            tf.stop_gradient(x) for x in (query_points, support_points, kernel_points)
        )
    deformable = kernel_points.shape.rank == 3
    centred = centred_neighbors(
        query_points, support_points, neighbors, _DEFORM_SHADOW if deformable else _RIGID_SHADOW
    )
    d2 = squared_distances(centred, kernel_points)
    w = influence_weights(d2, extent, influence, aggregation, deformable=deformable)
    if deformable:
        in_range = tf.reduce_any(d2 < tf.square(tf.cast(extent, d2.dtype)), axis=-1)  # [Nq, H]
        w = w * tf.cast(in_range, w.dtype)[:, :, None]
    return tf.einsum("nhk,nhd->nkd", w, _gather_features(features, neighbors))


def _project(per_kernel, kernel_weights):
    """sum_k per_kernel[n,k,:] @ W_k -> [Nq, Dout]."""
    k = tf.shape(kernel_weights)[0]
    d_in = tf.shape(kernel_weights)[1]
    flat = tf.reshape(per_kernel, [-1, k * d_in])
    return tf.matmul(flat, tf.reshape(kernel_weights, [k * d_in, -1]))


def _as_tensors(features, *others):
    """Converts inputs to tensors of the features' float dtype (float32 unless float64 given)."""
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        features = tf.cast(features, tf.float32)
    return [features] + [tf.cast(tf.convert_to_tensor(x), features.dtype) for x in others]


def _gather_features(features, neighbors):
    padded = tf.concat([features, tf.zeros_like(features[:1])], axis=0)
    return tf.gather(padded, neighbors)


def kpconv(
    query_points,
    support_points,
    neighbors,
    features,
    kernel_points,
    weights,
    extent,
    influence="linear",
    aggregation="sum",
    implementation="standard",
    geometry_gradients=True,
):
    """Rigid KPConv.

    Args:
      query_points: float32 [Nq, 3]. support_points: float32 [Ns, 3].
      neighbors: int32 [Nq, H], indices into the supports, shadow index Ns.
      features: float32 [Ns, Din]. kernel_points: float32 [K, 3] (already scaled, ~1.5 * extent).
      weights: float32 [K, Din, Dout]. extent: influence distance (points' units).
      implementation: "standard", "fused" or "auto" (see the module docstring).
      geometry_gradients: False stops the gradient to the points and kernel points, which
        halves the fused backward pass (the layers' rigid convolutions need none).
    Returns:
      float32 [Nq, Dout].
    """
    _check_modes(influence, aggregation)
    features, query_points, support_points, kernel_points, weights = _as_tensors(
        features, query_points, support_points, kernel_points, weights
    )
    neighbors = tf.convert_to_tensor(neighbors, tf.int32)
    geometry = (query_points, support_points, neighbors)
    sums = _kernel_sums(
        *geometry, features, kernel_points, extent, influence, aggregation, implementation, geometry_gradients
    )
    return _project(sums, weights)


def kpconv_deformable(
    query_points,
    support_points,
    neighbors,
    features,
    kernel_points,
    offsets,
    weights,
    extent,
    influence="linear",
    aggregation="sum",
    modulations=None,
    implementation="standard",
):
    """Deformable KPConv with given offsets.

    Args:
      offsets: float32 [Nq, K, 3] in the points' units (already multiplied by extent).
      modulations: float32 [Nq, K] or None.
      Other arguments (``implementation`` included) as in ``kpconv``.
    Returns:
      float32 [Nq, Dout].
    """
    _check_modes(influence, aggregation)
    features, query_points, support_points, kernel_points, offsets, weights = _as_tensors(
        features, query_points, support_points, kernel_points, offsets, weights
    )
    if modulations is not None:
        modulations = tf.cast(modulations, features.dtype)
    neighbors = tf.convert_to_tensor(neighbors, tf.int32)
    geometry = (query_points, support_points, neighbors)
    deformed = kernel_points[None] + offsets
    sums = _kernel_sums(*geometry, features, deformed, extent, influence, aggregation, implementation)
    if modulations is not None:
        sums = sums * modulations[:, :, None]
    return _project(sums, weights)


def in_range_compaction(query_points, support_points, neighbors, deformed_kernel_points, extent):
    """The original deformable op's neighbour re-selection, for inspection and tests.

    Returns (new_max_neighb scalar int32, column indices [Nq, new_max] into ``neighbors``, in-range
    columns first in their original order, then the others, as the original's stable top_k).
    """
    deformed_kernel_points, query_points, support_points = _as_tensors(
        deformed_kernel_points, query_points, support_points
    )
    neighbors = tf.convert_to_tensor(neighbors, tf.int32)
    centred = centred_neighbors(query_points, support_points, neighbors, _DEFORM_SHADOW)
    d2 = squared_distances(centred, deformed_kernel_points)
    in_range = tf.cast(tf.reduce_any(d2 < tf.square(tf.cast(extent, d2.dtype)), axis=-1), tf.int32)
    new_max = tf.reduce_max(tf.reduce_sum(in_range, axis=1))
    _, columns = tf.math.top_k(in_range, k=new_max)
    return new_max, columns
