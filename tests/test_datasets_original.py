"""Readers of the original on-disk dataset formats, on tiny files written here.

Every expected subsampled cloud is recomputed with an independent float64 numpy grid subsampling
(cell barycentres, averaged features, majority labels with ties to the smaller label).
"""

import json
from pathlib import Path

import numpy as np
import pytest

import tf_custom_ops  # noqa: F401  (loads the compiled ops from the shared cache before tests move it)
from kpconv_tf.architecture import block_type
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
                "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in data)
            )
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
                "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in data)
            )
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
    return grid_reference(
        xyz[:, swap],
        dl,
        features=data[:, 3:6][:, swap],
        labels=data[:, 6].astype(int) - PART_OFFSETS[category],
    )


def test_shapenetpart_multi_and_single(tmp_path, monkeypatch):
    from training.datasets.shapenetpart import CATEGORIES, NUM_PARTS, ShapeNetPart, from_config

    root = tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    shapes, lists = write_shapenetpart(root, np.random.default_rng(2))
    dl = 0.15
    config = config_for("ShapeNetPart", root)
    config.model.first_subsampling_dl = dl
    multi = from_config(config)
    assert (
        multi.task == "multi_segmentation"
        and multi.label_names == CATEGORIES
        and multi.num_parts == NUM_PARTS
    )
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
        assert cloud.point_labels.min() >= 0 and cloud.point_labels.max() < NUM_PARTS[category]

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
                    "".join(f"{x:.3f} {y:.3f} {z:.3f} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(p, c))
                )
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
    from training.datasets.s3dis import CLASSES, S3DIS

    with pytest.raises(DatasetError, match="Area_N"):
        S3DIS(tmp_path / "missing", 0.3)
    root = tmp_path / "S3DIS"
    write_s3dis(root, np.random.default_rng(5), areas=(1, 5))
    with pytest.raises(DatasetError, match="Area_3"):
        S3DIS(root, 0.3, test_area=3)
    bad = root / "Area_1" / "office_1" / "Annotations" / "sink_1.txt"
    bad.write_text("0 0 0 1 2 3\n")
    # with the class list fixed, a file of another class is an error (without it, 'sink' is a class)
    with pytest.raises(DatasetError, match=r"sink_1\.txt.*'sink'"):
        S3DIS(root, 0.3, class_names=CLASSES).scenes("train")
    bad.unlink()
    bad = root / "Area_1" / "office_1" / "Annotations" / "wall_1.txt"
    bad.write_text("0 0 0 1 2 3\n1 1 1 103.0\x100000 2 3\n")
    with pytest.raises(DatasetError, match=r"wall_1\.txt: line 2"):
        S3DIS(root, 0.3).scenes("train")


# --------------------------------------------------------------------------------------------
# Semantic3D


def write_semantic3d(root, rng, dl):
    root.mkdir(parents=True)
    scans = {
        "bildstein_station1_xyz_intensity_rgb": True,
        "domfountain_station1_xyz_intensity_rgb": True,
        "sg27_station1_intensity_rgb": True,
        "sg27_station10_rgb_intensity-reduced": False,
    }
    written = {}
    for s, (name, labelled) in enumerate(scans.items()):
        n = 150
        base = rng.uniform(0, 3, (n, 3)) + (10 * s, 0, 0)
        # Near-duplicates 2 mm apart so the 1 cm presampling merges points.
        points = off_grid(
            np.concatenate([base, base + rng.uniform(-2e-3, 2e-3, base.shape)]), 0.01, decimals=4
        )
        intensity = rng.integers(-2000, 2000, len(points))
        colors = rng.integers(0, 256, (len(points), 3))
        (root / f"{name}.txt").write_text(
            "".join(
                f"{x:.4f} {y:.4f} {z:.4f} {i} {r} {g} {b}\n"
                for (x, y, z), i, (r, g, b) in zip(points, intensity, colors)
            )
        )
        labels = rng.integers(0, 9, len(points)) if labelled else None
        if labelled:
            (root / f"{name}.labels").write_text("".join(f"{v}\n" for v in labels))
        written[name] = (points, colors / 255, labels)
    return written


