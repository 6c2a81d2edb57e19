"""The stacked-batch pipeline: invariants, calibration, seeded augmentation, exact resume, scenes."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.architecture import layer_specs
from kpconv_tf.config import Config
from training.augment import augment_points
from training.datasets import configure
from training.datasets.base import ObjectCloud, ObjectDataset
from training.pipeline import Pipeline, calibrate_batch_limit, neighbor_histogram_limit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "original_tf", "public")
ARCH = ["simple", "resnetb", "resnetb_strided", "resnetb", "resnetb_strided", "resnetb", "global_average"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))


class TinyObjects(ObjectDataset):
    """Random blobs of varying size; the class is the blob's elongation axis."""

    name = "TinyObjects"

    def __init__(self, task="classification", n_train=40, n_test=10, seed=0):
        self.task = task
        self.label_names = ["x", "y", "z"]
        self.num_parts = [2, 2, 2] if task != "classification" else None
        rng = np.random.default_rng(seed)
        self._clouds = {
            split: [self._cloud(rng, i, split) for i in range(n)]
            for split, n in (("train", n_train), ("test", n_test))
        }

    def _cloud(self, rng, i, split):
        label = i % 3
        n = int(rng.integers(30, 300))
        points = rng.normal(size=(n, 3)) * 0.1
        points[:, label] *= 3
        normals = points / np.linalg.norm(points, axis=1, keepdims=True)
        parts = (points[:, label] > 0).astype(np.int32)
        return ObjectCloud(points.astype(np.float32), normals.astype(np.float32), label, parts, f"{split}{i}")

    def clouds(self, split):
        return self._clouds[split]


def make_config(task="classification", batch_num=4, **augment):
    config = Config()
    config.model.architecture = (
        list(ARCH)
        if task == "classification"
        else ARCH[:-1] + ["nearest_upsample", "unary", "nearest_upsample", "unary"]
    )
    config.model.first_subsampling_dl = 0.05
    config.model.density_parameter = 5.0
    config.model.first_features_dim = 8
    config.train.batch_num = batch_num
    for key, value in augment.items():
        setattr(config.augment, key, value)
    return config


def make_pipeline(task="classification", **kwargs):
    data = TinyObjects(task)
    config = make_config(task, **kwargs)
    configure(config, data)
    return Pipeline(data, config), data, config


def check_batch(inputs, labels, config, task):
    """Stacked-batch invariants of ARCHITECTURE.md for every layer."""
    specs = layer_specs(config.model)
    lengths0 = inputs["lengths_0"].numpy()
    assert inputs["points_0"].shape[0] == lengths0.sum() == inputs["features"].shape[0]
    np.testing.assert_array_equal(
        inputs["batch_index"].numpy(), np.repeat(np.arange(len(lengths0)), lengths0)
    )
    if task == "classification":
        assert labels.shape == (len(lengths0),)
    else:
        assert labels.shape == (lengths0.sum(),)
    for spec in specs:
        l = spec.index
        points, lengths = inputs[f"points_{l}"].numpy(), inputs[f"lengths_{l}"].numpy()
        assert len(points) == lengths.sum()
        cloud = np.repeat(np.arange(len(lengths)), lengths)
        neighbors = inputs[f"neighbors_{l}"].numpy()
        assert neighbors.shape[0] == len(points)
        assert neighbors.min() >= 0 and neighbors.max() <= len(points)
        real = neighbors < len(points)
        rows = np.nonzero(real)[0]
        np.testing.assert_array_equal(cloud[neighbors[real]], cloud[rows])  # never another cloud
        assert real[:, 0].all()  # every point is its own nearest neighbour
        d = np.linalg.norm(points[neighbors[real]] - points[rows], axis=1)
        assert d.max() <= spec.conv_radius * (1 + 1e-5)
        if spec.next_dl is None:
            continue
        sub, sub_lengths = inputs[f"points_{l + 1}"].numpy(), inputs[f"lengths_{l + 1}"].numpy()
        sub_cloud = np.repeat(np.arange(len(sub_lengths)), sub_lengths)
        pools = inputs[f"pools_{l}"].numpy()
        assert pools.shape[0] == len(sub) and pools.max() <= len(points)
        real = pools < len(points)
        np.testing.assert_array_equal(cloud[pools[real]], sub_cloud[np.nonzero(real)[0]])
        if task == "classification":
            assert f"upsamples_{l}" not in inputs  # no decoder: the widest search is skipped
            continue
        ups = inputs[f"upsamples_{l}"].numpy()
        assert ups.shape[0] == len(points) and ups.max() <= len(sub)
        real = ups < len(sub)
        np.testing.assert_array_equal(sub_cloud[ups[real]], cloud[np.nonzero(real)[0]])
        assert (ups[:, 0] < len(sub)).all()  # every point has a coarser point to take features from


