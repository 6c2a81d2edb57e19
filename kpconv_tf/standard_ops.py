"""Grid subsampling and radius neighbours of stacked clouds with standard TensorFlow ops only.

The same results as the compiled ``tf_custom_ops.batch_grid_subsampling`` / ``batch_neighbors``
(same cells, same barycentres and their order, same neighbour rows, widths and padding) on CPU or
GPU (they need float64, which TPUs lack), without loading a custom op library: what a portable
SavedModel or a GPU input pipeline needs. Both run eagerly and inside ``tf.function`` with unknown
shapes.

XLA (``jit_compile=True``): ``batch_grid_subsampling`` compiles (its sorts and segment sums are
sized by the input; only the final slice to the number of cells is data dependent, which XLA
bounds by the number of points), but XLA drops the value checks (finite coordinates, lengths that
sum to N, grid size), so validate such inputs before. ``batch_neighbors`` does not compile: its
candidate lists and its width H depend on the data, so call it outside the compiled function.

Arithmetic follows the C++ ops so that boundary cases agree: cell coordinates and squared
distances are computed in float64 from the float32 coordinates, ``d2 <= radius**2`` with the
radius taken as float32, and ``d2 = (dx*dx + dy*dy) + dz*dz``.
"""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

__all__ = ["batch_grid_subsampling", "batch_neighbors"]

# Cell keys of the neighbour search pack (cloud, k, j, i) into 61 bits of an int64.
_KEY_BITS = 61


def _points(value, name):
    t = tf.convert_to_tensor(value)
    if t.dtype in (tf.float16, tf.float64):
        t = tf.cast(t, tf.float32)
    if t.dtype != tf.float32:
        raise TypeError(f"{name} must be float32 (or float64, converted), got {t.dtype.name}")
    if t.shape.rank is not None and (t.shape.rank != 2 or t.shape[-1] not in (None, 3)):
        raise ValueError(f"{name} must have shape [N, 3], got {t.shape}")
    return tf.debugging.assert_all_finite(t, f"{name} has a NaN or infinite coordinate")


