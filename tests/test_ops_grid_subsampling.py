"""KpconvBatchGridSubsampling against an independent float64 reference and the original's pyramid."""

import os

import numpy as np
import pytest
import tensorflow as tf

import tf_custom_ops as ops

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "original_tf", "public")


def reference(points, dl, features=None, labels=None):
    """Cells keyed by floor((p - floor(min / dl) dl) / dl) in float64; sorted by cell key."""
    p = points.astype(np.float64)
    if len(p) == 0:
        return np.zeros((0, 3)), np.zeros((0, 0 if features is None else features.shape[1])), np.zeros(0, int)
    dl = float(np.float32(dl))
    origin = np.floor(p.min(0) / dl) * dl
    ijk = np.floor((p - origin) / dl).astype(np.int64)
    dims = ijk.max(0) + 1
    keys = ijk[:, 0] + dims[0] * (ijk[:, 1] + dims[1] * ijk[:, 2])
    uniq, inv = np.unique(keys, return_inverse=True)
    counts = np.bincount(inv)
    bary = np.stack([np.bincount(inv, p[:, a]) for a in range(3)], 1) / counts[:, None]
    feats = None
    if features is not None:
        f = features.astype(np.float64)
        feats = np.stack([np.bincount(inv, f[:, d], minlength=len(uniq)) for d in range(f.shape[1])], 1)
        feats = feats.reshape(len(uniq), f.shape[1]) / counts[:, None]
    labs = None
    if labels is not None:
        labs = np.array([np.bincount(labels[inv == c]).argmax() for c in range(len(uniq))])
    return bary, feats, labs