@pytest.mark.parametrize("task", ["classification", "multi_segmentation"])
def test_batches_keep_the_stacked_invariants(task):
    pipeline, data, config = make_pipeline(task)
    for inputs, labels in pipeline.dataset("train").take(3):
        check_batch(inputs, labels, config, task)
        if task == "multi_segmentation":
            assert inputs["object_labels"].shape == inputs["lengths_0"].shape
    widths = [inputs[f"neighbors_{l}"].shape[1] for l in range(config.model.num_layers)]
    assert all(w <= limit for w, limit in zip(widths, pipeline.neighbor_limits))


def test_batch_limit_calibration_hits_batch_num():
    sizes = np.random.default_rng(3).integers(50, 500, size=400)
    for batch_num in (3, 10):
        limit = calibrate_batch_limit(sizes, batch_num, seed=1)
        rng = np.random.default_rng(5)
        counts = []
        for _ in range(300):
            order = rng.permutation(sizes)
            counts.append(max(1, int(np.sum(np.cumsum(order) <= limit))))
        assert abs(np.mean(counts) - batch_num) < 0.15 * batch_num


def test_streamed_batches_average_batch_num_clouds():
    pipeline, _, config = make_pipeline(batch_num=5)
    counts = [len(b.lengths) for _, b in zip(range(60), pipeline.stream("train", "random").batches())]
    assert abs(np.mean(counts) - 5) < 1.0


def test_neighbor_limit_is_the_80_percent_histogram_width():
    counts = np.array([1, 2, 2, 3, 3, 3, 4, 4, 4, 4])
    # cumulative histogram 0,1,3,6,10: widths 0..3 hold < 8 rows, so the limit is 4 (all but none cut)
    assert neighbor_histogram_limit(counts, 0.8) == 4
    assert neighbor_histogram_limit(counts, 0.5) == 3
    assert neighbor_histogram_limit(np.full(10, 7), 0.8) == 7


def test_calibration_is_cached_and_reused(monkeypatch):
    pipeline, data, config = make_pipeline()
    limits, batch_limit = pipeline.neighbor_limits, pipeline.batch_limit
    again = Pipeline(data, config)

    def fail(*args, **kwargs):
        raise AssertionError("recalibrated instead of reading the cache")

    monkeypatch.setattr(Pipeline, "calibrate_neighbors", fail)
    monkeypatch.setattr("training.pipeline.calibrate_batch_limit", fail)
    assert again.neighbor_limits == limits and again.batch_limit == batch_limit
    config.train.batch_num += 1  # another key: must calibrate again
    with pytest.raises(AssertionError, match="recalibrated"):
        _ = Pipeline(data, config).batch_limit


def test_augmentation_is_seeded_and_keeps_labels_and_lengths():
    pipeline, _, config = make_pipeline(rotation="vertical", noise=0.01, symmetries=[True, False, False])
    first = list(pipeline.dataset("train").take(2))
    second = list(pipeline.dataset("train").take(2))
    for (a, la), (b, lb) in zip(first, second):
        np.testing.assert_array_equal(a["points_0"], b["points_0"])
        np.testing.assert_array_equal(la, lb)
    raw = next(pipeline.stream("train", "random").batches())
    np.testing.assert_array_equal(first[0][0]["lengths_0"], raw.lengths)
    np.testing.assert_array_equal(first[0][1], raw.labels)
    assert not np.allclose(first[0][0]["points_0"], raw.points)
    other = next(iter(pipeline.dataset("train", seed=99)))[0]["points_0"]
    assert other.shape != first[0][0]["points_0"].shape or not np.allclose(other, first[0][0]["points_0"])


def test_augmentation_geometry():
    config = make_config(rotation="vertical", noise=0.0, scale_min=1.0, scale_max=1.0).augment
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    batch_index = np.repeat([0, 1], 25).astype(np.int32)
    out, _, scales, rotations = augment_points(points, batch_index, 2, config, [1, 2])
    out = out.numpy()
    # a vertical rotation keeps heights and horizontal radii
    np.testing.assert_allclose(out[:, 2], points[:, 2], atol=1e-6)
    np.testing.assert_allclose(
        np.hypot(out[:, 0], out[:, 1]), np.hypot(points[:, 0], points[:, 1]), rtol=1e-5
    )
    config.rotation, config.scale_min, config.scale_max, config.scale_anisotropic = "all", 0.5, 2.0, False
    out, _, scales, rotations = augment_points(points, batch_index, 2, config, [1, 3])
    r = rotations.numpy()
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.eye(3)[None].repeat(2, 0), atol=1e-5)
    s = scales.numpy()
    assert np.allclose(s[:, 0], s[:, 1]) and (s >= 0.5).all() and (s <= 2.0).all()
    np.testing.assert_allclose(
        np.linalg.norm(out.numpy(), axis=1), np.linalg.norm(points, axis=1) * s[batch_index, 0], rtol=1e-5
    )


def test_start_batch_resumes_the_same_stream():
    pipeline, _, _ = make_pipeline()
    batches = list(pipeline.dataset("train").take(5))
    resumed = next(iter(pipeline.dataset("train", start_batch=3)))
    np.testing.assert_array_equal(resumed[0]["points_0"], batches[3][0]["points_0"])
    np.testing.assert_array_equal(resumed[1], batches[3][1])


