"""Compiled CPU ops: radius neighbours and grid subsampling for input pyramids, and the fused
neighbour sum of a kernel point convolution (``kernel_aggregate``), the max over pooling neighbours
(``max_pool``) and training-mode batch normalisation (``batch_norm``), all three differentiable.

Importing this package compiles the ops on first use (see ``tf_custom_ops.build``) and loads them.
Points are float32 ``[N, 3]`` (float64 input is converted to float32); a batch is a stack of
clouds described by int32 per-cloud lengths ``[B]``. The ops are not differentiable and run
eagerly, inside ``tf.function`` and inside ``tf.data`` maps; ``kernel_aggregate``, ``max_pool`` and
``batch_norm`` have registered gradients.
"""

from __future__ import annotations

import numbers

import tensorflow as tf

from tf_custom_ops._build import BuildError
from tf_custom_ops._build import build as _build_library

__all__ = [
    "batch_neighbors",
    "batch_grid_subsampling",
    "neighbors",
    "grid_subsampling",
    "kernel_aggregate",
    "max_pool",
    "batch_norm",
    "BuildError",
]

_ops = tf.load_op_library(str(_build_library()))
tf.no_gradient("KpconvBatchNeighbors")
tf.no_gradient("KpconvBatchGridSubsampling")


def _points(value, name):
    t = tf.convert_to_tensor(value)
    if t.dtype == tf.float64 or t.dtype == tf.float16:
        t = tf.cast(t, tf.float32)
    if t.dtype != tf.float32:
        raise TypeError(f"{name} must be float32 (or float64, converted), got {t.dtype.name}")
    if t.shape.rank is not None and (t.shape.rank != 2 or t.shape[-1] not in (None, 3)):
        raise ValueError(f"{name} must have shape [N, 3], got {t.shape}")
    return t


def _lengths(value, name):
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 1:
        raise ValueError(f"{name} must be a vector [B], got shape {t.shape}")
    return tf.cast(t, tf.int32)


def _positive_scalar(value, name):
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not (value > 0 and value < float("inf"))
    ):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    t = tf.convert_to_tensor(value, dtype_hint=tf.float32)
    if t.shape.rank not in (None, 0):
        raise ValueError(f"{name} must be a scalar, got shape {t.shape}")
    return tf.cast(t, tf.float32)


def _typed(value, name, dtype):
    """``value`` as a tensor that must already be of ``dtype`` (no silent conversion)."""
    t = tf.convert_to_tensor(value)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype.name}, got {t.dtype.name}")
    return t


