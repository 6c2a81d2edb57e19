"""The embedded lidar objects: scanned as a sensor sees them, deterministic, cached, in both layouts."""

import numpy as np
import pytest

from kpconv_tf.architecture import block_type
from kpconv_tf.config import Config
from training.datasets import configure, load_dataset
from training.datasets.embedded_lidar import (
    OBJECTS,
    EmbeddedLidarObjects,
    generate,
    scan_object,
    write_modelnet40_layout,
)
from training.datasets.modelnet40 import ModelNet40

pytestmark = pytest.mark.usefixtures("private_cache")


def test_every_class_scans_into_the_unit_sphere():
    assert len(OBJECTS) >= 5
    rng = np.random.default_rng(0)
    for name in OBJECTS:
        for _ in range(3):
            points, roles = scan_object(name, rng)
            assert points.dtype == np.float32 and len(roles) == len(points)
            assert 300 < len(points) <= 9000, name
            assert np.linalg.norm(points, axis=1).max() == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_allclose((points.max(0) + points.min(0)) / 2, 0.0, atol=1e-5)
            assert np.all(np.isfinite(points))


def test_one_sided_first_returns():
    """An aerial scan of a flat-roofed box sees its roof, not its floor: a first-return lidar gives
    (nearly) one point per ray, so the vertical spread inside a roof cell stays within the noise."""
    rng = np.random.default_rng(1)
    heights = []
    for _ in range(20):
        points, roles = scan_object("building", rng)
        roof = points[roles == 1]
        wall = points[roles == 0]
        heights.append(len(roof) / max(len(points), 1))
        assert len(roof) > 0
        assert len(wall) < len(points)
    # Seen from above (70 % of the scans), most returns are on the roof.
    assert np.median(heights) > 0.5


def test_deterministic_cached_and_registered(tmp_path, monkeypatch):
    a = EmbeddedLidarObjects(0.05, (2, 1), seed=3).clouds("train")
    assert len(a) == 2 * len(OBJECTS)
    assert sorted({c.label for c in a}) == list(range(len(OBJECTS)))
    with monkeypatch.context() as patch:
        patch.setattr(
            "training.datasets.embedded_lidar.scan_object",
            lambda *args, **kwargs: pytest.fail("regenerated instead of reading the cache"),
        )
        b = EmbeddedLidarObjects(0.05, (2, 1), seed=3).clouds("train")
    for x, y in zip(a, b):
        assert x.points.ndim == 2 and x.points.shape[1] == 3 and len(x.points) > 30
        np.testing.assert_array_equal(x.points, y.points)
        assert not x.normals.any()  # lidar objects come without normals
    cells = np.floor(a[0].points / 0.05).astype(np.int64)
    assert len(np.unique(cells, axis=0)) >= 0.98 * len(a[0].points)  # about one point per grid cell
    c = Config.from_dict(
        {
            "dataset": {"name": "EmbeddedLidarObjects", "extra": {"train_per_class": 1, "test_per_class": 1}},
            "model": {"first_subsampling_dl": 0.1},
        }
    )
    dataset = load_dataset(c)
    configure(c, dataset)
    assert c.dataset.num_classes == len(OBJECTS) and c.model.network_model == "classification"
    with pytest.raises(ValueError, match="classes"):
        EmbeddedLidarObjects(0.05, classes=["car", "spaceship"])


def test_modelnet40_layout_reads_back(tmp_path):
    root = write_modelnet40_layout(
        tmp_path / "lidar", per_class=(2, 1), seed=5, classes=["car", "pole", "bush"]
    )
    data = ModelNet40(root, 0.02)
    assert data.label_names == ["car", "pole", "bush"]
    train, test = data.clouds("train"), data.clouds("test")
    assert len(train) == 6 and len(test) == 3
    expected = [points for _, points, _ in generate(["car", "pole", "bush"], 2, 5, "train")]
    for cloud, raw in zip(train, expected):
        assert not cloud.normals.any()
        assert len(cloud.points) <= len(raw)
        # The written text keeps 6 decimals; subsampling keeps every point inside the raw cloud's box.
        assert np.all(cloud.points >= raw.min(0) - 1e-5) and np.all(cloud.points <= raw.max(0) + 1e-5)


def test_lidar_configs_differ_only_in_the_deformable_blocks():
    from training.config import load_config

    deformable, rigid = load_config("embedded_lidar"), load_config("embedded_lidar_rigid")
    assert deformable.dataset == rigid.dataset and deformable.augment == rigid.augment
    assert [b.replace("_deformable", "") for b in deformable.model.architecture] == rigid.model.architecture
    assert sum(block_type(b).deformable for b in deformable.model.architecture) == 3
    assert deformable.model.offset_bound == 1.0 and deformable.train.offsets_loss == "point2point"
    assert deformable.train.learning_rate == rigid.train.learning_rate