def test_parallel_calls_do_not_change_the_data():
    pipeline, _, _ = make_pipeline()
    one = list(pipeline.dataset("train", parallel_calls=1).take(4))
    two = list(pipeline.dataset("train", parallel_calls=2).take(4))
    for (a, _), (b, _) in zip(one, two):
        np.testing.assert_array_equal(a["points_1"], b["points_1"])


def test_validation_by_potentials_and_sequential_test_cover_the_split():
    pipeline, data, config = make_pipeline()
    config.dataset.validation_size = 1
    val = pipeline.dataset("validation", with_meta=True)
    seen = []
    for _ in range(3):  # each pass takes the least-seen objects: 3 x batch_num covers 12 of 10
        seen += [int(i) for _, _, m in val for i in m["cloud_indices"].numpy()]
    assert sorted(set(seen)) == list(range(10))
    test = [
        int(i) for _, _, m in pipeline.dataset("test", with_meta=True) for i in m["cloud_indices"].numpy()
    ]
    assert test == list(range(10))


def test_features_by_dimension():
    pipeline, data, config = make_pipeline()
    config.dataset.in_features_dim = 4
    inputs, _ = next(iter(pipeline.dataset("train")))
    features = inputs["features"].numpy()
    np.testing.assert_array_equal(features[:, 0], 1.0)
    np.testing.assert_allclose(np.linalg.norm(features[:, 1:], axis=1), 1.0, rtol=1e-5)  # unit normals
    config.dataset.in_features_dim = 2
    with pytest.raises(ValueError, match="in_features_dim"):
        next(iter(pipeline.dataset("train")))


def test_matches_the_original_layer_sizes():
    """The fixture cloud of the original's run through our map: same points and neighbour widths."""
    from kpconv_tf.convert import config_from_original

    config = config_from_original(os.path.join(FIXTURES, "model_kpcnn_parameters.txt"))
    d = np.load(os.path.join(FIXTURES, "model_kpcnn_pyramid.npz"))
    data = TinyObjects()
    configure(config, data)
    pipeline = Pipeline(data, config)
    points = d["points_0"]
    batch = {
        "points": tf.constant(points),
        "extra": tf.zeros_like(points),
        "lengths": tf.constant(d["stack_lengths_0"], tf.int32),
        "labels": tf.zeros([2], tf.int32),
        "object_labels": tf.zeros([2], tf.int32),
        "cloud_indices": tf.range(2),
        "point_indices": tf.range(len(points)),
        "number": tf.constant(0, tf.int64),
    }
    limits = [int(v) for v in d["neighborhood_limits"]]
    inputs, _ = pipeline.map_batch(batch, limits, seed=0, with_meta=False, augment=False)
    for l in range(config.model.num_layers):
        np.testing.assert_array_equal(inputs[f"lengths_{l}"], d[f"stack_lengths_{l}"])
        assert inputs[f"neighbors_{l}"].shape == d[f"neighbors_{l}"].shape
        if f"pools_{l}" in inputs:
            assert inputs[f"pools_{l}"].shape == d[f"pools_{l}"].shape


def test_scene_batches_from_embedded_rooms():
    from training.datasets.embedded_rooms import EmbeddedRooms

    data = EmbeddedRooms(0.08, num_train=2, num_test=1, seed=3)
    config = make_config("segmentation", batch_num=2)
    config.dataset.in_features_dim = 5
    config.dataset.in_radius = 1.0
    config.model.first_subsampling_dl = 0.08
    configure(config, data)
    pipeline = Pipeline(data, config)
    for inputs, labels, meta in pipeline.dataset("train", with_meta=True).take(2):
        check_batch(inputs, labels, config, "segmentation")
        assert inputs["features"].shape[1] == 5
        labels = labels.numpy()
        assert labels.min() >= -1 and labels.max() < len(data.label_names)
        scenes = data.scenes("train")
        offsets = np.concatenate([[0], np.cumsum(inputs["lengths_0"].numpy())])
        for b, s in enumerate(meta["cloud_indices"].numpy()):
            idx = meta["point_indices"].numpy()[offsets[b] : offsets[b + 1]]
            np.testing.assert_array_equal(labels[offsets[b] : offsets[b + 1]], scenes[s].labels[idx])


DISTRIBUTED = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from test_pipeline import make_pipeline
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
pipeline, _, _ = make_pipeline()
batch = next(iter(pipeline.distributed_dataset(strategy, "train")))
inputs, labels = batch
per_replica = strategy.experimental_local_results(inputs["points_0"])
lengths = strategy.experimental_local_results(inputs["lengths_0"])
assert len(per_replica) == 2
for points, n in zip(per_replica, lengths):
    assert points.shape[0] == int(np.sum(n)) > 0
assert not np.array_equal(per_replica[0].numpy()[:3], per_replica[1].numpy()[:3])
print("ok", [p.shape[0] for p in per_replica])
"""


def test_tf_distribute_gives_each_replica_its_own_stacked_batch(tmp_path):
    import subprocess
    import sys

    env = dict(
        os.environ,
        KPCONV_TF_CACHE=str(tmp_path / "cache"),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]
        ),
    )
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