def test_semantic3d_splits_presampling_and_cache(tmp_path, monkeypatch):
    from training.datasets.semantic3d import CLASSES, Semantic3D, from_config

    root = tmp_path / "Semantic3D"
    dl = 0.3
    written = write_semantic3d(root / "original_data", np.random.default_rng(6), dl)
    config = config_for("Semantic3D", root)
    config.model.first_subsampling_dl = dl
    dataset = from_config(config)
    assert dataset.label_names == CLASSES and len(CLASSES) == 8
    assert [s.name for s in dataset.scenes("train")] == [
        "bildstein_station1_xyz_intensity_rgb",
        "sg27_station1_intensity_rgb",
    ]
    assert [s.name for s in dataset.scenes("validation")] == ["domfountain_station1_xyz_intensity_rgb"]
    assert [s.name for s in dataset.scenes("test")] == ["sg27_station10_rgb_intensity-reduced"]
    for split in ("train", "validation", "test"):
        for scene in dataset.scenes(split):
            points, colors, raw = written[scene.name]
            if raw is None:
                ref = grid_reference(points, dl, features=colors)
                assert scene.labels is None and scene.full_labels is None
                np.testing.assert_allclose(scene.full_points(), points, atol=1e-5)
                full_points = points
            else:
                labels = raw - 1  # 0 (unlabeled) -> -1
                pre_points, pre_colors, pre_labels = grid_reference(
                    points, 0.01, features=colors, labels=labels
                )
                assert len(pre_points) < len(points)
                ref = grid_reference(pre_points, dl, features=pre_colors, labels=pre_labels)
                if split == "validation":
                    full_points = scene.full_points()
                    assert_cloud(full_points, pre_points, (scene.full_labels, pre_labels))
            pairs = [(scene.colors, ref[1])] + ([(scene.labels, ref[2])] if raw is not None else [])
            assert_cloud(scene.points, ref[0], *pairs)
            if split != "train":
                _, nearest = common.KDTree(scene.points).query(full_points)
                d_got = np.linalg.norm(full_points - scene.points[scene.projection], axis=1)
                d_best = np.linalg.norm(full_points - scene.points[nearest[:, 0]], axis=1)
                np.testing.assert_allclose(d_got, d_best, atol=1e-6)

    monkeypatch.setattr("training.datasets.semantic3d.read_table", lambda *a, **k: 1 / 0)
    again = Semantic3D(root, dl)
    np.testing.assert_array_equal(again.scenes("test")[0].points, dataset.scenes("test")[0].points)
    monkeypatch.undo()
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))
    other = Semantic3D(root, dl, validation_clouds=["sg27_station1_intensity_rgb"])
    assert [s.name for s in other.scenes("validation")] == ["sg27_station1_intensity_rgb"]
    with pytest.raises(DatasetError, match=r"no validation scan.*\['sg27_station2'\]"):
        Semantic3D(root, dl, validation_clouds=["sg27_station2"]).scenes("validation")


