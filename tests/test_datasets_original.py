"""Readers of the original on-disk dataset formats, on tiny files written here.

Every expected subsampled cloud is recomputed with an independent float64 numpy grid subsampling
(cell barycentres, averaged features, majority labels with ties to the smaller label).
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import tf_custom_ops  # noqa: F401  (loads the compiled ops from the shared cache before tests move it)
from kpconv_tf.config import Config
from training.datasets import common
from training.datasets.base import DatasetError, ObjectDataset, SceneDataset
from utils.ply import write_ply

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))


def grid_reference(points, dl, features=None, labels=None):
    """float64 numpy grid subsampling, cells in lexicographic (x, y, z) cell order."""
    points = np.asarray(points, np.float64)
    origin = np.floor(points.min(0) / dl) * dl
    cells = np.floor((points - origin) / dl).astype(np.int64)
    keys, inverse = np.unique(cells, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse)
    out = [np.stack([np.bincount(inverse, points[:, d]) for d in range(3)], 1) / counts[:, None]]
    if features is not None:
        f = np.asarray(features, np.float64)
        out.append(np.stack([np.bincount(inverse, f[:, d]) for d in range(f.shape[1])], 1) / counts[:, None])
    if labels is not None:
        votes = []
        for c in range(len(keys)):
            values, n = np.unique(labels[inverse == c], return_counts=True)
            votes.append(values[np.argmax(n)])  # np.unique sorts: ties go to the smaller label
        out.append(np.array(votes))
    return out


def assert_cloud(points, expected_points, *pairs):
    """Same points (in any order) and, through the matching, same per-point values in each pair."""
    from scipy.spatial import cKDTree

    assert len(points) == len(expected_points)
    dist, match = cKDTree(np.asarray(points, np.float64)).query(expected_points)
    assert np.all(dist < 1e-5) and len(np.unique(match)) == len(match)
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got)[match], want, atol=1e-5)


def off_grid(values, dl, decimals=None):
    """``values`` moved (by 5e-3) away from the cell boundaries of a grid ``dl`` anchored at 0 (so
    float32 and float64 cell assignments agree), rounded to ``decimals`` when given."""
    values = np.asarray(values, np.float64)
    if decimals is not None:
        values = np.round(values, decimals)
    frac = values / dl - np.floor(values / dl)
    values = np.where((frac < 0.02) | (frac > 0.98), values + 5e-3 * np.sign(0.5 - frac), values)
    return values if decimals is None else np.round(values, decimals)


def config_for(name, root, **dataset):
    config = Config.from_yaml(CONFIGS / f"{name.lower()}.yaml")
    assert config.dataset.name == name
    config.dataset.path = str(root)
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    return config


# --------------------------------------------------------------------------------------------
# Text tables


def test_read_table_parses_and_names_malformed_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("1 2 3\n\n4.5 -5e-1 6\n")
    np.testing.assert_array_equal(common.read_table(good, 3), [[1, 2, 3], [4.5, -0.5, 6]])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n4 5 6\n7 x 9\n")
    with pytest.raises(DatasetError, match=r"bad\.txt: line 3"):
        common.read_table(bad, 3)
    short = tmp_path / "short.txt"
    short.write_text("1,2,3\n4,5\n")
    with pytest.raises(DatasetError, match=r"short\.txt: line 2"):
        common.read_table(short, 3, delimiter=",")
    with pytest.raises(DatasetError, match="missing file"):
        common.read_table(tmp_path / "absent.txt", 3)


def test_read_table_chunks_keep_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_CHUNK_LINES", 4)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    path = tmp_path / "t.txt"
    path.write_text("".join(" ".join(f"{v:g}" for v in r) + "\n" for r in rows))
    np.testing.assert_array_equal(common.read_table(path, 3), rows)
    lines = path.read_text().splitlines()
    lines[8] = "1 2"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="line 9 "):
        common.read_table(path, 3)


# --------------------------------------------------------------------------------------------
# ModelNet40


def write_modelnet(root, rng, classes=("bowl", "night_stand", "cup")):
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    shapes = {}
    splits = {"train": [], "test": []}
    for c, cls in enumerate(classes):
        (root / cls).mkdir()
        for k in range(1, 4):
            shape = f"{cls}_{k:04d}"
            n = int(rng.integers(30, 60))
            points = off_grid(rng.uniform(-0.5, 0.5, (n, 3)) + c, 0.2)
            normals = rng.normal(size=(n, 3))
            normals /= np.linalg.norm(normals, axis=1, keepdims=True)
            data = np.concatenate([points, normals], 1).astype(np.float32)
            (root / cls / f"{shape}.txt").write_text(
                "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in data))
            shapes[shape] = np.loadtxt(root / cls / f"{shape}.txt", delimiter=",", dtype=np.float32)
            splits["test" if k == 3 else "train"].append(shape)
    for split, names in splits.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(names) + "\n")
    return shapes, splits


def test_modelnet40_reads_subsamples_and_caches(tmp_path, monkeypatch):
    from training.datasets.modelnet40 import ModelNet40, from_config

    root = tmp_path / "modelnet40_normal_resampled"
    shapes, splits = write_modelnet(root, np.random.default_rng(0))
    config = config_for("ModelNet40", root)
    config.model.first_subsampling_dl = 0.2
    dataset = from_config(config)
    assert isinstance(dataset, ObjectDataset) and dataset.task == "classification"
    assert dataset.label_names == ["bowl", "night_stand", "cup"]
    for split in ("train", "test"):
        clouds = dataset.clouds(split)
        assert [c.name for c in clouds] == splits[split]
        for cloud in clouds:
            assert cloud.label == dataset.label_names.index(cloud.name.rsplit("_", 1)[0])
            data = shapes[cloud.name]
            ref_points, ref_normals = grid_reference(data[:, :3], 0.2, features=data[:, 3:])
            assert cloud.points.dtype == np.float32 and cloud.normals.shape == cloud.points.shape
            assert_cloud(cloud.points, ref_points, (cloud.normals, ref_normals))

    # The second construction reads the cache, not the shape files.
    def no_read(*args, **kwargs):
        raise AssertionError("raw files read although cached")

    monkeypatch.setattr("training.datasets.modelnet40.read_table", no_read)
    again = ModelNet40(root, 0.2)
    for a, b in zip(again.clouds("train"), dataset.clouds("train")):
        np.testing.assert_array_equal(a.points, b.points)
        assert a.label == b.label and a.name == b.name
    with pytest.raises(AssertionError):
        ModelNet40(root, 0.25).clouds("train")  # another grid size is another cache entry
    with pytest.raises(ValueError, match="split"):
        dataset.clouds("validation")


def test_modelnet40_bad_input(tmp_path):
    from training.datasets.modelnet40 import ModelNet40

    with pytest.raises(DatasetError, match=r"absent.*modelnet40_shape_names"):
        ModelNet40(tmp_path / "absent", 0.2)
    root = tmp_path / "m"
    write_modelnet(root, np.random.default_rng(1))
    (root / "cup" / "cup_0001.txt").unlink()
    with pytest.raises(DatasetError, match=r"cup_0001\.txt"):
        ModelNet40(root, 0.2).clouds("train")
    (root / "cup" / "cup_0001.txt").write_text("0,0,0,0,0,1\n0,0,0,0,1\n")
    with pytest.raises(DatasetError, match=r"cup_0001\.txt: line 2"):
        ModelNet40(root, 0.2).clouds("train")
    (root / "cup" / "cup_0001.txt").write_text("")
    with pytest.warns(UserWarning, match="cup_0001"):
        clouds = ModelNet40(root, 0.3).clouds("train")
    assert "cup_0001" not in [c.name for c in clouds] and len(clouds) == 5
    (root / "modelnet40_test.txt").write_text("piano_0001\n")
    with pytest.raises(DatasetError, match="piano"):
        ModelNet40(root, 0.2).clouds("test")


# --------------------------------------------------------------------------------------------
# ShapeNetPart

SYNSETS = {"Airplane": "02691156", "Car": "02958343", "Mug": "03797390"}


def write_shapenetpart(root, rng):
    from training.datasets.shapenetpart import CATEGORIES, NUM_PARTS, PART_OFFSETS

    root.mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{c}\t{s}\n" for c, s in SYNSETS.items()))
    (root / "train_test_split").mkdir()
    shapes, lists = {}, {"train": [], "val": [], "test": []}
    for category, synset in SYNSETS.items():
        (root / synset).mkdir()
        c = CATEGORIES.index(category)
        for k, which in enumerate(["train", "train", "val", "test"]):
            shape_id = f"{synset[-3:]}abc{k}"
            n = int(rng.integers(30, 60))
            points = rng.uniform(-0.3, 0.4, (n, 3))
            normals = rng.normal(size=(n, 3))
            parts = rng.integers(0, NUM_PARTS[c], n) + PART_OFFSETS[c]
            data = np.concatenate([points, normals, parts[:, None]], 1)
            (root / synset / f"{shape_id}.txt").write_text(
                "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in data))
            shapes[f"{synset}/{shape_id}"] = (np.loadtxt(root / synset / f"{shape_id}.txt"), c)
            lists[which].append(f"shape_data/{synset}/{shape_id}")
    for which, entries in lists.items():
        (root / "train_test_split" / f"shuffled_{which}_file_list.json").write_text(json.dumps(entries))
    return shapes, lists


def shapenet_reference(data, category, dl):
    from training.datasets.shapenetpart import PART_OFFSETS

    xyz = data[:, :3] - (data[:, :3].min(0) + data[:, :3].max(0)) / 2
    xyz /= np.linalg.norm(xyz, axis=1).max()
    swap = [0, 2, 1]
    return grid_reference(xyz[:, swap], dl, features=data[:, 3:6][:, swap],
                          labels=data[:, 6].astype(int) - PART_OFFSETS[category])


def test_shapenetpart_multi_and_single(tmp_path, monkeypatch):
    from training.datasets.shapenetpart import CATEGORIES, NUM_PARTS, ShapeNetPart, from_config

    root = tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    shapes, lists = write_shapenetpart(root, np.random.default_rng(2))
    dl = 0.15
    config = config_for("ShapeNetPart", root)
    config.model.first_subsampling_dl = dl
    multi = from_config(config)
    assert multi.task == "multi_segmentation" and multi.label_names == CATEGORIES and multi.num_parts == NUM_PARTS
    train = multi.clouds("train")
    # Train is the official train + val lists, in that order.
    assert [c.name for c in train] == [e[11:] for e in lists["train"] + lists["val"]]
    assert [c.name for c in multi.clouds("test")] == [e[11:] for e in lists["test"]]
    for cloud in train + multi.clouds("test"):
        data, category = shapes[cloud.name]
        assert cloud.label == category
        ref_points, ref_normals, ref_parts = shapenet_reference(data, category, dl)
        assert cloud.point_labels.dtype == np.int32
        assert_cloud(cloud.points, ref_points, (cloud.normals, ref_normals), (cloud.point_labels, ref_parts))
        assert 0 <= cloud.point_labels.min() and cloud.point_labels.max() < NUM_PARTS[category]

    monkeypatch.setattr("training.datasets.shapenetpart.read_table", lambda *a, **k: 1 / 0)
    config.dataset.split = "car"
    car = from_config(config)  # every category comes from the same cache
    assert car.task == "segmentation" and car.label_names == ["Car"] and car.num_parts == [4]
    clouds = car.clouds("train")
    assert [c.name for c in clouds] == [e[11:] for e in lists["train"] + lists["val"] if "/02958343/" in e]
    assert all(c.label == 0 for c in clouds)
    with pytest.raises(ValueError, match="category"):
        ShapeNetPart(root, dl, category="Spaceship")


def test_shapenetpart_bad_input(tmp_path):
    from training.datasets.shapenetpart import ShapeNetPart

    with pytest.raises(DatasetError, match="synsetoffset2category"):
        ShapeNetPart(tmp_path / "nothing", 0.1)
    root = tmp_path / "s"
    shapes, lists = write_shapenetpart(root, np.random.default_rng(3))
    airplane = lists["test"][0][11:]
    # Part 5 is a Bag part: outside the Airplane's parts 0..3.
    (root / f"{airplane}.txt").write_text("0 0 0 0 0 1 5\n")
    with pytest.raises(DatasetError, match=f"{airplane}.txt: part labels"):
        ShapeNetPart(root, 0.1).clouds("test")
    (root / f"{airplane}.txt").write_text("0 0 0 0 0 1 1\n0 0 0 0 0 1\n")
    with pytest.raises(DatasetError, match=f"{airplane}.txt: line 2"):
        ShapeNetPart(root, 0.1).clouds("test")
    (root / "train_test_split" / "shuffled_val_file_list.json").unlink()
    with pytest.raises(DatasetError, match="shuffled_val_file_list.json"):
        ShapeNetPart(root, 0.1).clouds("train")


# --------------------------------------------------------------------------------------------
# S3DIS


def write_s3dis(root, rng, areas=(1, 2, 5)):
    full = {}
    for area in areas:
        points, colors, labels = [], [], []
        for room in ("office_1", "hallway_2"):
            folder = root / f"Area_{area}" / room / "Annotations"
            folder.mkdir(parents=True)
            for cls, label in (("ceiling", 0), ("chair", 7), ("stairs", 12), ("chair", 7)):
                k = len(list(folder.glob(f"{cls}_*.txt"))) + 1
                n = int(rng.integers(20, 40))
                p = off_grid(rng.uniform(0, 2, (n, 3)) + (area, 0, 0), 0.3, decimals=3)
                c = rng.integers(0, 256, (n, 3))
                (folder / f"{cls}_{k}.txt").write_text(
                    "".join(f"{x:.3f} {y:.3f} {z:.3f} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(p, c)))
                points.append(np.round(p, 3))
                colors.append(c / 255)
                labels.append(np.full(n, label))
        full[area] = [np.concatenate(a) for a in (points, colors, labels)]
    return full


def test_s3dis_areas_splits_projection_and_cache(tmp_path, monkeypatch):
    from training.datasets.s3dis import CLASSES, S3DIS, from_config

    root = tmp_path / "S3DIS"
    full = write_s3dis(root / "Stanford3dDataset_v1.2_Aligned_Version", np.random.default_rng(4))
    dl = 0.3
    config = config_for("S3DIS", root, split="Area_2")
    config.model.first_subsampling_dl = dl
    dataset = from_config(config)
    assert isinstance(dataset, SceneDataset) and dataset.label_names == CLASSES and len(CLASSES) == 13
    assert [s.name for s in dataset.scenes("train")] == ["Area_1", "Area_5"]
    assert [s.name for s in dataset.scenes("validation")] == ["Area_2"]
    assert dataset.scenes("test") is dataset.scenes("validation")
    for scene in dataset.scenes("train") + dataset.scenes("test"):
        points, colors, labels = full[int(scene.name[5:])]
        ref_points, ref_colors, ref_labels = grid_reference(points, dl, features=colors, labels=labels)
        assert_cloud(scene.points, ref_points, (scene.colors, ref_colors), (scene.labels, ref_labels))
        assert scene.tree.data.shape == scene.points.shape
    test = dataset.scenes("test")[0]
    points, _, labels = full[2]
    full_points = test.full_points()
    assert full_points.dtype == np.float32
    assert_cloud(full_points, points, (test.full_labels, labels))
    # Projection: the nearest subsampled point of every full-resolution point (brute force).
    d2 = ((full_points[:, None, :].astype(np.float64) - test.points[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d2[np.arange(len(full_points)), test.projection], d2.min(1), atol=1e-9)
    assert dataset.scenes("train")[0].projection is None

    assert S3DIS(root, dl).scenes("validation")[0].name == "Area_5"  # the default test area

    monkeypatch.setattr("training.datasets.s3dis.read_table", lambda *a, **k: 1 / 0)
    again = S3DIS(root, dl, test_area=2)  # cached, found from the parent folder too
    np.testing.assert_array_equal(again.scenes("test")[0].points, test.points)
    np.testing.assert_array_equal(again.scenes("test")[0].full_points(), full_points)


def test_s3dis_bad_input(tmp_path):
    from training.datasets.s3dis import S3DIS

    with pytest.raises(DatasetError, match="Area_N"):
        S3DIS(tmp_path / "missing", 0.3)
    root = tmp_path / "S3DIS"
    write_s3dis(root, np.random.default_rng(5), areas=(1, 5))
    with pytest.raises(DatasetError, match="Area_3"):
        S3DIS(root, 0.3, test_area=3)
    bad = root / "Area_1" / "office_1" / "Annotations" / "sink_1.txt"
    bad.write_text("0 0 0 1 2 3\n")
    with pytest.raises(DatasetError, match=r"sink_1\.txt.*'sink'"):
        S3DIS(root, 0.3).scenes("train")
    bad.unlink()
    bad = root / "Area_1" / "office_1" / "Annotations" / "wall_1.txt"
    bad.write_text("0 0 0 1 2 3\n1 1 1 103.0\x100000 2 3\n")
    with pytest.raises(DatasetError, match=r"wall_1\.txt: line 2"):
        S3DIS(root, 0.3).scenes("train")
