"""The embedded procedural rooms (training/datasets/embedded_rooms.py)."""

import time

import numpy as np
import pytest
from sklearn.neighbors import KDTree
from sklearn.tree import DecisionTreeClassifier

import tf_custom_ops  # noqa: F401  (import TF before timing generation)
from kpconv_tf.config import Config
from training.datasets.base import Scene
from training.datasets.embedded_rooms import CLASSES, EmbeddedRooms, generate_room

DL = 0.04
NUM_TRAIN, NUM_TEST = 3, 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("rooms_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KPCONV_TF_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def dataset(cache):
    ds = EmbeddedRooms(DL, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    start = time.perf_counter()
    ds.scenes("train"), ds.scenes("test")
    ds.build_seconds = time.perf_counter() - start
    return ds


def scene_arrays(scene):
    return [
        scene.points,
        scene.colors,
        scene.labels,
        scene.projection,
        scene.full_labels,
        scene.full_points(),
    ]


def test_generation_is_fast(dataset):
    # Five rooms generated, subsampled, projected and cached (TF already imported).
    assert dataset.build_seconds < 10
    start = time.perf_counter()
    for i in range(11):
        generate_room(np.random.default_rng([0, 0, i]))
    assert time.perf_counter() - start < 5


def test_two_constructions_are_identical(dataset, tmp_path, monkeypatch):
    # A fresh cache regenerates; the arrays must match the first build bit for bit.
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path))
    again = EmbeddedRooms(DL, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    for split in ("train", "test"):
        for a, b in zip(dataset.scenes(split), again.scenes(split), strict=True):
            assert a.name == b.name
            for x, y in zip(scene_arrays(a), scene_arrays(b)):
                np.testing.assert_array_equal(x, y)
    assert list((tmp_path / "datasets" / "EmbeddedRooms").glob("*.npz"))
    # Another seed gives other rooms; the room streams do not depend on the number of rooms.
    other = EmbeddedRooms(DL, num_train=1, num_test=1, seed=1).scenes("train")[0]
    assert other.points.shape != dataset.scenes("train")[0].points.shape
    fewer = EmbeddedRooms(DL, num_train=1, num_test=1, seed=0).scenes("train")[0]
    np.testing.assert_array_equal(fewer.points, dataset.scenes("train")[0].points)


def test_scene_shapes_dtypes_and_ranges(dataset):
    assert dataset.name == "EmbeddedRooms" and dataset.task == "scene_segmentation" and dataset.has_colors
    assert dataset.label_names == CLASSES and len(CLASSES) == 8
    for split, count in (("train", NUM_TRAIN), ("validation", NUM_TEST), ("test", NUM_TEST)):
        scenes = dataset.scenes(split)
        assert len(scenes) == count
        for scene in scenes:
            assert isinstance(scene, Scene)
            n, m = len(scene.points), len(scene.projection)
            assert 10_000 < n < m < 60_000
            assert scene.points.dtype == np.float32 and scene.points.shape == (n, 3)
            assert scene.colors.dtype == np.float32 and scene.colors.shape == (n, 3)
            assert scene.colors.min() >= 0 and scene.colors.max() <= 1
            assert scene.labels.dtype == np.int32 and scene.labels.shape == (n,)
            assert scene.full_labels.dtype == np.int32 and scene.full_labels.shape == (m,)
            for labels in (scene.labels, scene.full_labels):
                assert labels.min() >= 0 and labels.max() < len(CLASSES)
            full = scene.full_points()
            assert full.dtype == np.float32 and full.shape == (m, 3)
            # Rooms sit on z = 0, a few metres wide and high.
            lo, hi = full.min(0), full.max(0)
            assert np.all(lo > -0.1) and np.all(hi[:2] < 6.1) and 2.5 < hi[2] < 3.3
            assert isinstance(scene.tree, KDTree) and np.array_equal(
                np.asarray(scene.tree.data), scene.points
            )


def test_subsampling_and_projection(dataset):
    rng = np.random.default_rng(0)
    for scene in dataset.scenes("train")[:2]:
        full = scene.full_points().astype(np.float64)
        sub = scene.points.astype(np.float64)
        # One subsampled point per occupied grid cell (origin floor(min / dl) * dl), the barycentre of
        # the cell's points (float64 reference); a barycentre lies inside its own cell.
        dl = float(np.float32(DL))  # the op receives the cell size as float32
        origin = np.floor(full.min(0) / dl) * dl
        cells, inverse = np.unique(
            np.floor((full - origin) / dl).astype(np.int64), axis=0, return_inverse=True
        )
        inverse = inverse.ravel()
        assert len(sub) == len(cells)
        barycentres = np.zeros((len(cells), 3))
        np.add.at(barycentres, inverse, full)
        barycentres /= np.bincount(inverse)[:, None]
        span = cells.max() + 2

        def key(c):
            return (c[:, 0] * span + c[:, 1]) * span + c[:, 2]

        cell_keys = key(cells)  # np.unique sorted them lexicographically, hence increasing
        sub_keys = key(np.floor((sub - origin) / dl).astype(np.int64))
        index = np.searchsorted(cell_keys, sub_keys)
        assert np.array_equal(cell_keys[index], sub_keys)
        assert len(np.unique(index)) == len(sub)
        np.testing.assert_allclose(sub, barycentres[index], atol=1e-5)
        pick = rng.choice(len(full), 400, replace=False)
        d = np.linalg.norm(full[pick, None] - sub[None], axis=2)
        chosen = d[np.arange(len(pick)), scene.projection[pick]]
        # The projection is the nearest subsampled point (float64 brute force, float32 ties allowed).
        np.testing.assert_allclose(chosen, d.min(1), atol=1e-6)
        # A point's cell barycentre is within one cell diagonal.
        assert chosen.max() <= np.sqrt(3) * DL
        # Subsampled labels are majority votes, so most full points agree with their projection.
        agree = np.mean(scene.full_labels == scene.labels[scene.projection])
        assert agree > 0.95


def test_classes_covered_and_rooms_varied():
    rooms = [generate_room(np.random.default_rng([0, 0, i])) for i in range(8)]
    counts = np.array([np.bincount(labels, minlength=len(CLASSES)) for _, _, labels in rooms])
    assert np.all(counts.sum(0) > 1000)  # every class is well present over the default training rooms
    for name in ("ceiling", "floor", "wall", "door", "table", "chair", "cabinet"):
        assert np.all(counts[:, CLASSES.index(name)] > 0), name
    # Sizes and layouts differ between rooms.
    extents = np.array([points.max(0) - points.min(0) for points, _, _ in rooms])
    assert np.ptp(extents[:, 0]) > 0.5 and np.ptp(extents[:, 2]) > 0.1
    assert len({len(points) for points, _, _ in rooms}) == 8


def test_splits_are_disjoint_and_validation_is_test(dataset):
    train, test = dataset.scenes("train"), dataset.scenes("test")
    assert dataset.scenes("validation") is test
    assert not {s.name for s in train} & {s.name for s in test}
    for a in train:
        for b in test:
            assert a.points.shape != b.points.shape or not np.array_equal(a.points, b.points)


def test_colour_and_height_alone_do_not_solve_it():
    # A per-point classifier on colour (and on colour + height) must stay far from solving the
    # rooms: geometry and context are needed. Default training rooms vs default test rooms.
    train = [generate_room(np.random.default_rng([0, 0, i])) for i in range(8)]
    test = [generate_room(np.random.default_rng([0, 1, i])) for i in range(3)]
    y_train = np.concatenate([labels for _, _, labels in train])
    y_test = np.concatenate([labels for _, _, labels in test])

    def miou(pred):
        ious = []
        for k in range(len(CLASSES)):
            union = np.sum((y_test == k) | (pred == k))
            if union:
                ious.append(np.sum((y_test == k) & (pred == k)) / union)
        return np.mean(ious)

    for columns, limit in (((3, 4, 5), 0.35), ((2, 3, 4, 5), 0.55)):

        def features(rooms):
            return np.concatenate([np.hstack([p, c])[:, columns] for p, c, _ in rooms])

        tree = DecisionTreeClassifier(max_depth=12, random_state=0).fit(features(train)[::4], y_train[::4])
        score = miou(tree.predict(features(test)))
        assert 0.05 < score < limit, (columns, score)


def test_from_config_and_errors(cache):
    config = Config()
    config.model.first_subsampling_dl = 0.05
    config.dataset.extra = {"num_train": 2, "num_test": 1, "seed": 3}
    ds = EmbeddedRooms.from_config(config)
    assert (ds.dl, ds.counts, ds.seed) == (0.05, {"train": 2, "test": 1}, 3)
    with pytest.raises(ValueError, match="split"):
        ds.scenes("val")
    with pytest.raises(ValueError, match="first_subsampling_dl"):
        EmbeddedRooms(0.0)
    with pytest.raises(ValueError, match="num_train"):
        EmbeddedRooms(0.04, num_train=0)