def test_semantic3d_bad_input(tmp_path):
    from training.datasets.semantic3d import Semantic3D

    with pytest.raises(DatasetError, match="scan"):
        Semantic3D(tmp_path, 0.1)
    root = tmp_path / "s"
    write_semantic3d(root, np.random.default_rng(7), 0.3)
    labels = root / "sg27_station1_intensity_rgb.labels"
    values = labels.read_text().split()
    labels.write_text("\n".join(values[:-1] + ["9"]) + "\n")
    with pytest.raises(DatasetError, match=r"sg27_station1_intensity_rgb\.labels: labels \[9\] are outside"):
        Semantic3D(root, 0.3).scenes("train")
    labels.write_text("\n".join(values[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"299 labels for the 300 points"):
        Semantic3D(root, 0.3).scenes("train")
    labels.write_text("\n".join(values) + "\n")
    txt = root / "sg27_station1_intensity_rgb.txt"
    lines = txt.read_text().splitlines()
    lines[41] = lines[41] + " 7"
    txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"sg27_station1_intensity_rgb\.txt: line 42"):
        Semantic3D(root, 0.3).scenes("train")


# --------------------------------------------------------------------------------------------
# NPM3D


def write_npm3d(root, rng):
    written = {}
    for folder, names in (
        ("training_points", ["Lille1_1", "Lille1_2", "Paris"]),
        ("test_points", ["ajaccio_2"]),
    ):
        (root / folder).mkdir(parents=True)
        for s, name in enumerate(names):
            n = 120
            xyz = off_grid(rng.uniform(0, 6, (n, 3)) + (20 * s, 0, 0), 0.5).T
            fields = {k: v.astype(np.float32) for k, v in zip("xyz", xyz)}
            fields["reflectance"] = rng.uniform(0, 120, n).astype(np.float32)
            if folder == "training_points":
                fields["class"] = rng.integers(0, 10, n).astype(np.int32)
            write_ply(root / folder / f"{name}.ply", fields)
            written[name] = fields
    return written


def test_npm3d_reflectance_labels_splits(tmp_path, monkeypatch):
    from training.datasets.npm3d import CLASSES, NPM3D, from_config

    root = tmp_path / "NPM3D"
    written = write_npm3d(root, np.random.default_rng(8))
    dl = 0.5
    config = config_for("NPM3D", root)
    config.model.first_subsampling_dl = dl
    dataset = from_config(config)
    assert dataset.label_names == CLASSES and len(CLASSES) == 9
    assert [s.name for s in dataset.scenes("train")] == ["Lille1_1", "Paris"]
    assert [s.name for s in dataset.scenes("validation")] == ["Lille1_2"]
    assert [s.name for s in dataset.scenes("test")] == ["ajaccio_2"]
    for split in ("train", "validation", "test"):
        for scene in dataset.scenes(split):
            f = written[scene.name]
            points = np.stack([f["x"], f["y"], f["z"]], 1)
            reflectance = np.minimum(f["reflectance"].astype(np.float64), 50)[:, None] / 50
            labels = f["class"] - 1 if "class" in f else None
            ref = grid_reference(points, dl, features=np.repeat(reflectance, 3, 1), labels=labels)
            pairs = [(scene.colors, ref[1])] + ([(scene.labels, ref[2])] if labels is not None else [])
            assert_cloud(scene.points, ref[0], *pairs)
            assert (scene.labels is None) == (split == "test")
            if split != "train":
                np.testing.assert_array_equal(scene.full_points(), points)
                if labels is not None:
                    np.testing.assert_array_equal(scene.full_labels, labels)
                _, nearest = common.KDTree(scene.points).query(points)
                np.testing.assert_allclose(
                    np.linalg.norm(points - scene.points[scene.projection], axis=1),
                    np.linalg.norm(points - scene.points[nearest[:, 0]], axis=1),
                    atol=1e-6,
                )

    monkeypatch.setattr("training.datasets.npm3d.read_ply_fields", lambda *a, **k: 1 / 0)
    np.testing.assert_array_equal(
        NPM3D(root, dl).scenes("train")[1].colors, dataset.scenes("train")[1].colors
    )


def test_npm3d_bad_input(tmp_path):
    from training.datasets.npm3d import NPM3D

    with pytest.raises(DatasetError, match="training_points"):
        NPM3D(tmp_path, 0.5)
    root = tmp_path / "n"
    written = write_npm3d(root, np.random.default_rng(9))
    fields = dict(written["Paris"])
    fields["class"] = fields["class"].copy()
    fields["class"][3] = 12
    write_ply(root / "training_points" / "Paris.ply", fields)
    with pytest.raises(DatasetError, match=r"Paris\.ply: labels \[12\]"):
        NPM3D(root, 0.5).scenes("train")
    del fields["class"]
    write_ply(root / "training_points" / "Paris.ply", fields)
    with pytest.raises(DatasetError, match=r"Paris\.ply: vertex properties \['class'\] are missing"):
        NPM3D(root, 0.5).scenes("train")
    write_ply(root / "training_points" / "Paris.ply", {k: v[:0] for k, v in written["Paris"].items()})
    with pytest.warns(UserWarning, match="Paris"):
        assert [s.name for s in NPM3D(root, 0.5).scenes("train")] == ["Lille1_1"]
    for path in (root / "test_points").glob("*.ply"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"no test scan.*test_points"):
        NPM3D(root, 0.5).scenes("test")


# --------------------------------------------------------------------------------------------
# Scannet


def write_mesh_ply(path, fields, faces):
    """Binary PLY with vertices and a triangle face element (as the ScanNet meshes); x, y, z and
    float arrays are written as floats, labels as ushort, the rest as uchar."""

    def ply_type(k):
        if k in "xyz" or np.issubdtype(np.asarray(fields[k]).dtype, np.floating):
            return "<f4"
        return "<u2" if k == "label" else "u1"

    dtype = [(k, ply_type(k)) for k in fields]
    types = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    vertices = np.empty(len(fields["x"]), dtype)
    for k in fields:
        vertices[k] = fields[k]
    header = [
        "ply",
        "format binary_little_endian 1.0",
        "comment made by the test",
        f"element vertex {len(vertices)}",
    ]
    header += [f"property {types[t]} {k}" for k, t in dtype]
    header += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    face_data = np.empty(len(faces), [("n", "u1"), ("v", "<i4", (3,))])
    face_data["n"], face_data["v"] = 3, faces
    path.write_bytes(("\n".join(header) + "\n").encode() + vertices.tobytes() + face_data.tobytes())


def write_scannet(root, rng):
    written = {}
    scenes = {
        "scene0000_00": "scans",
        "scene0001_00": "scans",
        "scene0002_00": "scans",
        "scene0707_00": "scans_test",
    }
    for scene, folder in scenes.items():
        d = root / folder / scene
        d.mkdir(parents=True)
        n = 100
        points = off_grid(rng.uniform(0, 4, (n, 3)), 0.4).astype(np.float32)
        colors = rng.integers(0, 256, (n, 3))
        fields = {
            "x": points[:, 0],
            "y": points[:, 1],
            "z": points[:, 2],
            "red": colors[:, 0],
            "green": colors[:, 1],
            "blue": colors[:, 2],
            "alpha": np.full(n, 255),
        }
        faces = rng.integers(0, n, (2 * n, 3))
        write_mesh_ply(d / f"{scene}_vh_clean_2.ply", fields, faces)
        labels = None
        if folder == "scans":
            labels = rng.integers(0, 41, n)
            write_mesh_ply(d / f"{scene}_vh_clean_2.labels.ply", {**fields, "label": labels}, faces)
        written[scene] = (points.astype(np.float64), colors / 255, labels)
    # A quarter turn about z and a shift, as the ScanNet meta files give.
    (root / "scans" / "scene0001_00" / "scene0001_00.txt").write_text(
        "colorHeight = 968\naxisAlignment = 0 -1 0 1.5 1 0 0 -2 0 0 1 0.25 0 0 0 1\nnumDepthFrames = 10\n"
    )
    (root / "scannetv2_val.txt").write_text("scene0002_00\n")
    return written


def test_scannet_labels_alignment_splits(tmp_path, monkeypatch):
    from training.datasets.scannet import CLASS_IDS, CLASSES, Scannet, from_config

    root = tmp_path / "Scannet"
    written = write_scannet(root, np.random.default_rng(10))
    dl = 0.4
    config = config_for("Scannet", root, extra={"mesh_sampling": None})  # the vertices are the cloud
    config.model.first_subsampling_dl = dl
    dataset = from_config(config)
    assert dataset.label_names == CLASSES and len(CLASSES) == 20
    assert [s.name for s in dataset.scenes("train")] == ["scene0000_00", "scene0001_00"]
    assert [s.name for s in dataset.scenes("validation")] == ["scene0002_00"]
    assert [s.name for s in dataset.scenes("test")] == ["scene0707_00"]
    lookup = {i: CLASS_IDS.index(i) if i in CLASS_IDS else -1 for i in range(41)}
    for split in ("train", "validation", "test"):
        for scene in dataset.scenes(split):
            points, colors, raw = written[scene.name]
            if scene.name == "scene0001_00":
                rotation = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
                points = points @ rotation.T + (1.5, -2, 0.25)
            labels = None if raw is None else np.array([lookup[v] for v in raw])
            ref = grid_reference(points, dl, features=colors, labels=labels)
            pairs = [(scene.colors, ref[1])] + ([(scene.labels, ref[2])] if labels is not None else [])
            assert_cloud(scene.points, ref[0], *pairs)
            if split != "train":
                np.testing.assert_allclose(scene.full_points(), points, atol=1e-6)
                if labels is not None:
                    np.testing.assert_array_equal(scene.full_labels, labels)
    assert dataset.scenes("test")[0].labels is None

    monkeypatch.setattr("training.datasets.scannet.read_ply_fields", lambda *a, **k: 1 / 0)
    np.testing.assert_array_equal(
        Scannet(root, dl, mesh_sampling=None).scenes("validation")[0].labels,
        dataset.scenes("validation")[0].labels,
    )
    monkeypatch.undo()
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))
    # An explicit training list replaces "every scene not in validation".
    (root / "scannetv2_train.txt").write_text("scene0001_00\n")
    assert [s.name for s in Scannet(root, dl, mesh_sampling=None).scenes("train")] == ["scene0001_00"]


