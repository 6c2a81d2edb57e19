"""Grid subsampling and radius neighbours of stacked clouds with standard TensorFlow ops only.

The same results as the compiled ``tf_custom_ops.batch_grid_subsampling`` / ``batch_neighbors``
(same cells, same barycentres and their order, same neighbour rows, widths and padding) on CPU or
GPU (they need float64, which TPUs lack), without loading a custom op library: what a portable
SavedModel or a GPU input pipeline needs. Both run eagerly and inside ``tf.function`` with unknown
shapes; called eagerly, each runs as one graph traced once (input signatures of unknown shapes), as
eager dispatch of their small ops would cost more than the work on small clouds.

Cost (``batch_neighbors``, CPU): per call a few sorts and searches over the points and cells
(one cell sort when queries and supports are the same tensors, as for the convolutions), a float32
pre-test over every (query, candidate) pair of each occupied query cell (27 cells of one radius,
padded to the bucket's largest cell) as one batched matmul of rows packed once per point, then per
near pair a float64 distance from two [K, 4] gathers, and the row sort (``tf.math.top_k`` on rows
grouped by quarter powers of two of their length; only the rows holding equal distances are sorted
again by index). On W2's first convolution (one thread) about a third of the op time is gathers,
a fifth the row sort, a fifth the per-call sorts, searches and packing, a tenth the pre-test and
its ``tf.where``; a call costs ~3 ms even on tiny clouds (graph and loop overhead).

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


_POINTS = tf.TensorSpec([None, 3], tf.float32)
_LENGTHS = tf.TensorSpec([None], tf.int32)
_SCALAR = tf.TensorSpec([], tf.float32)


def _points(value, name):
    """float32 [N, 3] tensor of `value` (float16 / float64 converted); the static checks."""
    t = tf.convert_to_tensor(value)
    if t.dtype in (tf.float16, tf.float64):
        t = tf.cast(t, tf.float32)
    if t.dtype != tf.float32:
        raise TypeError(f"{name} must be float32 (or float64, converted), got {t.dtype.name}")
    if t.shape.rank is not None and (t.shape.rank != 2 or t.shape[-1] not in (None, 3)):
        raise ValueError(f"{name} must have shape [N, 3], got {t.shape}")
    return t


def _lengths(value, name):
    """int32 [B] tensor of `value`; the static checks."""
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 1:
        raise ValueError(f"{name} must be a vector [B], got shape {t.shape}")
    return tf.cast(t, tf.int32)


def _positive_scalar(value, name):
    """float32 scalar tensor of `value`; a Python number is checked here, a tensor in the graph."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0 < value < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    t = tf.convert_to_tensor(value, dtype_hint=tf.float32)
    if t.shape.rank not in (None, 0):
        raise ValueError(f"{name} must be a scalar, got shape {t.shape}")
    return tf.cast(t, tf.float32)


def _checked_points(t, name):
    return tf.debugging.assert_all_finite(t, f"{name} has a NaN or infinite coordinate")


def _checked_lengths(t, name, points, points_name):
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


def _checked_scalar(t, name):
    """float64 of the float32 scalar `t`, checked > 0 and finite."""
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
    lengths = _lengths(lengths, "lengths")
    sample_dl = _positive_scalar(sample_dl, "sample_dl")
    if features is None:
        return _subsampling(points, lengths, sample_dl)
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        raise TypeError(f"features must be floating point, got {features.dtype.name}")
    if features.shape.rank is not None and features.shape.rank != 2:
        raise ValueError(f"features must have shape [N, D], got {features.shape}")
    # Through float32, as the compiled op reads them.
    return _subsampling_with_features(points, lengths, sample_dl, tf.cast(features, tf.float32))


# One graph per signature, also when called eagerly: eager dispatch of the ~60 small ops cost more
# than the subsampling itself on pyramid layers of a few thousand points.
@tf.function(input_signature=[_POINTS, _LENGTHS, _SCALAR], autograph=False)
def _subsampling(points, lengths, sample_dl):
    return _grid_subsampling(points, lengths, sample_dl, None)


@tf.function(
    input_signature=[_POINTS, _LENGTHS, _SCALAR, tf.TensorSpec([None, None], tf.float32)], autograph=False
)
def _subsampling_with_features(points, lengths, sample_dl, features):
    return _grid_subsampling(points, lengths, sample_dl, features)