def _optional(value, name, kind, rank, dtype):
    """Checks an optional per-point input (floating features [N, D] or integer labels [N])."""
    t = tf.convert_to_tensor(value)
    if not getattr(t.dtype, kind):
        wanted = "floating point" if kind == "is_floating" else "an integer tensor"
        raise TypeError(f"{name} must be {wanted}, got {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != rank:
        shape = "[N, D]" if rank == 2 else "[N]"
        raise ValueError(f"{name} must have shape {shape}, got {t.shape}")
    return tf.cast(t, dtype)


def batch_neighbors(queries, supports, q_lengths, s_lengths, radius, max_neighbors=0):
    """Radius neighbours of stacked clouds.

    Args:
      queries: float32 [Nq, 3]. supports: float32 [Ns, 3].
      q_lengths, s_lengths: int32 [B], points per cloud (same number of clouds); a query only sees
        the supports of its own cloud.
      radius: float > 0; a support is a neighbour when its distance is <= radius.
      max_neighbors: int >= 0; when > 0, rows keep only the nearest ``max_neighbors``.
    Returns:
      int32 [Nq, H]: per row the stacked support indices sorted by increasing distance (ties by
      index), padded with the shadow index Ns. H is the largest neighbourhood (or max_neighbors).
    """
    if isinstance(max_neighbors, numbers.Integral) and max_neighbors < 0:
        raise ValueError(f"max_neighbors must be >= 0, got {max_neighbors}")
    return _ops.kpconv_batch_neighbors(
        _points(queries, "queries"),
        _points(supports, "supports"),
        _lengths(q_lengths, "q_lengths"),
        _lengths(s_lengths, "s_lengths"),
        _positive_scalar(radius, "radius"),
        tf.cast(max_neighbors, tf.int32),
    )


def batch_grid_subsampling(points, lengths, sample_dl, features=None, labels=None):
    """Barycentric grid subsampling of stacked clouds.

    Per cloud, one point per non-empty cell of a grid of size ``sample_dl`` anchored at
    floor(min_corner / sample_dl) * sample_dl: the barycentre of the cell's points. Output points
    of a cloud come in ascending cell order (deterministic).

    Args:
      points: float32 [N, 3]. lengths: int32 [B]. sample_dl: float > 0.
      features: optional float32 [N, D], averaged per cell.
      labels: optional int32 [N], majority vote per cell (ties go to the smaller label).
    Returns:
      (sub_points float32 [M, 3], sub_lengths int32 [B]) followed by sub_features [M, D] and/or
      sub_labels [M] when given.
    """
    points = _points(points, "points")
    has_features = features is not None
    has_labels = labels is not None
    n = tf.shape(points)[0]
    f = (
        _optional(features, "features", "is_floating", 2, tf.float32)
        if has_features
        else tf.zeros([n, 0], tf.float32)
    )
    lab = _optional(labels, "labels", "is_integer", 1, tf.int32) if has_labels else tf.zeros([0], tf.int32)
    sub_points, sub_lengths, sub_features, sub_labels = _ops.kpconv_batch_grid_subsampling(
        points, _lengths(lengths, "lengths"), _positive_scalar(sample_dl, "sample_dl"), f, lab
    )
    out = [sub_points, sub_lengths]
    if has_features:
        out.append(sub_features)
    if has_labels:
        # With zero points the op cannot tell "no labels" from "empty labels": shape them [M].
        out.append(tf.reshape(sub_labels, [tf.shape(sub_points)[0]]))
    return tuple(out)


def neighbors(queries, supports, radius, max_neighbors=0):
    """Single-cloud ``batch_neighbors``: int32 [Nq, H], shadow index = number of supports."""
    queries = _points(queries, "queries")
    supports = _points(supports, "supports")
    return batch_neighbors(
        queries, supports, tf.shape(queries)[:1], tf.shape(supports)[:1], radius, max_neighbors
    )


def grid_subsampling(points, sample_dl, features=None, labels=None):
    """Single-cloud ``batch_grid_subsampling``: sub_points [, sub_features] [, sub_labels]."""
    points = _points(points, "points")
    out = batch_grid_subsampling(points, tf.shape(points)[:1], sample_dl, features, labels)
    rest = out[2:]
    return out[0] if not rest else (out[0],) + tuple(rest)


def kernel_aggregate(
    query_points,
    support_points,
    neighbors,
    features,
    kernel_points,
    extent,
    influence="linear",
    aggregation="sum",
    geometry_gradients=True,
):
    """Fused neighbour sums of a kernel point convolution (CPU), with a registered gradient.

    Computes ``sum_h w[n, h, k] * features[neighbors[n, h]]`` with the influences of
    ``kpconv_tf.ops`` (``influence`` constant / linear / gaussian, ``aggregation`` sum / closest);
    multiplying the result, reshaped to [Nq, K * Din], by the [K * Din, Dout] weights gives the
    convolution. Shadow neighbours (index Ns) contribute nothing.

    Args:
      query_points: float32 [Nq, 3]. support_points: float32 [Ns, 3].
      neighbors: int32 [Nq, H], indices into the supports in [0, Ns] (Ns = shadow).
      features: float32 [Ns, Din].
      kernel_points: float32 [K, 3] (rigid) or [Nq, K, 3] (deformable: kernel points plus offsets;
        a neighbour outside every influence sphere (d >= extent) is dropped).
      extent: float > 0, the influence distance in the points' units.
      geometry_gradients: False when no gradient is wanted for the points and kernel points (the
        rigid layers': their kernel points are fixed and points are data); the backward pass then
        only computes the features' gradient, about half its work.
    Returns:
      float32 [Nq, K, Din]. Gradients flow to all float inputs but ``extent`` (to ``features``
      only when ``geometry_gradients`` is False).
    """
    if influence not in ("constant", "linear", "gaussian"):
        raise ValueError(f"influence must be 'constant', 'linear' or 'gaussian', got {influence!r}")
    if aggregation not in ("sum", "closest"):
        raise ValueError(f"aggregation must be 'sum' or 'closest', got {aggregation!r}")
    kernel_points = tf.convert_to_tensor(kernel_points, tf.float32)
    if kernel_points.shape.rank not in (2, 3):
        raise ValueError(f"kernel_points must have shape [K, 3] or [Nq, K, 3], got {kernel_points.shape}")
    features = _typed(features, "features", tf.float32)
    if features.shape.rank is not None and features.shape.rank != 2:
        raise ValueError(f"features must have shape [Ns, Din], got {features.shape}")
    neighbors = _typed(neighbors, "neighbors", tf.int32)
    return _ops.kpconv_kernel_aggregate(
        _points(query_points, "query_points"),
        _points(support_points, "support_points"),
        neighbors,
        features,
        kernel_points,
        _positive_scalar(extent, "extent"),
        influence=influence,
        aggregation=aggregation,
        deformable=kernel_points.shape.rank == 3,
        geometry_gradients=bool(geometry_gradients),
    )


@tf.RegisterGradient("KpconvKernelAggregate")
def _kernel_aggregate_grad(op, grad):
    names = ("influence", "aggregation", "deformable", "geometry_gradients")
    attrs = {name: op.get_attr(name) for name in names}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    support_points, neighbors = op.inputs[1], op.inputs[2]
    grad_features, grad_kernel_points, grad_centred = _ops.kpconv_kernel_aggregate_grad(
        *op.inputs, grad, **attrs
    )
    if not attrs["geometry_gradients"]:
        return [None, None, None, grad_features, None, None]
    # Centred neighbours are support - query: fold their gradient back onto both point sets.
    num_supports = tf.shape(support_points)[0]
    grad_supports = tf.math.unsorted_segment_sum(grad_centred, neighbors, num_supports + 1)[:num_supports]
    grad_queries = -tf.reduce_sum(grad_centred, axis=1)
    return [grad_queries, grad_supports, None, grad_features, grad_kernel_points, None]


def max_pool(features, shadow, pools):
    """Channel-wise max over pooling neighbours (CPU), with a registered gradient.

    Equals ``reduce_max(gather(concat([features, shadow[None]]), pools), axis=1)`` and its gradient
    (ties share the gradient equally, as ``reduce_max``'s does) without the [M, H, C] gather.

    Args:
      features: float32 [Ns, C]. shadow: float32 [C], the row that index Ns reads.
      pools: int32 [M, H], indices in [0, Ns].
    Returns:
      float32 [M, C]; a row with H = 0 is -inf.
    """
    return _ops.kpconv_max_pool(
        _typed(features, "features", tf.float32),
        tf.convert_to_tensor(shadow, tf.float32),
        _typed(pools, "pools", tf.int32),
    )


@tf.RegisterGradient("KpconvMaxPool")
def _max_pool_grad(op, grad):
    grad_features, grad_shadow = _ops.kpconv_max_pool_grad(*op.inputs, op.outputs[0], grad)
    return [grad_features, grad_shadow, None]


def batch_norm(x, gamma, beta, epsilon):
    """Training-mode batch normalisation over the rows of ``x`` (CPU), with a registered gradient.

    ``y = (x - mean) * gamma / sqrt(variance + epsilon) + beta`` with the batch mean and the biased
    batch variance, accumulated in float64 (more accurate than float32 reductions; independent of
    the number of threads).

    Args:
      x: float32 [N, C]. gamma, beta: float32 [C]. epsilon: float >= 0.
    Returns:
      (y float32 [N, C], mean [C], variance [C]); the gradient flows from ``y`` to ``x``, ``gamma``
      and ``beta`` (``mean`` and ``variance`` are statistics, not differentiated). N = 0 gives NaN
      statistics, as a mean over no rows does.
    """
    x = _typed(x, "x", tf.float32)
    if not (isinstance(epsilon, numbers.Real) and 0 <= epsilon < float("inf")):
        raise ValueError(f"epsilon must be a finite float >= 0, got {epsilon!r}")
    return _ops.kpconv_batch_norm(
        x, tf.convert_to_tensor(gamma, tf.float32), tf.convert_to_tensor(beta, tf.float32), epsilon=epsilon
    )


@tf.RegisterGradient("KpconvBatchNorm")
def _batch_norm_grad(op, grad, unused_grad_mean, unused_grad_variance):
    x, gamma, _ = op.inputs
    _, mean, variance = op.outputs
    grad_x, grad_gamma, grad_beta = _ops.kpconv_batch_norm_grad(
        x, gamma, mean, variance, grad, epsilon=op.get_attr("epsilon")
    )
    return [grad_x, grad_gamma, grad_beta]