def test_scannet_bad_input(tmp_path):
    from training.datasets.scannet import Scannet

    with pytest.raises(DatasetError, match="scans"):
        Scannet(tmp_path / "nothing", 0.4)
    root = tmp_path / "s"
    write_scannet(root, np.random.default_rng(11))
    (root / "scannetv2_val.txt").unlink()
    with pytest.raises(DatasetError, match="scannetv2_val.txt"):
        Scannet(root, 0.4, mesh_sampling=None)
    (root / "scannetv2_val.txt").write_text("scene0002_00\nscene0003_00\n")
    with pytest.raises(DatasetError, match=r"scene0003_00_vh_clean_2\.ply"):
        Scannet(root, 0.4, mesh_sampling=None).scenes("validation")
    (root / "scannetv2_val.txt").write_text("scene0002_00\n")
    (root / "scannetv2_test.txt").write_text("")
    with pytest.raises(DatasetError, match="no test scene"):
        Scannet(root, 0.4, mesh_sampling=None).scenes("test")
    (root / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.labels.ply").unlink()
    with pytest.raises(DatasetError, match=r"scene0000_00_vh_clean_2\.labels\.ply"):
        Scannet(root, 0.4, mesh_sampling=None).scenes("train")


def test_sample_mesh_covers_faces_with_nearest_vertices():
    from training.datasets.scannet import sample_mesh

    rng = np.random.default_rng(12)
    # Disjoint faces (own vertices), one of them degenerate (two equal corners).
    corners = rng.uniform(0, 0.3, (6, 3, 3))
    corners[5, 1] = corners[5, 0]
    vertices = corners.reshape(-1, 3)
    faces = np.arange(18).reshape(6, 3)
    spacing = 0.02
    points, nearest = sample_mesh(vertices, faces, spacing)
    face = nearest // 3
    assert not np.any(face == 5)
    tri = corners[face].astype(np.float64)  # [p, 3, 3]
    # Every sample lies inside its face: barycentric coordinates >= 0 that rebuild it.
    e1, e2, q = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], points - tri[:, 0]
    gram = np.stack(
        [
            np.stack([(e1 * e1).sum(1), (e1 * e2).sum(1)], 1),
            np.stack([(e1 * e2).sum(1), (e2 * e2).sum(1)], 1),
        ],
        1,
    )
    uv = np.linalg.solve(gram, np.stack([(q * e1).sum(1), (q * e2).sum(1)], 1)[..., None])[..., 0]
    np.testing.assert_allclose(tri[:, 0] + uv[:, :1] * e1 + uv[:, 1:] * e2, points, atol=1e-6)
    assert np.all(uv > -1e-6) and np.all(uv.sum(1) < 1 + 1e-6)
    # The vertex given is the nearest corner of the face.
    d = np.linalg.norm(points[:, None, :] - tri, axis=2)
    np.testing.assert_allclose(d[np.arange(len(points)), nearest % 3], d.min(1), atol=1e-7)
    # Coverage: the samples cut each face into triangles of sides <= spacing, so any point of a face is
    # within spacing / sqrt(3) (the circumradius bound of such a triangle) of a sample of that face.
    for f in range(5):
        ab = rng.random((2000, 2))
        ab = np.where(ab.sum(1, keepdims=True) > 1, 1 - ab, ab)
        probe = (
            corners[f, 0]
            + ab[:, :1] * (corners[f, 1] - corners[f, 0])
            + ab[:, 1:] * (corners[f, 2] - corners[f, 0])
        )
        own = points[face == f]
        gap = np.sqrt(((probe[:, None, :] - own[None]) ** 2).sum(-1)).min(1)
        assert gap.max() <= spacing / np.sqrt(3) + 1e-9