def _grid_subsampling(points, lengths, sample_dl, features):
    points = _checked_points(points, "points")
    values = tf.cast(points, tf.float64)
    if features is not None:
        check = tf.debugging.assert_equal(
            tf.shape(features)[0], tf.shape(points)[0], message="features must have one row per point"
        )
        with tf.control_dependencies([check]):
            values = tf.concat([values, tf.cast(features, tf.float64)], 1)
    lengths = _checked_lengths(lengths, "lengths", points, "points")
    dl = _checked_scalar(sample_dl, "sample_dl")
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

    Supports and queries are hashed per cloud into cells at least one radius wide and sorted by
    (cloud, cell). Each occupied query cell takes the supports of its 27 neighbouring cells (9 runs
    of 3 consecutive cells, located by ``tf.searchsorted``) as its candidates; query cells are
    processed in buckets of equal (queries per cell, candidates per cell) powers of two, each a
    dense block [cells, queries, candidates] of distances, so coordinates are gathered per cell
    rather than per (query, candidate) pair.

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
    if queries is supports and q_lengths is s_lengths:
        # A convolution's neighbours: one cell sort serves both sides.
        return _self_neighbors(
            _points(queries, "queries"),
            _lengths(q_lengths, "q_lengths"),
            _positive_scalar(radius, "radius"),
            tf.cast(max_neighbors, tf.int32),
        )
    return _neighbors(
        _points(queries, "queries"),
        _points(supports, "supports"),
        _lengths(q_lengths, "q_lengths"),
        _lengths(s_lengths, "s_lengths"),
        _positive_scalar(radius, "radius"),
        tf.cast(max_neighbors, tf.int32),
    )


# Powers of two that fit int32: the bucket level of a count n is the smallest l with 2**l >= n
# (31 above 2**30).
_POWERS = [2**i for i in range(31)]
# Row-length groups: counts up to the same quarter power of two (int32).
_WIDTHS = sorted({math.ceil(2 ** (i / 4)) for i in range(124)})


@tf.function(
    input_signature=[_POINTS, _POINTS, _LENGTHS, _LENGTHS, _SCALAR, tf.TensorSpec([], tf.int32)],
    autograph=False,
)
def _neighbors(queries, supports, q_lengths, s_lengths, radius, max_neighbors):
    return _radius_neighbors(queries, supports, q_lengths, s_lengths, radius, max_neighbors, False)


@tf.function(input_signature=[_POINTS, _LENGTHS, _SCALAR, tf.TensorSpec([], tf.int32)], autograph=False)
def _self_neighbors(points, lengths, radius, max_neighbors):
    return _radius_neighbors(points, points, lengths, lengths, radius, max_neighbors, True)


