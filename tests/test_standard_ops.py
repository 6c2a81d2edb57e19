"""kpconv_tf.standard_ops and the standard pyramid against the compiled ops: identical outputs."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tf_custom_ops as compiled
from kpconv_tf import standard_ops as standard
from kpconv_tf.config import Config, ConfigError
from kpconv_tf.pyramid import build_pyramid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOUDS = tf.TensorSpec([None, 3], tf.float32)
LENGTHS = tf.TensorSpec([None], tf.int32)


def random_batch(rng, sizes, scale=1.0, offset=0.0, duplicates=False):
    """Stacked uniform clouds; `duplicates` repeats a third of each cloud (shuffled in)."""
    clouds = []
    for n in sizes:
        c = rng.random((n, 3)) * scale + offset
        if duplicates and n:
            c = rng.permutation(np.concatenate([c, c[: max(1, n // 3)]]))
        clouds.append(c)
    lengths = np.array([len(c) for c in clouds], np.int32)
    return np.concatenate(clouds + [np.zeros((0, 3))]).astype(np.float32), lengths


class StandardOpsTest(tf.test.TestCase):
    def assertSubsamplingEqual(self, points, lengths, dl, fn=standard.batch_grid_subsampling):
        want_points, want_lengths = compiled.batch_grid_subsampling(points, lengths, dl)
        got_points, got_lengths = fn(points, lengths, dl)
        self.assertAllEqual(got_lengths, want_lengths)
        # Same cells in the same order, so the sets agree as well.
        self.assertAllClose(got_points, want_points, rtol=0, atol=1e-6)
        return want_points, want_lengths

    def assertNeighborsEqual(self, q, s, ql, sl, radius, max_n=0, fn=standard.batch_neighbors):
        want = compiled.batch_neighbors(q, s, ql, sl, radius, max_n)
        got = fn(q, s, ql, sl, radius, max_n)
        self.assertEqual(got.dtype, tf.int32)
        self.assertAllEqual(got, want)

    def check_batch(self, points, lengths, dl, radii, limits=(0, 5)):
        """Subsampling and the convolution, pooling and upsampling queries of one layer."""
        sub, sub_lengths = self.assertSubsamplingEqual(points, lengths, dl)
        for radius in radii:
            for max_n in limits:
                self.assertNeighborsEqual(points, points, lengths, lengths, radius, max_n)
                self.assertNeighborsEqual(sub, points, sub_lengths, lengths, radius, max_n)
                self.assertNeighborsEqual(points, sub, lengths, sub_lengths, radius, max_n)

    def test_random_batches_with_empty_clouds_single_points_and_duplicates(self):
        rng = np.random.default_rng(0)
        for sizes in ([0, 400, 1, 0, 250, 0], [1], [0, 0, 3], [600, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]):
            for duplicates in (False, True):
                points, lengths = random_batch(rng, sizes, duplicates=duplicates)
                self.check_batch(points, lengths, 0.07, radii=(0.06, 0.15))

    def test_tiny_and_huge_radii(self):
        points, lengths = random_batch(np.random.default_rng(1), [300, 0, 1, 200], duplicates=True)
        # Tiny: only the point itself and its duplicates; huge: every point of the cloud.
        self.check_batch(points, lengths, 1e-5, radii=(1e-7, 1e-30), limits=(0,))
        self.check_batch(points, lengths, 50.0, radii=(5.0, 1e30), limits=(0, 7))
        full = standard.batch_neighbors(points, points, lengths, lengths, 1e30)
        self.assertEqual(full.shape, (len(points), lengths.max()))

    def test_points_exactly_at_the_radius_and_float64_order(self):
        supports = np.array(
            [
                [0, 0, 0],
                [0.5, 0, 0],
                [0, -0.5, 0],
                [0.5, 0.5, 0],
                [0.3, 0.4, 0],
                [0, 0.4, 0.3],
                [0, 0, 0.5],
                [0, 0, -0.5000001],
            ],
            np.float32,
        )
        queries = np.array([[0, 0, 0], [0.25, 0.25, 0], [0.5, 0, 0]], np.float32)
        for radius in (0.5, 0.25 * np.sqrt(2), np.float32(0.5000001), 0.7071068):
            self.assertNeighborsEqual(queries, supports, [3], [8], radius)
        # A lattice: many points at exactly the radius and many equal distances (ties by index).
        grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
        lattice = (grid * 0.1).astype(np.float32)
        lengths = np.array([100, 116], np.int32)
        for radius in (0.1, 0.2, np.sqrt(2) * 0.1, np.sqrt(3) * 0.1):
            for max_n in (0, 4, 9):
                self.assertNeighborsEqual(lattice, lattice, lengths, lengths, radius, max_n)
        self.assertSubsamplingEqual(lattice, lengths, 0.1)

    def test_large_coordinates_and_grids_wider_than_the_key_range(self):
        rng = np.random.default_rng(2)
        points, lengths = random_batch(rng, [300, 0, 200], scale=20.0, offset=-3e6)
        self.check_batch(points, lengths, 0.5, radii=(0.6, 2.0))
        # 1e-4 radius over a 1e4 extent: more cells per axis than the keys hold, so cells widen.
        points, lengths = random_batch(rng, [300, 1, 200], scale=1e4, duplicates=True)
        for radius in (1e-4, 300.0):
            self.assertNeighborsEqual(points, points, lengths, lengths, radius)
        self.assertSubsamplingEqual(points, lengths, 0.1)

    def test_crowded_cells_and_clouds_of_very_different_densities(self):
        # One cloud with a tight cluster (a single cell holding thousands of points, thousands of
        # candidates per query) next to sparse points, one uniform sparse cloud, one lattice cloud
        # with many equal distances: query cells fall in many (queries, candidates) buckets and
        # rows in many length groups, and ties cross the neighbour limits.
        rng = np.random.default_rng(9)
        cluster = rng.random((3000, 3)) * 0.01 + 0.5
        sparse = rng.random((300, 3))
        lattice = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3) * 0.05
        clouds = [np.concatenate([cluster, sparse[:150]]), sparse[150:], np.repeat(lattice, 2, axis=0)]
        points = np.concatenate(clouds).astype(np.float32)
        lengths = np.array([len(c) for c in clouds], np.int32)
        sub, sub_lengths = self.assertSubsamplingEqual(points, lengths, 0.04)
        for radius in (0.012, 0.05, 0.3):
            for max_n in (0, 3, 40):
                self.assertNeighborsEqual(points, points, lengths, lengths, radius, max_n)
                self.assertNeighborsEqual(sub, points, sub_lengths, lengths, radius, max_n)
                self.assertNeighborsEqual(points, sub, lengths, sub_lengths, radius, max_n)

    def test_convolution_path_equals_the_general_one(self):
        # The same points and lengths objects as queries and supports take the path that sorts the
        # cells once; copies take the general one. Both match the compiled op.
        rng = np.random.default_rng(10)
        for sizes in ([0, 400, 1, 0, 250, 0], [1], [0, 0], [3000]):
            points, lengths = random_batch(rng, sizes, duplicates=True)
            for radius, max_n in ((0.06, 0), (0.15, 7), (1e-7, 0), (1e30, 3)):
                want = compiled.batch_neighbors(points, points, lengths, lengths, radius, max_n)
                same = standard.batch_neighbors(points, points, lengths, lengths, radius, max_n)
                general = standard.batch_neighbors(
                    points, points.copy(), lengths, lengths.copy(), radius, max_n
                )
                self.assertAllEqual(same, want)
                self.assertAllEqual(general, want)
        empty = np.zeros((0, 3), np.float32)
        self.assertNeighborsEqual(empty, empty, np.zeros([2], np.int32), np.zeros([2], np.int32), 0.1)

    def test_pre_test_frames_of_very_different_clouds(self):
        # The pre-test works per cloud relative to the supports' box centre, scaled to the larger
        # of extent and radius: a collapsed cloud (zero extent), a tiny and a huge cloud far from
        # the origin, queries outside the supports' box (some at exactly the radius from a
        # support) and neighbours that need the full radius of a huge cloud.
        rng = np.random.default_rng(11)
        collapsed = np.repeat(rng.random((1, 3)), 40, axis=0)
        tiny = rng.random((200, 3)) * 1e-3 + [5e3, -2e3, 7.0]
        huge = rng.random((300, 3)) * 1e5 - 4e4
        supports = np.concatenate([collapsed, tiny, huge]).astype(np.float32)
        s_lengths = np.array([40, 200, 300], np.int32)
        offset = np.float32(0.25)
        outside = [collapsed[:5] + [0, 0, offset], tiny[:30] + [0, offset, 0], huge[:50] + [offset, 0, 0]]
        queries = np.concatenate(outside).astype(np.float32)
        # Exactly at the radius from the displaced point's support (in float32 coordinates).
        queries[:5, 2] = supports[:5, 2] + offset
        q_lengths = np.array([5, 30, 50], np.int32)
        for radius in (offset, 1e-4, 3e3, 1e30):
            for max_n in (0, 4):
                self.assertNeighborsEqual(queries, supports, q_lengths, s_lengths, radius, max_n)
                self.assertNeighborsEqual(supports, queries, s_lengths, q_lengths, radius, max_n)
                self.assertNeighborsEqual(supports, supports, s_lengths, s_lengths, radius, max_n)

    def test_equal_distances_in_a_few_rows_only(self):
        # Rows of one length group where only some rows hold equal distances (a few duplicated
        # points among random ones): those rows are sorted again by index, the others not.
        rng = np.random.default_rng(12)
        points = rng.random((2000, 3))
        points = np.concatenate([points, points[:20], points[5:8], points[5:6]])
        points = rng.permutation(points).astype(np.float32)
        lengths = np.array([len(points)], np.int32)
        for radius in (0.05, 0.1):
            for max_n in (0, 1, 2, 5):
                self.assertNeighborsEqual(points, points, lengths, lengths, radius, max_n)
                self.assertNeighborsEqual(points[:300], points, [300], lengths, radius, max_n)

    def test_no_points_and_no_clouds(self):
        empty = np.zeros((0, 3), np.float32)
        for lengths in (np.zeros([0], np.int32), np.zeros([3], np.int32)):
            self.assertSubsamplingEqual(empty, lengths, 0.1)
            self.assertNeighborsEqual(empty, empty, lengths, lengths, 0.1)
        points, lengths = random_batch(np.random.default_rng(3), [0, 50, 0])
        self.assertNeighborsEqual(empty, points, [0, 0, 0], lengths, 0.2)
        self.assertNeighborsEqual(points, empty, lengths, [0, 0, 0], 0.2)

    def test_features_averaged_per_cell(self):
        rng = np.random.default_rng(8)
        for sizes, dim in (([0, 300, 1, 0, 120], 4), ([50], 0), ([0, 0], 2)):
            points, lengths = random_batch(rng, sizes, duplicates=True)
            features = rng.normal(size=(len(points), dim))
            want = compiled.batch_grid_subsampling(points, lengths, 0.1, features=features)
            got = standard.batch_grid_subsampling(points, lengths, 0.1, features=features)
            self.assertLen(got, 3)
            self.assertAllEqual(got[1], want[1])
            self.assertAllClose(got[0], want[0], rtol=0, atol=1e-6)
            self.assertAllClose(got[2], want[2], rtol=0, atol=1e-6)
            self.assertEqual(got[2].dtype, tf.float32)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "one row per point"):
            standard.batch_grid_subsampling(np.zeros((3, 3), np.float32), [3], 0.1, features=np.ones((2, 1)))

    def test_tf_function_with_unknown_shapes(self):
        subsample = tf.function(
            standard.batch_grid_subsampling, input_signature=[CLOUDS, LENGTHS, tf.TensorSpec([], tf.float32)]
        )
        neighbors = tf.function(
            standard.batch_neighbors,
            input_signature=[
                CLOUDS,
                CLOUDS,
                LENGTHS,
                LENGTHS,
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([], tf.int32),
            ],
        )
        rng = np.random.default_rng(4)
        for sizes in ([0, 300, 1, 120], [0], [5, 0, 0, 400]):
            points, lengths = random_batch(rng, sizes, duplicates=True)
            sub, sub_lengths = self.assertSubsamplingEqual(points, lengths, 0.08, fn=subsample)
            for max_n in (0, 6):
                self.assertNeighborsEqual(points, points, lengths, lengths, 0.1, max_n, fn=neighbors)
                self.assertNeighborsEqual(sub, points, sub_lengths, lengths, 0.2, max_n, fn=neighbors)

    def test_subsampling_under_xla(self):
        subsample = tf.function(
            lambda p, l: standard.batch_grid_subsampling(p, l, 0.08),
            jit_compile=True,
            input_signature=[CLOUDS, LENGTHS],
        )
        rng = np.random.default_rng(5)
        for sizes in ([0, 300, 1, 120], [700], [0, 0]):
            points, lengths = random_batch(rng, sizes, duplicates=True)
            self.assertSubsamplingEqual(points, lengths, 0.08, fn=lambda p, l, _: subsample(p, l))

    def test_bad_input_names_the_argument(self):
        points, lengths = random_batch(np.random.default_rng(6), [10, 5])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "lengths does not sum"):
            standard.batch_grid_subsampling(points, [10, 4], 0.1)
        with self.assertRaisesRegex(ValueError, "sample_dl must be finite and > 0"):
            standard.batch_grid_subsampling(points, lengths, 0.0)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "sample_dl is too small"):
            standard.batch_grid_subsampling(points * 1e4, lengths, 1e-6)
        bad = points.copy()
        bad[3, 1] = np.nan
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "supports has a NaN"):
            standard.batch_neighbors(points, bad, lengths, lengths, 0.1)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "same number of clouds"):
            standard.batch_neighbors(points, points, lengths, [15], 0.1)
        with self.assertRaisesRegex(ValueError, "max_neighbors must be >= 0"):
            standard.batch_neighbors(points, points, lengths, lengths, 0.1, -1)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "q_lengths has a negative length"):
            standard.batch_neighbors(points, points, [20, -5], lengths, 0.1)


RIGID_KPCNN = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "global_average",
]
KPFCNN = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_deformable_strided",
    "resnetb_deformable",
    "nearest_upsample",
    "unary",
    "nearest_upsample",
    "unary",
]


@pytest.mark.parametrize(
    "network,arch,limits",
    [
        ("classification", RIGID_KPCNN, None),
        ("classification", RIGID_KPCNN, [12, 20, 25, 30]),
        ("segmentation", KPFCNN, None),
        ("segmentation", KPFCNN, [10, 0, 15]),
    ],
)
def test_standard_pyramid_equals_the_compiled_one(network, arch, limits):
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 5},
            "model": dict(
                network_model=network,
                architecture=arch,
                pyramid="standard",
                first_subsampling_dl=0.05,
                density_parameter=5.0,
            ),
        }
    )
    points, lengths = random_batch(np.random.default_rng(7), [500, 0, 1, 350], duplicates=True)
    features = np.ones((len(points), 1), np.float32)
    want = build_pyramid(points, lengths, features, config.model, limits)
    got = build_pyramid(points, lengths, features, config.model, limits, implementation=config.model.pyramid)
    assert sorted(got) == sorted(want)
    for key in want:
        if key.startswith("points_"):
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_pipeline_with_the_standard_pyramid_yields_the_same_batches(task, private_cache, monkeypatch):
    from test_pipeline import make_pipeline  # the pipeline tests' tiny object dataset

    compiled_pipeline, _, _ = make_pipeline(task)
    standard_pipeline, _, standard_config = make_pipeline(task)
    standard_config.model.pyramid = "standard"
    want = list(compiled_pipeline.dataset("train").take(2))
    original, traced = standard.batch_neighbors, []

    def counting(*args):
        traced.append(args)
        return original(*args)

    monkeypatch.setattr(standard, "batch_neighbors", counting)
    got = list(standard_pipeline.dataset("train").take(2))
    assert traced, "the pipeline did not use the standard ops"
    for (want_inputs, want_labels), (got_inputs, got_labels) in zip(want, got):
        np.testing.assert_array_equal(got_labels, want_labels)
        assert sorted(got_inputs) == sorted(want_inputs)
        for key in want_inputs:
            np.testing.assert_allclose(got_inputs[key], want_inputs[key], rtol=0, atol=1e-6, err_msg=key)
            assert got_inputs[key].shape == want_inputs[key].shape, key


def test_pyramid_choice_is_validated():
    with pytest.raises(ConfigError, match="model.pyramid must be one of"):
        Config.from_dict({"model": {"pyramid": "gpu"}})
    config = Config.from_dict({"model": dict(architecture=["simple", "resnetb", "global_average"])})
    assert config.model.pyramid == "compiled"
    with pytest.raises(ValueError, match="implementation must be one of"):
        build_pyramid(
            np.zeros((1, 3), np.float32),
            [1],
            np.ones((1, 1), np.float32),
            config.model,
            implementation="fast",
        )


def test_standard_pyramid_without_the_custom_ops(tmp_path):
    # A process where `import tf_custom_ops` fails: the standard pyramid must not need it.
    script = textwrap.dedent("""
        import sys
        sys.modules["tf_custom_ops"] = None
        import numpy as np
        from kpconv_tf.config import Config
        from kpconv_tf.pyramid import build_pyramid
        config = Config.from_dict({"model": dict(architecture=["simple", "resnetb_strided", "resnetb",
                                                               "global_average"], first_subsampling_dl=0.1)})
        points = np.random.default_rng(0).random((200, 3)).astype(np.float32)
        inputs = build_pyramid(points, [120, 80], np.ones((200, 1), np.float32), config.model,
                               implementation="standard")
        try:
            import tf_custom_ops
        except ImportError:
            print("ok", sorted(inputs), inputs["neighbors_0"].shape[0])
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ") and "'neighbors_1'" in result.stdout and "200" in result.stdout