class GridSubsamplingTest(tf.test.TestCase):
    def test_random_batches_match_reference(self):
        rng = np.random.default_rng(0)
        for seed in range(10):
            sizes = rng.choice([0, 1, 2, 50, 2000], size=rng.integers(1, 6))
            clouds = [(rng.random((n, 3)) * rng.uniform(0.1, 3) - 1).astype(np.float32) for n in sizes]
            if seed % 2:
                clouds = [np.concatenate([c, c]) for c in clouds]  # duplicate points
            points = np.concatenate(clouds + [np.zeros((0, 3), np.float32)])
            lengths = np.array([len(c) for c in clouds], np.int32)
            feats = rng.normal(size=(len(points), 2)).astype(np.float32)
            labels = rng.integers(0, 4, len(points)).astype(np.int32)
            dl = float(rng.choice([1e-3, 0.05, 0.3, 10.0]))
            sp, sl, sf, slab = ops.batch_grid_subsampling(points, lengths, dl, feats, labels)
            self.assertEqual(int(np.sum(sl)), sp.shape[0])
            start = sub_start = 0
            for n, m in zip(lengths, sl.numpy()):
                bary, f, lab = reference(
                    points[start : start + n], dl, feats[start : start + n], labels[start : start + n]
                )
                self.assertEqual(m, len(bary))
                self.assertAllClose(sp[sub_start : sub_start + m], bary, atol=1e-6, rtol=1e-6)
                self.assertAllClose(sf[sub_start : sub_start + m], f, atol=1e-5, rtol=1e-5)
                self.assertAllEqual(slab[sub_start : sub_start + m], lab)
                start += n
                sub_start += m

    def test_cell_below_the_coordinates_precision(self):
        # dl far below float32 precision: identical points are one cell (the grid origin can round
        # past them); distinct points stay apart.
        same = np.array([[0.3, 0.7, 12.1]] * 3, np.float32)
        for dl in (1e-30, 1e-20):
            sp, sl = ops.batch_grid_subsampling(same, [3], dl)
            self.assertAllEqual(sl, [1])
            self.assertAllClose(sp, same[:1])
            apart = np.array([[0.3, 0.7, 12.1], [0.3, 0.7, 12.2]], np.float32)
            sp, sl = ops.batch_grid_subsampling(apart, [2], 1e-5)
            self.assertAllEqual(sl, [2])

    def test_label_vote_ties_go_to_the_smaller_label(self):
        points = np.array([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.1, 0.2], [0.2, 0.3, 0.1]], np.float32)
        _, labels = ops.grid_subsampling(points, 1.0, labels=np.array([7, 3, 7, 3], np.int32))
        self.assertAllEqual(labels, [3])
        _, labels = ops.grid_subsampling(points, 1.0, labels=np.array([7, 3, 7, 9], np.int32))
        self.assertAllEqual(labels, [7])

    def test_optional_outputs_and_empty(self):
        empty = np.zeros((0, 3), np.float32)
        sp, sl = ops.batch_grid_subsampling(empty, [0, 0], 0.1)
        self.assertEqual(sp.shape, (0, 3))
        self.assertAllEqual(sl, [0, 0])
        out = ops.batch_grid_subsampling(empty, [0], 0.1, np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
        self.assertEqual([t.shape for t in out], [(0, 3), (1,), (0, 4), (0,)])
        one = ops.grid_subsampling(np.ones((1, 3), np.float32), 0.5)
        self.assertAllClose(one, np.ones((1, 3)))

    def test_reproduces_the_original_pyramid(self):
        d = np.load(os.path.join(FIXTURES, "model_kpcnn_pyramid.npz"))
        for l in range(4):
            sp, sl = ops.batch_grid_subsampling(
                d[f"points_{l}"], d[f"stack_lengths_{l}"], 0.02 * 2 ** (l + 1)
            )
            self.assertAllEqual(sl, d[f"stack_lengths_{l + 1}"])
            ours = np.round(sp.numpy(), 5)
            theirs = np.round(d[f"points_{l + 1}"], 5)
            # As sets: the original emits cells in hash-map order.
            ours = ours[np.lexsort(ours.T)]
            theirs = theirs[np.lexsort(theirs.T)]
            self.assertAllClose(ours, theirs, atol=2e-5)

    def test_tf_function_and_dataset(self):
        points = np.random.default_rng(1).random((500, 3)).astype(np.float32)
        want = ops.batch_grid_subsampling(points, [200, 300], 0.1)
        fn = tf.function(lambda p, l: ops.batch_grid_subsampling(p, l, 0.1))
        got = fn(points, np.array([200, 300], np.int32))
        self.assertAllEqual(got[0], want[0])
        ds = (
            tf.data.Dataset.from_tensors(points)
            .repeat(3)
            .map(lambda p: ops.batch_grid_subsampling(p, [200, 300], 0.1)[1], num_parallel_calls=2)
        )
        for lengths in ds:
            self.assertAllEqual(lengths, want[1])


BAD = [
    (dict(points=np.zeros((4, 4), np.float32)), ValueError, "points"),
    (dict(lengths=[5]), tf.errors.InvalidArgumentError, "lengths"),
    (dict(lengths=[-1, 5]), tf.errors.InvalidArgumentError, "lengths"),
    (dict(sample_dl=-0.1), ValueError, "sample_dl"),
    (dict(sample_dl=float("nan")), ValueError, "sample_dl"),
    (dict(sample_dl=float("inf")), ValueError, "sample_dl"),
    (dict(sample_dl=1e-12), tf.errors.InvalidArgumentError, "sample_dl"),
    (dict(sample_dl=np.float32(1e-12)), tf.errors.InvalidArgumentError, "sample_dl"),
    (dict(features=np.zeros((3, 2), np.float32)), tf.errors.InvalidArgumentError, "features"),
    (dict(labels=np.zeros((3,), np.int32)), tf.errors.InvalidArgumentError, "labels"),
    (dict(labels=np.zeros((4,), np.float32)), TypeError, "labels"),
    (
        dict(points=np.array([[0, 0, 0], [1, 1, 1], [np.nan, 0, 0], [2, 2, 2]], np.float32)),
        tf.errors.InvalidArgumentError,
        "points",
    ),
    (
        dict(points=np.array([[0, 0, 0], [1, 1, 1], [0, -np.inf, 0], [2, 2, 2]], np.float32)),
        tf.errors.InvalidArgumentError,
        "points",
    ),
]


@pytest.mark.parametrize("change,error,name", BAD)
def test_bad_input_names_the_argument(change, error, name):
    args = dict(
        points=np.array([[0, 0, 0], [1, 1, 1], [3, 0, 0], [2, 2, 2]], np.float32),
        lengths=[4],
        sample_dl=0.5,
        features=None,
        labels=None,
    )
    args.update(change)
    with pytest.raises(error, match=name):
        ops.batch_grid_subsampling(**args)
    if error is not tf.errors.InvalidArgumentError:  # statically detectable: raised while tracing
        with pytest.raises(error, match=name):
            tf.function(lambda: ops.batch_grid_subsampling(**args))()
    else:
        fn = tf.function(
            lambda p: ops.batch_grid_subsampling(
                p, args["lengths"], args["sample_dl"], args["features"], args["labels"]
            )
        )
        with pytest.raises(error, match=name):
            fn(args["points"])