def _radius_neighbors(queries, supports, q_lengths, s_lengths, radius, max_neighbors, same):
    """batch_neighbors' graph; `same`: queries and supports are the same points and lengths."""
    queries = _checked_points(queries, "queries")
    supports = _checked_points(supports, "supports")
    q_lengths = _checked_lengths(q_lengths, "q_lengths", queries, "queries")
    s_lengths = _checked_lengths(s_lengths, "s_lengths", supports, "supports")
    radius = _checked_scalar(radius, "radius")
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

    def cell_keys(points, cloud):
        """int64 [N, 3] cell coordinates and [N] keys (cloud, k, j, i) of the points."""
        x = (tf.cast(points, tf.float64) - tf.gather(lo, cloud)) / tf.gather(cell, cloud)[:, None]
        # Clamping keeps a neighbour within one cell: both points move towards the border together.
        x = tf.cast(tf.minimum(tf.maximum(tf.floor(x), 0.0), tf.cast(side - 1, tf.float64)), tf.int64)
        return x, ((tf.cast(cloud, tf.int64) * side + x[:, 2]) * side + x[:, 1]) * side + x[:, 0]

    _, s_key = cell_keys(supports, s_cloud)
    s_order = tf.argsort(s_key, stable=True)
    sorted_keys = tf.gather(s_key, s_order)
    if same:
        q, q_order, sorted_q_key = cell_keys(queries, q_cloud)[0], s_order, sorted_keys
    else:
        q, q_key = cell_keys(queries, q_cloud)
        q_order = tf.argsort(q_key, stable=True)
        sorted_q_key = tf.gather(q_key, q_order)

    # Occupied query cells: their first sorted query, query count, coordinates and cloud.
    first = tf.cast(
        tf.where((sorted_q_key != tf.roll(sorted_q_key, 1, 0)) | (tf.range(nq) == 0))[:, 0], tf.int32
    )
    q_count = tf.concat([first[1:], [nq]], 0) - first
    representative = tf.gather(q_order, first)
    qc, qc_cloud = tf.gather(q, representative), tf.gather(q_cloud, representative)
    u = tf.size(first)

    # The 9 runs of 3 cells around each query cell, as ranges of sorted supports.
    offsets = tf.constant([-1, 0, 1], tf.int64)
    j = qc[:, 1:2, None] + offsets[None, :, None]  # [U, 3, 1]
    k = qc[:, 2:3, None] + offsets[None, None, :]  # [U, 1, 3]
    valid = tf.reshape((j >= 0) & (j < side) & (k >= 0) & (k < side), [u, 9])
    row_key = tf.reshape((tf.cast(qc_cloud, tf.int64)[:, None, None] * side + k) * side + j, [u, 9]) * side
    first_key = row_key + tf.maximum(qc[:, :1] - 1, 0)
    last_key = row_key + tf.minimum(qc[:, :1] + 1, side - 1)
    begin = tf.reshape(tf.searchsorted(sorted_keys, tf.reshape(first_key, [-1]), side="left"), [u, 9])
    end = tf.reshape(tf.searchsorted(sorted_keys, tf.reshape(last_key, [-1]), side="right"), [u, 9])
    run_size = tf.where(valid, end - begin, 0)
    s_count = tf.reduce_sum(run_size, 1)
    powers = tf.constant(_POWERS, tf.int32)
    level = tf.searchsorted(powers, q_count) * 64 + tf.searchsorted(powers, s_count)
    levels, bucket_of_cell = tf.unique(level)
    # Cells sorted by bucket: bucket i's cells are a slice.
    cell_by_bucket = tf.argsort(bucket_of_cell, stable=True)
    bucket_size = tf.math.unsorted_segment_sum(tf.ones_like(bucket_of_cell), bucket_of_cell, tf.size(levels))
    bucket_end = tf.cumsum(bucket_size)

    # The float32 pre-test keeps a superset of the hits. Per cloud, coordinates are taken relative
    # to the supports' box centre and scaled by a power of two near 1 / max(extent, radius), so
    # that the neighbours of a support lie within a few units of the origin (no overflow, whatever
    # the coordinates and radius). A query row [y, a|y|^2, 1] times a support row
    # [-2y', 1, a|y'|^2 - loose] is |y - y'|^2 - (1 - a)(|y|^2 + |y'|^2) - loose, a = 1 - 1e-5, with
    # loose = r2 (1 + 1e-5) + 1e-30 in scaled units (the 1e-30 covers float32 underflow): its
    # float32 error, rounding of y included, stays below the slack, so every hit has a value <= 0.
    # The padding row's NaN makes the padding rows and columns fail it.
    r2 = radius * radius
    scale = tf.pow(
        tf.constant(2.0, tf.float64),
        -tf.math.ceil(tf.math.log(tf.maximum(extent, radius)) / math.log(2.0)),
    )
    centre = (lo + hi) * 0.5
    loose = r2 * scale * scale * (1.0 + 1e-5) + 1e-30
    a = 1.0 - 1e-5

    def scaled(points, cloud):
        y = tf.cast(
            (tf.cast(points, tf.float64) - tf.gather(centre, cloud)) * tf.gather(scale, cloud)[:, None],
            tf.float32,
        )
        y64 = tf.cast(y, tf.float64)
        return y, a * tf.reduce_sum(y64 * y64, 1, keepdims=True)

    y, norm = scaled(queries, q_cloud)
    q_rows = tf.concat([y, tf.cast(norm, tf.float32), tf.ones_like(norm, tf.float32)], 1)
    q_rows = tf.concat([tf.gather(q_rows, q_order), [[0.0, 0.0, 0.0, float("nan"), 1.0]]], 0)
    y, norm = scaled(supports, s_cloud)
    s_rows = tf.concat(
        [
            -2.0 * y,
            tf.ones_like(norm, tf.float32),
            tf.cast(norm - tf.gather(loose, s_cloud)[:, None], tf.float32),
        ],
        1,
    )
    s_rows = tf.concat([tf.gather(s_rows, s_order), [[0.0, 0.0, 0.0, 1.0, float("nan")]]], 0)

    # The exact test's inputs: the float64 coordinates of the sorted points, then a padding row;
    # for supports a 4th column holds the stacked index (then the shadow Ns), gathered with them.
    def exact(points, order):
        return tf.concat([tf.cast(tf.gather(points, order), tf.float64), tf.zeros([1, 3], tf.float64)], 0)

    sorted_q64 = tf.pad(exact(queries, q_order), [[0, 0], [0, 1]])
    support_id = tf.cast(tf.concat([s_order, [ns]], 0), tf.float64)[:, None]
    sorted_s64 = tf.concat([exact(supports, s_order), support_id], 1)
    inf = tf.constant(float("inf"), tf.float64)

    def bucket(i, rows, counts, ids, dists):
        """The near candidates of the query cells of bucket i: their rows (sorted query positions,
        in (cell, query) order), candidates per row, then row by row the candidates' support
        indices and negated d2 (Ns and -inf for the few that fail the exact test)."""
        cells = cell_by_bucket[bucket_end[i] - bucket_size[i] : bucket_end[i]]
        cell_q, cell_s = tf.gather(q_count, cells), tf.gather(s_count, cells)
        n, mq, ms = tf.size(cells), tf.reduce_max(cell_q), tf.reduce_max(cell_s)
        q_valid = tf.range(mq)[None, :] < cell_q[:, None]
        q_pos = tf.where(q_valid, tf.gather(first, cells)[:, None] + tf.range(mq)[None, :], nq)
        # Each cell's candidates: its runs of sorted supports one after the other, padded with Ns.
        run_begin = tf.reshape(tf.gather(begin, cells), [-1])
        run_end = run_begin + tf.reshape(tf.gather(run_size, cells), [-1])
        s_pos = tf.RaggedTensor.from_row_lengths(tf.ragged.range(run_begin, run_end).flat_values, cell_s)
        s_pos = s_pos.to_tensor(default_value=ns, shape=[n, ms])
        test = tf.matmul(tf.gather(q_rows, q_pos), tf.gather(s_rows, s_pos), transpose_b=True)
        # [K, 2]: (cell * mq + query, candidate) in row-major order, so grouped by row.
        near = tf.cast(tf.where(tf.reshape(test <= 0.0, [n * mq, ms])), tf.int32)
        row, column = tf.unstack(near, axis=1)
        # The C++ op's float64 test: d2 = (dx*dx + dy*dy) + dz*dz from the float32 coordinates.
        # The few near candidates that fail it stay, as padding (d2 = inf, index Ns).
        flat_q = tf.reshape(q_pos, [-1])
        support = tf.gather(tf.reshape(s_pos, [-1]), (row // mq) * ms + column)
        # Column 3: the support's stacked index (minus 0).
        delta = tf.gather(sorted_s64, support) - tf.gather(tf.gather(sorted_q64, flat_q), row)
        dx, dy, dz, support = tf.unstack(delta, axis=1)
        d2 = (dx * dx + dy * dy) + dz * dz
        hit = d2 <= r2
        # Negated, so that top_k (stable: ties keep the lower column) sorts by increasing d2.
        neg_d2 = tf.where(hit, -d2, -inf)
        # Rows are sorted: sorted segment sums count them.
        count = tf.math.segment_sum(tf.ones_like(row), row)
        count = tf.pad(count, [[0, n * mq - tf.size(count)]])
        kept = tf.where(tf.reshape(q_valid, [-1]))[:, 0]
        return (
            i + 1,
            rows.write(i, tf.gather(flat_q, kept)),
            counts.write(i, tf.gather(count, kept)),
            ids.write(i, tf.where(hit, tf.cast(support, tf.int32), ns)),
            dists.write(i, neg_d2),
        )

    def array(dtype, num, shape=(None,)):
        return tf.TensorArray(dtype, size=num, infer_shape=False, element_shape=shape)

    num_buckets = tf.size(levels)
    _, rows, counts, ids, dists = tf.while_loop(
        lambda i, *_: i < num_buckets,
        bucket,
        (
            0,
            array(tf.int32, num_buckets),
            array(tf.int32, num_buckets),
            array(tf.int32, num_buckets),
            array(tf.float64, num_buckets),
        ),
    )
    row_query, count = rows.concat(), counts.concat()  # [Nq]: every query is one bucket's row
    num_near = tf.reduce_sum(count)
    ids = tf.concat([ids.concat(), [ns]], 0)
    neg_d2 = tf.concat([dists.concat(), [-inf]], 0)
    start = tf.cumsum(count, exclusive=True)

    # Rows sorted in groups of similar length (counts up to the same quarter power of two), each a
    # [rows, W_i] matrix ordered by d2 with top_k; only the rows that hold equal distances
    # (duplicates, lattices) are sorted again by (d2, index).
    length_levels, level_of_row = tf.unique(tf.searchsorted(tf.constant(_WIDTHS, tf.int32), count))
    num_groups = tf.size(length_levels)
    row_by_group = tf.cast(tf.argsort(level_of_row, stable=True), tf.int32)
    group_size = tf.math.unsorted_segment_sum(tf.ones_like(level_of_row), level_of_row, num_groups)
    group_end = tf.cumsum(group_size)

    def group(i, width, members, blocks):
        """Group i's rows (indices into the bucket rows) and their sorted neighbours [rows, W_i];
        `width` becomes the largest hit count so far."""
        member = row_by_group[group_end[i] - group_size[i] : group_end[i]]
        member_count = tf.gather(count, member)[:, None]
        member_start = tf.gather(start, member)[:, None]

        def position(slot):
            """Index in the candidate arrays of the given slots of each row (padding: the last)."""
            return tf.where(slot < member_count, member_start + slot, num_near)

        slots = tf.range(tf.reduce_max(member_count))[None, :]
        dist = tf.gather(neg_d2, position(slots))
        # Whole rows even with a limit: on CPU, top_k with k below the row length is no faster.
        sorted_dist, by_distance = tf.math.top_k(dist, tf.size(slots))
        block = tf.gather(ids, position(by_distance))
        row_ties = tf.reduce_any((sorted_dist[:, 1:] == sorted_dist[:, :-1]) & (sorted_dist[:, 1:] > -inf), 1)

        def by_distance_then_index():
            """The block with its rows of equal distances sorted by (d2, index)."""
            tied = tf.where(row_ties)
            tied_ids = tf.gather_nd(block, tied)
            by_index = tf.argsort(tied_ids, axis=1, stable=True)
            order = tf.argsort(
                tf.gather(tf.gather_nd(sorted_dist, tied), by_index, batch_dims=1),
                axis=1,
                direction="DESCENDING",
                stable=True,
            )
            tied_block = tf.gather(tf.gather(tied_ids, by_index, batch_dims=1), order, batch_dims=1)
            return tf.tensor_scatter_nd_update(block, tied, tied_block)

        block = tf.cond(tf.reduce_any(row_ties), by_distance_then_index, lambda: block)
        hits = tf.reduce_max(tf.concat([tf.reduce_sum(tf.cast(sorted_dist > -inf, tf.int32), 1), [0]], 0))
        return i + 1, tf.maximum(width, hits), members.write(i, member), blocks.write(i, block)

    _, width, members, blocks = tf.while_loop(
        lambda i, *_: i < num_groups,
        group,
        (0, 0, array(tf.int32, num_groups), array(tf.int32, num_groups, (None, None))),
    )
    width = tf.where(max_neighbors > 0, tf.minimum(width, max_neighbors), width)

    def fit(i, flat):
        """Group i's rows cropped or padded to the common width, flattened."""
        block = blocks.read(i)[:, :width]
        block = tf.pad(block, [[0, 0], [0, width - tf.shape(block)[1]]], constant_values=ns)
        return i + 1, flat.write(i, tf.reshape(block, [-1]))

    _, flat = tf.while_loop(lambda i, *_: i < num_groups, fit, (0, array(tf.int32, num_groups)))
    # The groups' rows are a permutation of the queries: its inverse puts them in query order.
    query = tf.gather(q_order, tf.gather(row_query, members.concat()))
    return tf.gather(tf.reshape(flat.concat(), [nq, width]), tf.math.invert_permutation(query))