def _lengths(value, name, points, points_name):
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 1:
        raise ValueError(f"{name} must be a vector [B], got shape {t.shape}")
    t = tf.cast(t, tf.int32)
    checks = [
        tf.debugging.assert_non_negative(t, message=f"{name} has a negative length"),
        tf.debugging.assert_equal(
            tf.reduce_sum(t),
            tf.shape(points)[0],
            message=f"{name} does not sum to the number of {points_name}",
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(t)


def _positive_scalar(value, name):
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0 < value < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    t = tf.convert_to_tensor(value, dtype_hint=tf.float32)
    if t.shape.rank not in (None, 0):
        raise ValueError(f"{name} must be a scalar, got shape {t.shape}")
    t = tf.cast(t, tf.float32)
    check = tf.debugging.assert_positive(t, message=f"{name} must be > 0")
    with tf.control_dependencies([check]):
        return tf.cast(tf.debugging.assert_all_finite(t, f"{name} must be finite"), tf.float64)


def _cloud_of(lengths, n):
    """int32 [n]: the cloud index of every stacked point (without tf.repeat, so XLA sizes it)."""
    return tf.searchsorted(tf.cumsum(lengths), tf.range(n), side="right")


def _bounding_boxes(points, cloud, lengths):
    """Per-cloud float64 min and max corners [B, 3] (zeros for empty clouds, as the C++ ops)."""
    b = tf.shape(lengths)[0]
    present = (lengths > 0)[:, None]
    lo = tf.where(present, tf.math.unsorted_segment_min(points, cloud, b), 0.0)
    hi = tf.where(present, tf.math.unsorted_segment_max(points, cloud, b), 0.0)
    return tf.cast(lo, tf.float64), tf.cast(hi, tf.float64)


def batch_grid_subsampling(points, lengths, sample_dl, features=None):
    """Barycentric grid subsampling of stacked clouds (standard ops; see the module docstring).

    Per cloud, one point per non-empty cell of a grid of size ``sample_dl`` anchored at
    floor(min_corner / sample_dl) * sample_dl: the barycentre of its points (summed in float64),
    in ascending cell-key order, as ``tf_custom_ops.batch_grid_subsampling``.

    Args:
      points: float32 [N, 3]. lengths: int32 [B], points per cloud. sample_dl: float > 0.
      features: optional float32 [N, D], averaged per cell.
    Returns:
      (sub_points float32 [M, 3], sub_lengths int32 [B]), then sub_features [M, D] when given.
    """
    points = _points(points, "points")
    values = tf.cast(points, tf.float64)
    if features is not None:
        features = tf.convert_to_tensor(features)
        if not features.dtype.is_floating:
            raise TypeError(f"features must be floating point, got {features.dtype.name}")
        if features.shape.rank is not None and features.shape.rank != 2:
            raise ValueError(f"features must have shape [N, D], got {features.shape}")
        check = tf.debugging.assert_equal(
            tf.shape(features)[0], tf.shape(points)[0], message="features must have one row per point"
        )
        with tf.control_dependencies([check]):
            # Through float32, as the compiled op reads them.
            values = tf.concat([values, tf.cast(tf.cast(features, tf.float32), tf.float64)], 1)
    lengths = _lengths(lengths, "lengths", points, "points")
    dl = _positive_scalar(sample_dl, "sample_dl")
    n = tf.shape(points)[0]
    cloud = _cloud_of(lengths, n)
    lo, hi = _bounding_boxes(points, cloud, lengths)
    origin = tf.floor(lo / dl) * dl
    span = tf.floor((hi - origin) / dl) + 1.0
    check = tf.debugging.assert_less(
        tf.reduce_max(tf.concat([span / 2e6, tf.reduce_prod(span, axis=1, keepdims=True) / 4e18], 1)),
        tf.constant(1.0, tf.float64),
        message="sample_dl is too small for the cloud extent: the grid would overflow its cell keys",
    )
    with tf.control_dependencies([check]):
        coords = tf.floor((values[:, :3] - tf.gather(origin, cloud)) / dl)
    coords = tf.minimum(tf.maximum(coords, 0.0), tf.gather(span, cloud) - 1.0)
    c = tf.cast(coords, tf.int64)
    dims = tf.cast(tf.gather(span, cloud), tf.int64)
    key = c[:, 0] + dims[:, 0] * (c[:, 1] + dims[:, 1] * c[:, 2])
    # Stable sorts by key, then by cloud: (cloud, key) order with the point order inside a cell, so
    # the float64 sums run in the same order as the C++ op's.
    order = tf.argsort(key, stable=True)
    order = tf.gather(order, tf.argsort(tf.gather(cloud, order), stable=True))
    sorted_key, sorted_cloud = tf.gather(key, order), tf.gather(cloud, order)
    first = (
        (sorted_key != tf.roll(sorted_key, 1, 0))
        | (sorted_cloud != tf.roll(sorted_cloud, 1, 0))
        | (tf.range(n) == 0)
    )
    cell = tf.cumsum(tf.cast(first, tf.int32)) - 1
    num_cells = tf.reduce_sum(tf.cast(first, tf.int32))
    sums = tf.math.unsorted_segment_sum(tf.gather(values, order), cell, n)
    counts = tf.math.unsorted_segment_sum(tf.ones([n], tf.float64), cell, n)
    means = tf.cast(sums[:num_cells] / counts[:num_cells, None], tf.float32)
    sub_lengths = tf.math.unsorted_segment_sum(tf.cast(first, tf.int32), sorted_cloud, tf.shape(lengths)[0])
    if features is None:
        return means, sub_lengths
    return means[:, :3], sub_lengths, means[:, 3:]


def batch_neighbors(queries, supports, q_lengths, s_lengths, radius, max_neighbors=0):
    """Radius neighbours of stacked clouds (standard ops; see the module docstring).

    Supports are hashed per cloud into cells at least one radius wide and sorted by (cloud, cell);
    each query gathers the supports of its 27 neighbouring cells (9 runs of 3 consecutive cells,
    located by ``tf.searchsorted``) and measures distances to those candidates only.

    Args:
      queries: float32 [Nq, 3]. supports: float32 [Ns, 3].
      q_lengths, s_lengths: int32 [B], points per cloud; a query only sees the supports of its cloud.
      radius: float > 0; a support is a neighbour when its distance is <= radius.
      max_neighbors: int >= 0; when > 0, rows keep only the nearest ``max_neighbors``.
    Returns:
      int32 [Nq, H]: per row the stacked support indices sorted by increasing distance (ties by
      index), padded with the shadow index Ns; H is the largest row (cropped to max_neighbors).
    """
    if isinstance(max_neighbors, numbers.Integral) and max_neighbors < 0:
        raise ValueError(f"max_neighbors must be >= 0, got {max_neighbors}")
    queries = _points(queries, "queries")
    supports = _points(supports, "supports")
    q_lengths = _lengths(q_lengths, "q_lengths", queries, "queries")
    s_lengths = _lengths(s_lengths, "s_lengths", supports, "supports")
    radius = _positive_scalar(radius, "radius")
    max_neighbors = tf.cast(max_neighbors, tf.int32)
    check = tf.debugging.assert_equal(
        tf.shape(q_lengths),
        tf.shape(s_lengths),
        message="q_lengths and s_lengths must have the same number of clouds",
    )
    with tf.control_dependencies(
        [check, tf.debugging.assert_non_negative(max_neighbors, message="max_neighbors must be >= 0")]
    ):
        nq, ns, b = tf.shape(queries)[0], tf.shape(supports)[0], tf.shape(q_lengths)[0]
    q_cloud, s_cloud = _cloud_of(q_lengths, nq), _cloud_of(s_lengths, ns)

    # Cells per axis: a power of two small enough for (cloud, k, j, i) to fit the key bits.
    cloud_bits = tf.cast(tf.math.ceil(tf.math.log(tf.cast(b + 1, tf.float64)) / math.log(2.0)), tf.int64)
    side = tf.bitwise.left_shift(tf.constant(1, tf.int64), (_KEY_BITS - cloud_bits) // 3)
    lo, hi = _bounding_boxes(supports, s_cloud, s_lengths)
    # Cells a little wider than the radius: a neighbour is then never two cells away, whatever the
    # rounding of the cell coordinates; wider still when the cloud spans more than `side` cells.
    extent = tf.reduce_max(hi - lo, axis=1)
    cell = tf.maximum(radius * (1.0 + 2.0**-20), extent / tf.cast(side - 1, tf.float64))

    def cell_coords(points, cloud):
        x = (tf.cast(points, tf.float64) - tf.gather(lo, cloud)) / tf.gather(cell, cloud)[:, None]
        # Clamping keeps a neighbour within one cell: both points move towards the border together.
        x = tf.minimum(tf.maximum(tf.floor(x), 0.0), tf.cast(side - 1, tf.float64))
        return tf.cast(x, tf.int64)

    s = cell_coords(supports, s_cloud)
    s_key = ((tf.cast(s_cloud, tf.int64) * side + s[:, 2]) * side + s[:, 1]) * side + s[:, 0]
    s_order = tf.argsort(s_key, stable=True)
    sorted_keys = tf.gather(s_key, s_order)

    q = cell_coords(queries, q_cloud)
    offsets = tf.constant([-1, 0, 1], tf.int64)
    j = q[:, 1:2, None] + offsets[None, :, None]  # [Nq, 3, 1]
    k = q[:, 2:3, None] + offsets[None, None, :]  # [Nq, 1, 3]
    valid = tf.reshape((j >= 0) & (j < side) & (k >= 0) & (k < side), [nq, 9])
    row_key = tf.reshape((tf.cast(q_cloud, tf.int64)[:, None, None] * side + k) * side + j, [nq, 9]) * side
    first_key = row_key + tf.maximum(q[:, :1] - 1, 0)
    last_key = row_key + tf.minimum(q[:, :1] + 1, side - 1)
    begin = tf.searchsorted(sorted_keys, tf.reshape(first_key, [-1]), side="left")
    end = tf.searchsorted(sorted_keys, tf.reshape(last_key, [-1]), side="right")
    run_size = tf.where(tf.reshape(valid, [-1]), end - begin, 0)

    # Candidates: every (query, support) pair of the runs, query-major, as (query, sorted position).
    run_start = tf.cumsum(run_size, exclusive=True)
    total = tf.reduce_sum(run_size)
    first_run = tf.range(tf.size(run_size)) > 0

    def per_candidate(value):
        """The value of the run holding each candidate: cumulative sums of per-run steps placed at
        the run starts (empty runs add steps that the next run cancels), cheaper than tf.repeat."""
        steps = value - tf.where(first_run, tf.roll(value, 1, 0), 0)
        return tf.cumsum(tf.math.unsorted_segment_sum(steps, run_start, total + 1)[:total])

    position = tf.range(total) + per_candidate(begin - run_start)
    query = per_candidate(tf.range(tf.size(run_size)) // 9)
    # A float32 pass keeps a superset of the hits (its relative error on d2 is below 1e-6; the
    # absolute 1e-30 covers float32 underflow), then the exact float64 test of the C++ op decides.
    sorted_supports = tf.gather(supports, s_order)
    delta = tf.gather(sorted_supports, position) - tf.gather(queries, query)
    loose = tf.cast(radius * radius * (1.0 + 1e-5) + 1e-30, tf.float32)
    near = tf.where(tf.reduce_sum(delta * delta, 1) <= loose)
    position, query = tf.gather(position, near[:, 0]), tf.gather(query, near[:, 0])
    delta = tf.cast(tf.gather(sorted_supports, position), tf.float64) - tf.cast(
        tf.gather(queries, query), tf.float64
    )
    square = delta * delta
    d2 = (square[:, 0] + square[:, 1]) + square[:, 2]
    hit = tf.where(d2 <= radius * radius)[:, 0]
    hit_query = tf.gather(query, hit)
    hit_id = tf.gather(s_order, tf.gather(position, hit))
    hit_d2 = tf.gather(d2, hit)

    # Rows: the hits (query-major) gathered into a padded [Nq, W] matrix and ordered by d2; only when
    # some row holds equal distances (duplicates, lattices) are the rows sorted again by (d2, index).
    count = tf.math.bincount(hit_query, minlength=nq, maxlength=nq)
    width = tf.reduce_max(tf.concat([count, [0]], 0))
    column = tf.range(width)
    source = tf.where(
        column[None, :] < count[:, None],
        tf.cumsum(count, exclusive=True)[:, None] + column[None, :],
        tf.size(hit_query),
    )
    ids = tf.gather(tf.concat([hit_id, [ns]], 0), source)
    dist = tf.gather(tf.concat([hit_d2, tf.constant([float("inf")], tf.float64)], 0), source)
    by_distance = tf.argsort(dist, axis=1, stable=True)
    sorted_dist = tf.gather(dist, by_distance, batch_dims=1)
    ties = tf.reduce_any((sorted_dist[:, 1:] == sorted_dist[:, :-1]) & (sorted_dist[:, 1:] < float("inf")))

    def by_distance_then_index():
        by_index = tf.argsort(ids, axis=1, stable=True)
        order = tf.argsort(tf.gather(dist, by_index, batch_dims=1), axis=1, stable=True)
        return tf.gather(tf.gather(ids, by_index, batch_dims=1), order, batch_dims=1)

    ids = tf.cond(ties, by_distance_then_index, lambda: tf.gather(ids, by_distance, batch_dims=1))
    keep = tf.where(max_neighbors > 0, tf.minimum(width, max_neighbors), width)
    return ids[:, :keep]