def test_scannet_samples_faces_as_the_original(tmp_path):
    from training.datasets.scannet import Scannet

    root = tmp_path / "Scannet"
    d = root / "scans" / "scene0005_00"
    d.mkdir(parents=True)
    # A floor square (z = 0.05) and a wall square (x = 3.05), two triangles each, shared corners.
    floor = [(0.01, 0.01, 0.05), (1.99, 0.01, 0.05), (1.99, 1.99, 0.05), (0.01, 1.99, 0.05)]
    wall = [(3.05, 0.01, 0.01), (3.05, 1.99, 0.01), (3.05, 1.99, 1.19), (3.05, 0.01, 1.19)]
    xyz = np.array(floor + wall, np.float32)
    colors = np.array([[200, 10, 10]] * 4 + [[10, 10, 200]] * 4)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    fields = {
        "x": xyz[:, 0],
        "y": xyz[:, 1],
        "z": xyz[:, 2],
        "red": colors[:, 0],
        "green": colors[:, 1],
        "blue": colors[:, 2],
        "alpha": np.full(8, 255),
    }
    write_mesh_ply(d / "scene0005_00_vh_clean_2.ply", fields, faces)
    write_mesh_ply(d / "scene0005_00_vh_clean_2.labels.ply", {**fields, "label": [2] * 4 + [1] * 4}, faces)
    (root / "scannetv2_val.txt").write_text("scene0005_00\n")
    scene = Scannet(root, 0.2, mesh_sampling=0.005).scenes("validation")[0]
    # Every 20 cm cell the two squares cross holds one point: 10 x 10 on the floor, 10 x 6 on the wall.
    on_wall = scene.points[:, 0] > 2.5
    assert on_wall.sum() == 60 and (~on_wall).sum() == 100
    np.testing.assert_allclose(scene.points[~on_wall, 2], 0.05, atol=1e-6)
    np.testing.assert_allclose(scene.points[on_wall, 0], 3.05, atol=1e-6)
    # wall (nyu 1) -> class 0, floor (nyu 2) -> class 1, colours from the mesh vertices.
    np.testing.assert_array_equal(scene.labels, np.where(on_wall, 0, 1))
    np.testing.assert_allclose(
        scene.colors, np.where(on_wall[:, None], [10, 10, 200], [200, 10, 10]) / 255, atol=1e-6
    )
    # The full-resolution cloud is the vertices.
    np.testing.assert_array_equal(scene.full_points(), xyz)
    np.testing.assert_array_equal(scene.full_labels, [1] * 4 + [0] * 4)
    d2 = ((xyz[:, None] - scene.points[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d2[np.arange(8), scene.projection], d2.min(1), atol=1e-9)


# --------------------------------------------------------------------------------------------
# Training configurations


@pytest.mark.parametrize(
    "name, dl, radius, features, batch, epochs, period",
    [
        ("ModelNet40", 0.02, None, 1, 16, 402, 80),
        ("ShapeNetPart", 0.02, None, 4, 16, 500, 80),
        ("S3DIS", 0.04, 2.0, 5, 10, 500, 100),
        ("Scannet", 0.04, 2.0, 4, 10, 500, 100),
        ("Semantic3D", 0.06, 3.0, 4, 10, 500, 100),
        ("NPM3D", 0.08, 4.0, 1, 8, 600, 100),
    ],
)
def test_original_training_configs(name, dl, radius, features, batch, epochs, period):
    config = Config.from_yaml(CONFIGS / f"{name.lower()}.yaml")
    assert config.dataset.name == name
    if any(block_type(block).deformable for block in config.model.architecture):
        # Deformable layers ship the stable definition (README "Deformable KPConv").
        assert config.train.semantics == "paper" and config.train.offset_lr_factor == 0.1
        assert config.model.offset_bound == 1.0 and config.train.offsets_loss == "point2point"
        assert config.train.offsets_decay == 1.0 and config.train.repulse_extent == 1.2
    else:
        assert config.train.semantics == "original" and config.model.offset_bound == 0.0
    assert config.model.first_subsampling_dl == dl and config.dataset.in_features_dim == features
    assert config.train.batch_num == batch and config.train.max_epoch == epochs
    assert config.model.density_parameter == 5.0 and config.model.kp_extent == 1.0
    if radius is not None:
        assert config.dataset.in_radius == radius
    # The original decays the learning rate by 0.1 ** (1 / period) at the end of epochs 1 .. max_epoch - 1.
    assert sorted(config.train.decays()) == list(range(1, epochs))
    np.testing.assert_allclose(list(config.train.decays().values()), 0.1 ** (1 / period), rtol=1e-12)
    arch = config.model.architecture
    assert arch[0] == "simple" and (arch[-1] == "global_average") == (name == "ModelNet40")
    assert sum(block_type(b).kind == "strided" for b in arch) == 4 and config.model.num_layers == 5


def test_sample_mesh_chunks_agree(monkeypatch):
    from training.datasets import scannet

    rng = np.random.default_rng(13)
    vertices = rng.uniform(0, 0.2, (30, 3))
    faces = rng.integers(0, 30, (40, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    whole = scannet.sample_mesh(vertices, faces, 0.03)
    monkeypatch.setattr(scannet, "_CHUNK_SAMPLES", 7)
    chunked = scannet.sample_mesh(vertices, faces, 0.03)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


# --------------------------------------------------------------------------------------------
# Through the input pipeline


def _written(name, root, rng):
    """(dataset root, grid size, scene radius) of tiny files of format ``name``."""
    if name == "ModelNet40":
        write_modelnet(root, rng)
        return root, 0.2, None
    if name == "ShapeNetPart":
        write_shapenetpart(root, rng)
        return root, 0.15, None
    if name == "S3DIS":
        write_s3dis(root, rng)
        return root, 0.3, 1.0
    if name == "Semantic3D":
        write_semantic3d(root, rng, 0.3)
        return root, 0.3, 1.5
    if name == "NPM3D":
        write_npm3d(root, rng)
        return root, 0.5, 3.0
    write_scannet(root, rng)
    return root, 0.4, 2.0


@pytest.mark.parametrize("name", ["ModelNet40", "ShapeNetPart", "S3DIS", "Scannet", "Semantic3D", "NPM3D"])
def test_original_formats_feed_the_pipeline(name, tmp_path, monkeypatch):
    from training.datasets import configure, load_dataset
    from training.pipeline import Pipeline

    # Neighbour calibration is the pipeline's own business (tested there); fixed widths keep this fast.
    monkeypatch.setattr(
        Pipeline, "calibrate_neighbors", lambda self, *a, **k: [30] * self.config.model.num_layers
    )

    root, dl, radius = _written(name, tmp_path / name, np.random.default_rng(14))
    config = config_for(name, root)
    if name == "Scannet":
        config.dataset.extra = {"mesh_sampling": None}
    config.model.first_subsampling_dl = dl
    config.train.batch_num = 2
    if radius is not None:
        config.dataset.in_radius = radius
    dataset = load_dataset(config)
    assert type(dataset).__name__ == name
    configure(config, dataset)
    pipeline = Pipeline(dataset, config)
    inputs, labels = next(iter(pipeline.dataset("train")))
    lengths = inputs["lengths_0"].numpy()
    assert inputs["points_0"].shape[0] == lengths.sum() == inputs["features"].shape[0]
    assert inputs["features"].shape[1] == config.dataset.in_features_dim
    labels = labels.numpy()
    if dataset.task == "classification":
        assert labels.shape == lengths.shape and set(labels) <= set(range(len(dataset.label_names)))
    else:
        assert labels.shape == (lengths.sum(),) and labels.min() >= -1
        parts = getattr(dataset, "num_parts", None)
        assert labels.max() < (max(parts) if parts else len(dataset.label_names))
