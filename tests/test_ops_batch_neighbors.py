"""KpconvBatchNeighbors against an independent float64 brute force."""

import numpy as np
import pytest
import tensorflow as tf

import tf_custom_ops as ops


def brute_force(queries, supports, q_lengths, s_lengths, radius, max_neighbors=0):
    q = queries.astype(np.float64)
    s = supports.astype(np.float64)
    qs = np.concatenate([[0], np.cumsum(q_lengths)])
    ss = np.concatenate([[0], np.cumsum(s_lengths)])
    rows = []
    for b in range(len(q_lengths)):
        sup = s[ss[b] : ss[b + 1]]
        for i in range(qs[b], qs[b + 1]):
            d2 = np.sum((sup - q[i]) ** 2, axis=1)
            idx = np.nonzero(d2 <= float(np.float32(radius)) ** 2)[0]
            idx = idx[np.lexsort((idx, d2[idx]))] + ss[b]
            rows.append(idx[:max_neighbors] if max_neighbors else idx)
    width = max([len(r) for r in rows], default=0)
    out = np.full((len(rows), width), len(s), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def random_batch(rng, sizes, scale=1.0, duplicates=False):
    clouds = [rng.random((n, 3)) * scale for n in sizes]
    if duplicates:
        clouds = [np.concatenate([c, c[: len(c) // 3]]) if len(c) else c for c in clouds]
    lengths = np.array([len(c) for c in clouds], np.int32)
    points = np.concatenate(clouds + [np.zeros((0, 3))]).astype(np.float32)
    return points, lengths


class BatchNeighborsTest(tf.test.TestCase):
    def test_random_batches_match_brute_force(self):
        rng = np.random.default_rng(0)
        for seed in range(12):
            num = rng.integers(1, 6)
            sizes = rng.choice([0, 1, 2, 17, 150, 400], size=num)
            points, lengths = random_batch(rng, sizes, duplicates=seed % 3 == 0)
            qpoints, qlengths = random_batch(rng, rng.choice([0, 1, 5, 90], size=num))
            for radius in (1e-4, 0.05, 0.2, 3.0):
                for max_n in (0, 4):
                    got = ops.batch_neighbors(qpoints, points, qlengths, lengths, radius, max_n)
                    want = brute_force(qpoints, points, qlengths, lengths, radius, max_n)
                    self.assertAllEqual(got, want)

    def test_radius_below_the_coordinates_precision(self):
        # Cells of a radius far below float32 precision: the grid origin can round past the
        # points (this aborted the process once); duplicates stay each other's neighbours.
        points = np.array([[0.3, 0.7, 12.1]] * 4 + [[0.3, 0.7, 12.2], [5.0, -3.0, 0.1]], np.float32)
        clouds = [(points[:4], [4]), (points[:1], [1]), (points, [6]), (points[[0, 0]], [2])]
        for cloud, lengths in clouds:
            for radius in (1e-30, 1e-12, 1e-7):
                got = ops.batch_neighbors(cloud, cloud, lengths, lengths, radius, 0)
                self.assertAllEqual(got, brute_force(cloud, cloud, lengths, lengths, radius))

    def test_thousands_of_points_and_near_ties(self):
        # Coordinates on a coarse lattice plus tiny offsets: many distances are equal, or equal
        # once rounded to float32, so the exact-distance / index tie-breaking is exercised.
        rng = np.random.default_rng(5)
        for seed in range(3):
            base = rng.integers(0, 12, size=(3000, 3)) * 0.01
            jitter = rng.integers(-1, 2, size=base.shape) * 1e-7
            points = (base + jitter * (seed > 0)).astype(np.float32)
            lengths = np.array([1800, 0, 1, 1199], np.int32)
            # 0.035 gives rows longer than 128 hits (the 64-bit key path); a limit cuts tie runs.
            for radius, max_n in ((0.01, 0), (0.025, 0), (0.025, 7), (0.035, 0), (0.035, 40)):
                got = ops.batch_neighbors(points, points, lengths, lengths, radius, max_n)
                self.assertAllEqual(got, brute_force(points, points, lengths, lengths, radius, max_n))

    def test_distances_equal_in_float32_are_ordered_in_float64(self):
        # |(0.3, 0.4)|^2 = 0.2500000119 in float64 but rounds to 0.25 in float32, like |(0.5, 0)|^2.
        supports = np.array([[0.3, 0.4, 0], [0, 0.4, 0.3], [0.5, 0, 0], [0, 0, 0.5]], np.float32)
        got = ops.neighbors(np.zeros((1, 3), np.float32), supports, 1.0).numpy()
        self.assertAllEqual(got, [[2, 3, 0, 1]])

    def test_points_exactly_at_the_radius_are_included(self):
        supports = np.array([[0, 0, 0], [0.5, 0, 0], [0, -0.5, 0], [0.5, 0.5, 0]], np.float32)
        got = ops.neighbors(np.zeros((1, 3), np.float32), supports, 0.5).numpy()
        self.assertAllEqual(got, [[0, 1, 2]])

    def test_ties_sorted_by_index_and_shadow_is_support_count(self):
        supports = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 5, 5]], np.float32)
        got = ops.neighbors(np.zeros((2, 3), np.float32), supports, 1.0).numpy()
        self.assertAllEqual(got, [[0, 1, 2], [0, 1, 2]])
        got = ops.neighbors(np.full((1, 3), 9, np.float32), supports, 1.0).numpy()
        self.assertEqual(got.shape, (1, 0))

    def test_queries_only_see_their_cloud(self):
        cloud = np.random.default_rng(1).random((50, 3)).astype(np.float32)
        points = np.concatenate([cloud, cloud])
        lengths = np.array([50, 50], np.int32)
        got = ops.batch_neighbors(points, points, lengths, lengths, 10.0).numpy()
        self.assertTrue(np.all(got[:50] < 50))
        self.assertTrue(np.all((got[50:] >= 50) & (got[50:] < 100)))
        self.assertAllEqual(got[50:] - 50, got[:50])

    def test_matches_ckdtree_on_a_large_cloud(self):
        from scipy.spatial import cKDTree

        rng = np.random.default_rng(2)
        points = rng.random((20000, 3)).astype(np.float32)
        got = ops.neighbors(points, points, 0.03).numpy()
        tree = cKDTree(points.astype(np.float64))
        expected = tree.query_ball_point(points.astype(np.float64), 0.03)
        counts = (got < len(points)).sum(axis=1)
        self.assertAllEqual(counts, [len(e) for e in expected])
        for i in rng.integers(0, len(points), 200):
            self.assertAllEqual(np.sort(got[i, : counts[i]]), np.sort(expected[i]))

    def test_same_tensor_as_queries_and_supports(self):
        # Convolution queries are the supports themselves; the op then reuses the support index's
        # cell order for the queries.
        rng = np.random.default_rng(6)
        for duplicates in (False, True):
            points, lengths = random_batch(rng, [0, 300, 1, 2, 700], duplicates=duplicates)
            lattice = (rng.integers(0, 8, size=(500, 3)) * 0.01).astype(np.float32)
            for pts, lens in ((points, lengths), (lattice, np.array([500], np.int32))):
                shared = tf.constant(pts)
                for radius in (1e-4, 0.02, 0.15, 2.0):
                    got = ops.batch_neighbors(shared, shared, lens, lens, radius)
                    self.assertAllEqual(got, brute_force(pts, pts, lens, lens, radius))

    def test_portable_path_matches_the_vectorised_one(self):
        # KPCONV_TF_NO_SIMD=1 makes a process take the scalar hit search and rank sort.
        import os
        import subprocess
        import sys
        import tempfile

        rng = np.random.default_rng(7)
        points, lengths = random_batch(rng, [1200, 0, 3, 900], duplicates=True)
        # Plus a lattice cloud: runs of equal distances, rows of fewer and more than 128 hits.
        lattice = (rng.integers(0, 10, size=(1500, 3)) * 0.01).astype(np.float32)
        points = np.concatenate([points, lattice])
        lengths = np.append(lengths, len(lattice)).astype(np.int32)
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(os.path.join(tmp, "in.npz"), points=points, lengths=lengths)
            script = (
                "import numpy as np, tf_custom_ops as ops, sys\n"
                "d = np.load(sys.argv[1] + '/in.npz')\n"
                "pts, lens = d['points'], d['lengths']\n"
                "out = {f'r{i}': ops.batch_neighbors(pts, pts, lens, lens, r).numpy()\n"
                "       for i, r in enumerate((0.01, 0.025, 0.06, 0.3))}\n"
                "np.savez(sys.argv[1] + '/out.npz', **out)\n"
            )
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, KPCONV_TF_NO_SIMD="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=root)
            subprocess.run([sys.executable, "-c", script, tmp], check=True, env=env)
            portable = np.load(os.path.join(tmp, "out.npz"))
            for i, radius in enumerate((0.01, 0.025, 0.06, 0.3)):
                got = ops.batch_neighbors(points, points, lengths, lengths, radius)
                self.assertAllEqual(portable[f"r{i}"], got)
                self.assertAllEqual(got, brute_force(points, points, lengths, lengths, radius))

    def test_empty_inputs(self):
        empty = np.zeros((0, 3), np.float32)
        self.assertEqual(ops.batch_neighbors(empty, empty, [0], [0], 1.0).shape, (0, 0))
        got = ops.batch_neighbors(np.zeros((2, 3), np.float32), empty, [2], [0], 1.0)
        self.assertEqual(got.shape, (2, 0))

    def test_tf_function_and_dataset(self):
        rng = np.random.default_rng(3)
        points, lengths = random_batch(rng, [30, 40])
        fn = tf.function(ops.batch_neighbors)
        want = brute_force(points, points, lengths, lengths, 0.3)
        self.assertAllEqual(fn(points, points, lengths, lengths, 0.3), want)
        ds = (
            tf.data.Dataset.from_tensors((points, lengths))
            .repeat(4)
            .map(lambda p, l: ops.batch_neighbors(p, p, l, l, 0.3), num_parallel_calls=2)
        )
        for got in ds:
            self.assertAllEqual(got, want)
        spec = tf.TensorSpec([None, 3], tf.float32)
        concrete = tf.function(
            lambda q: ops.batch_neighbors(q, q, tf.shape(q)[:1], tf.shape(q)[:1], 0.1)
        ).get_concrete_function(spec)
        self.assertEqual(concrete.output_shapes.as_list(), [None, None])

    def test_float64_converted_and_gradient_not_defined(self):
        pts = np.random.default_rng(4).random((10, 3))
        self.assertAllEqual(ops.neighbors(pts, pts, 0.5), ops.neighbors(pts.astype(np.float32), pts, 0.5))
        x = tf.constant(pts, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(ops.neighbors(x, x, 0.5), tf.float32)
        self.assertIsNone(tape.gradient(y, x))


BAD_INPUTS = [
    (dict(queries=np.zeros((3, 2), np.float32)), ValueError, "queries"),
    (dict(supports=np.zeros((3,), np.float32)), ValueError, "supports"),
    (dict(queries=np.zeros((3, 3), np.int32)), TypeError, "queries"),
    (dict(q_lengths=np.array([4], np.int32)), tf.errors.InvalidArgumentError, "q_lengths"),
    (dict(s_lengths=np.array([-1, 4], np.int32)), tf.errors.InvalidArgumentError, "s_lengths"),
    (dict(s_lengths=np.array([1, 1, 1], np.int32)), tf.errors.InvalidArgumentError, "clouds"),
    (dict(radius=0.0), ValueError, "radius"),
    (dict(radius=float("nan")), ValueError, "radius"),
    (dict(radius=float("inf")), ValueError, "radius"),
    (dict(max_neighbors=-1), ValueError, "max_neighbors"),
    (
        dict(supports=np.array([[0, 0, np.nan], [0, 0, 0], [1, 1, 1]], np.float32)),
        tf.errors.InvalidArgumentError,
        "supports",
    ),
    (
        dict(queries=np.array([[0, 0, np.inf], [0, 0, 0], [1, 1, 1]], np.float32)),
        tf.errors.InvalidArgumentError,
        "queries",
    ),
]


@pytest.mark.parametrize("change,error,name", BAD_INPUTS)
@pytest.mark.parametrize("graph", [False, True])
def test_bad_input_names_the_argument(change, error, name, graph):
    args = dict(
        queries=np.zeros((3, 3), np.float32),
        supports=np.zeros((3, 3), np.float32),
        q_lengths=np.array([3], np.int32),
        s_lengths=np.array([3], np.int32),
        radius=1.0,
        max_neighbors=0,
    )
    args.update(change)
    if graph:
        if error is tf.errors.InvalidArgumentError:
            fn = tf.function(lambda q, s, ql, sl, r: ops.batch_neighbors(q, s, ql, sl, r))
            with pytest.raises(error, match=name):
                fn(
                    args["queries"],
                    args["supports"],
                    args["q_lengths"],
                    args["s_lengths"],
                    tf.constant(args["radius"]),
                )
        else:  # statically detectable: raised while tracing
            with pytest.raises(error, match=name):
                tf.function(lambda: ops.batch_neighbors(**args))()
        return
    with pytest.raises(error, match=name):
        ops.batch_neighbors(**args)


@pytest.mark.parametrize("radius", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_radius_tensor_in_graph(radius):
    fn = tf.function(lambda r: ops.neighbors(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), r))
    with pytest.raises(tf.errors.InvalidArgumentError, match="radius"):
        fn(tf.constant(radius))


def test_bad_max_neighbors_tensor_in_graph():
    fn = tf.function(
        lambda m: ops.neighbors(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), 1.0, m)
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_neighbors"):
        fn(tf.constant(-2))
