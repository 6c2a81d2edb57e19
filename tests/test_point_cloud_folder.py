"""One's own data: S3DIS-layout scenes with their own classes, and PointCloudFolder on test-written files
in every format (ply, las, laz, txt, csv, npy), then training and testing on such a folder."""

import json

import laspy
import numpy as np
import pytest

from kpconv_tf.config import Config
from training.datasets import configure, load_dataset
from training.datasets.base import DatasetError, SceneDataset
from utils.ply import read_ply, write_ply

CONFIGS = "training/configs"
FOREST = ["ground", "tree", "clutter"]
COLUMNS = "x,y,z,red,green,blue,label"


def forest_plot(rng, offset=(0.0, 0.0), trees=2):
    """A small forest plot: points float64 [n, 3] (mm), colours uint8 [n, 3], intensity uint16 [n] and
    labels [n] (0 ground, 1 tree, 2 clutter)."""
    parts = [np.c_[rng.uniform(0, 4, (500, 2)), rng.normal(0, 0.02, 500)]]
    labels = [np.zeros(500, int)]
    for _ in range(trees):
        centre, angle, height = rng.uniform(1, 3, 2), rng.uniform(0, 2 * np.pi, 150), rng.uniform(0, 2.5, 150)
        parts.append(np.c_[centre + 0.15 * np.c_[np.cos(angle), np.sin(angle)], height])
        labels.append(np.ones(150, int))
    parts.append(rng.uniform(0, 0.5, (80, 3)) + (rng.uniform(0, 3), rng.uniform(0, 3), 0))
    labels.append(np.full(80, 2))
    points = np.round(np.concatenate(parts) + (*offset, 0), 3)
    labels = np.concatenate(labels)
    base = np.array([[120, 80, 40], [30, 160, 40], [128, 128, 128]])[labels]
    colors = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    intensity = (1000 + 20000 * labels + rng.integers(0, 1000, len(labels))).astype(np.uint16)
    return points, colors, intensity, labels


def write_las(path, points, colors, intensity, classification):
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, np.floor(points.min(0))
    las = laspy.LasData(header)
    las.x, las.y, las.z = points.T
    las.red, las.green, las.blue = (colors.astype(np.uint16) * 257).T  # 16-bit colours
    las.intensity, las.classification = intensity, classification.astype(np.uint8)
    las.write(str(path))


def write_plot(path, plot, label_values=(0, 1, 2)):
    """Writes a plot in the format of ``path``'s suffix; labels become ``label_values[label]``."""
    points, colors, intensity, labels = plot
    values = np.asarray(label_values)[labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".ply":
        write_ply(
            path,
            {
                "x": points[:, 0],
                "y": points[:, 1],
                "z": points[:, 2],
                "red": colors[:, 0],
                "green": colors[:, 1],
                "blue": colors[:, 2],
                "intensity": intensity,
                "label": values.astype(np.int32),
            },
        )
    elif suffix in (".las", ".laz"):
        write_las(path, points, colors, intensity, values)
    elif suffix == ".npy":
        np.save(path, np.c_[points, colors, values].astype(np.float64))
    else:
        rows = [
            f"{x:.3f} {y:.3f} {z:.3f} {r} {g} {b} {k}"
            for (x, y, z), (r, g, b), k in zip(points, colors, values)
        ]
        header = "x,y,z,red,green,blue,label\n" if suffix == ".csv" else ""
        separator = "," if suffix == ".csv" else " "
        path.write_text(header + "\n".join(r.replace(" ", separator) for r in rows) + "\n")
    return values


def folder_config(root, *extra_sets, extra=None, **dataset):
    config = Config.from_yaml(f"{CONFIGS}/point_cloud_folder.yaml", list(extra_sets))
    config.dataset.path = str(root)
    config.dataset.extra = dict(extra or {})
    config.model.first_subsampling_dl = 0.1
    for key, value in dataset.items():
        setattr(config.dataset, key, value)
    return config


# --------------------------------------------------------------------------------------------
# S3DIS layout with one's own classes


def write_s3dis_forest(root, rng, areas=(1, 2), classes=("ground", "tree", "clutter", "tree")):
    """Area_N/plot_k/Annotations/<class>_<k>.txt; returns per area the class name of every point, in
    the reader's order (rooms, then files, sorted)."""
    names = {}
    for area in areas:
        for room in ("plot_1", "plot_2"):
            folder = root / f"Area_{area}" / room / "Annotations"
            folder.mkdir(parents=True)
            for name in classes:
                k = len(list(folder.glob(f"{name}_*.txt"))) + 1
                n = int(rng.integers(15, 30))
                p = rng.uniform(0, 3, (n, 3)) + (3 * area, 0, 0)
                c = rng.integers(0, 256, (n, 3))
                (folder / f"{name}_{k}.txt").write_text(
                    "".join(f"{x:.3f} {y:.3f} {z:.3f} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(p, c))
                )
        files = sorted((root / f"Area_{area}").glob("*/Annotations/*.txt"))
        names[area] = [f.stem.rsplit("_", 1)[0] for f in files for _ in f.read_text().splitlines()]
    return names


def test_s3dis_layout_takes_its_classes_from_the_file_names(tmp_path, private_cache):
    from training.datasets.s3dis import S3DIS

    root = tmp_path / "forest"
    names = write_s3dis_forest(root, np.random.default_rng(0))
    config = Config.from_yaml(
        f"{CONFIGS}/s3dis.yaml", ["dataset.split=Area_2", "model.first_subsampling_dl=0.2"]
    )
    config.dataset.path = str(root)
    dataset = load_dataset(config)
    assert isinstance(dataset, S3DIS) and dataset.label_names == sorted(FOREST)
    configure(config, dataset)
    assert config.dataset.num_classes == 3
    test = dataset.scenes("test")[0]
    expected = [sorted(FOREST).index(n) for n in names[2]]
    np.testing.assert_array_equal(test.full_labels, expected)
    assert set(np.unique(dataset.scenes("train")[0].labels)) == {0, 1, 2}
    # S3DIS's own names keep the 13 classes in S3DIS's order, stairs folded into clutter.
    own = tmp_path / "own"
    write_s3dis_forest(own, np.random.default_rng(1), classes=("chair", "stairs"))
    s3dis = S3DIS(own, 0.2, test_area=2)
    assert len(s3dis.label_names) == 13 and s3dis.label_names[0] == "ceiling"
    assert set(np.unique(s3dis.scenes("test")[0].full_labels)) == {s3dis.label_names.index("chair"), 12}


def test_s3dis_layout_class_names_fix_the_order_and_add_a_class(tmp_path, private_cache):
    from training.datasets.s3dis import S3DIS

    root = tmp_path / "forest"
    names = write_s3dis_forest(root, np.random.default_rng(2))
    order = ["tree", "ground", "deadwood", "clutter"]
    config = Config.from_yaml(
        f"{CONFIGS}/s3dis.yaml",
        ["dataset.split=Area_1", "model.first_subsampling_dl=0.2", f"dataset.class_names={order}"],
    )
    config.dataset.path = str(root)
    dataset = load_dataset(config)
    assert dataset.label_names == order
    configure(config, dataset)
    assert config.dataset.num_classes == 4
    np.testing.assert_array_equal(
        dataset.scenes("validation")[0].full_labels, [order.index(n) for n in names[1]]
    )
    unknown = r"Area_\d/plot_1/Annotations/clutter_1\.txt: unknown class 'clutter'"
    with pytest.raises(DatasetError, match=unknown):
        S3DIS(root, 0.2, test_area=1, class_names=["tree", "ground"]).scenes("train")
    with pytest.raises(ValueError, match="distinct"):
        S3DIS(root, 0.2, test_area=1, class_names=["tree", "tree"])


# --------------------------------------------------------------------------------------------
# PointCloudFolder


def test_every_format_trains_validates_and_tests(tmp_path, private_cache, monkeypatch):
    rng = np.random.default_rng(3)
    root = tmp_path / "plots"
    written = {}
    for split, names in (
        ("train", ["a.ply", "b.las", "c.laz", "d.txt", "e.npy"]),
        ("validation", ["f.laz"]),
        ("test", ["g.npy", "h.ply"]),
    ):
        for i, name in enumerate(names):
            plot = forest_plot(rng, offset=(5.0 * i, 0.0))
            written[name] = (plot, write_plot(root / split / name, plot))
    (root / "classes.txt").write_text("ground\ntree\nclutter\n")
    config = folder_config(root, extra={"columns": COLUMNS, "class_names_file": "classes.txt"})
    dataset = load_dataset(config)
    assert isinstance(dataset, SceneDataset) and dataset.label_names == FOREST
    configure(config, dataset)
    assert config.dataset.num_classes == 3 and config.model.network_model == "segmentation"
    train = dataset.scenes("train")
    assert [s.name for s in train] == ["a", "b", "c", "d", "e"]
    for scene in train:
        assert scene.points.dtype == np.float32 and len(scene.points) < 900
        assert set(np.unique(scene.labels)) == {0, 1, 2}
        assert scene.colors.min() >= 0 and scene.colors.max() <= 1
        # Tree points are green in every format (8-bit, or 16-bit LAS colours).
        assert scene.colors[scene.labels == 1, 1].mean() > 0.5 > scene.colors[scene.labels == 0, 1].mean()
    for split, names in (("validation", ["f.laz"]), ("test", ["g.npy", "h.ply"])):
        for scene, name in zip(dataset.scenes(split), names, strict=True):
            (points, _, _, labels), _ = written[name]
            np.testing.assert_array_equal(scene.full_labels, labels)
            np.testing.assert_allclose(scene.full_points(), points, atol=1e-4)
            assert len(scene.projection) == len(points)

    def no_read(*args):
        raise AssertionError("read a file although its split is cached")

    monkeypatch.setattr("training.datasets.point_cloud_folder.read_point_file", no_read)
    again = load_dataset(config)
    for split in ("train", "validation", "test"):
        for a, b in zip(again.scenes(split), dataset.scenes(split), strict=True):
            np.testing.assert_array_equal(a.points, b.points)
            np.testing.assert_array_equal(a.labels, b.labels)


def test_cache_follows_edited_files(tmp_path, private_cache):
    rng = np.random.default_rng(4)
    root = tmp_path / "plots"
    write_plot(root / "train" / "a.ply", forest_plot(rng))
    write_plot(root / "test" / "b.ply", forest_plot(rng))
    first = load_dataset(folder_config(root)).scenes("test")[0].points
    write_plot(root / "test" / "b.ply", forest_plot(rng, trees=3))
    second = load_dataset(folder_config(root)).scenes("test")[0].points
    assert len(second) != len(first)


def test_splits_by_patterns_and_names(tmp_path, private_cache):
    rng = np.random.default_rng(5)
    root = tmp_path / "tiles"
    for name in ("tile_01.csv", "tile_02.csv", "tile_03.csv", "sub/tile_04.csv", "val_01.csv", "held.csv"):
        write_plot(root / name, forest_plot(rng, trees=1))
    config = folder_config(root, extra={"validation": "val_*.csv", "test": ["held.csv"]})
    dataset = load_dataset(config)
    assert dataset.files["train"] == sorted(
        [root / "tile_01.csv", root / "tile_02.csv", root / "tile_03.csv", root / "sub/tile_04.csv"]
    )
    assert [s.name for s in dataset.scenes("validation")] == ["val_01"]
    assert [s.name for s in dataset.scenes("test")] == ["held"]
    assert dataset.label_names == ["class_0", "class_1", "class_2"]  # from the training files
    dataset = load_dataset(
        folder_config(
            root, extra={"train": ["tile_0[12].csv", "**/tile_04.csv"], "validation": ["tile_03.csv"]}
        )
    )
    assert [p.name for p in dataset.files["train"]] == ["tile_04.csv", "tile_01.csv", "tile_02.csv"]
    assert dataset.files["test"] == dataset.files["validation"] == [root / "tile_03.csv"]
    with pytest.raises(DatasetError, match="tile_03.csv is both a training and a validation"):
        load_dataset(folder_config(root, extra={"train": "tile_*.csv", "validation": "tile_03.csv"}))
    with pytest.raises(DatasetError, match=r"dataset.extra.test: 'nope_\*.csv' matches no file"):
        load_dataset(folder_config(root, extra={"test": "nope_*.csv"}))
    with pytest.raises(DatasetError, match="dataset.extra.validation: no file .*missing.csv"):
        load_dataset(folder_config(root, extra={"validation": ["missing.csv"]}))
    with pytest.raises(DatasetError, match="no validation file"):
        load_dataset(folder_config(root)).scenes("validation")
    with pytest.raises(ValueError, match="unknown PointCloudFolder options.*'valid'"):
        load_dataset(folder_config(root, extra={"valid": "x.csv"}))


def test_class_names_file_with_values_ignored_labels_and_las_classification(tmp_path, private_cache, capsys):
    rng = np.random.default_rng(6)
    root = tmp_path / "lidar"
    codes = (2, 5, 1)  # LAS ground, high vegetation, unclassified
    train = write_plot(root / "train" / "a.laz", forest_plot(rng), codes)
    write_plot(root / "validation" / "b.las", forest_plot(rng), codes)
    (root / "codes.txt").write_text("# LAS codes\n1 unclassified\n2 ground\n5 vegetation\n")
    extra = {"class_names_file": "codes.txt", "ignored_labels": [1], "color_features": "intensity"}
    dataset = load_dataset(folder_config(root, extra=extra))
    assert dataset.label_names == ["ground", "vegetation"]
    scene = dataset.scenes("train")[0]
    assert set(np.unique(scene.labels)) == {-1, 0, 1}
    assert len(scene.labels) < len(train)
    # Intensity in all three channels, LAS's 16-bit scale.
    np.testing.assert_array_equal(scene.colors[:, 0], scene.colors[:, 2])
    assert 0.3 < scene.colors[scene.labels == 1, 0].mean() < 0.36  # about 21500 / 65535
    # A value outside the listed classes makes a bad file: an error, or skipped and reported.
    write_plot(root / "train" / "c.las", forest_plot(rng), (2, 5, 9))
    with pytest.raises(DatasetError, match=r"c\.las: label values \[9\]"):
        load_dataset(folder_config(root, extra=extra)).scenes("train")
    skipping = load_dataset(folder_config(root, extra=extra, on_bad_file="skip"))
    assert [s.name for s in skipping.scenes("train")] == ["a"]
    assert "skipped 1 of 2 files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="once"):
        load_dataset(folder_config(root, extra=extra, class_names=["a", "b"]))


def test_one_name_per_line_and_config_class_names(tmp_path, private_cache):
    from training.datasets.point_cloud_folder import read_class_names

    (tmp_path / "n.txt").write_text("ground\n\ntree # trunks and crowns\nclutter\n")
    assert read_class_names(tmp_path / "n.txt") == {0: "ground", 1: "tree", 2: "clutter"}
    (tmp_path / "d.txt").write_text("ground\ntree\nground\n")
    with pytest.raises(DatasetError, match="repeat"):
        read_class_names(tmp_path / "d.txt")
    (tmp_path / "v.txt").write_text("3 a\n3 b\n")
    with pytest.raises(DatasetError, match="3 is named twice"):
        read_class_names(tmp_path / "v.txt")
    rng = np.random.default_rng(7)
    root = tmp_path / "plots"
    write_plot(root / "train" / "a.ply", forest_plot(rng), (0, 1, 1))
    write_plot(root / "test" / "b.ply", forest_plot(rng), (0, 1, 1))
    dataset = load_dataset(folder_config(root, class_names=["ground", "tree", "deadwood"]))
    assert dataset.label_names == ["ground", "tree", "deadwood"]  # a class no file has yet
    with pytest.raises(DatasetError, match="class_names_file: no file"):
        load_dataset(folder_config(root, extra={"class_names_file": "none.txt"}))


def test_features_missing_labels_and_bad_files(tmp_path, private_cache, capsys):
    rng = np.random.default_rng(8)
    root = tmp_path / "plots"
    points, colors, intensity, labels = forest_plot(rng)
    (root / "train").mkdir(parents=True)
    write_ply(
        root / "train" / "geometry.ply",
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "label": labels.astype(np.int32)},
    )
    np.save(root / "train" / "nan.npy", np.c_[points, labels].astype(np.float64) * [1, 1, np.nan, 1])
    write_plot(root / "test" / "t.ply", forest_plot(rng))
    with pytest.raises(DatasetError, match="geometry.ply: neither colours .* nor intensity"):
        load_dataset(folder_config(root, extra={"train": "train/geometry.ply"})).scenes("train")
    geometry = load_dataset(folder_config(root, extra={"train": "train/geometry.ply"}, in_features_dim=2))
    assert not geometry.scenes("train")[0].colors.any()
    with pytest.raises(DatasetError, match=r"nan.npy: point 0: non-finite coordinates"):
        load_dataset(
            folder_config(root, extra={"train": "train/nan.npy", "columns": "x,y,z,label"}, in_features_dim=1)
        ).scenes("train")
    with pytest.raises(DatasetError, match="geometry.ply: no red, green, blue field"):
        load_dataset(
            folder_config(
                root, extra={"train": "train/geometry.ply", "color_features": "rgb"}, in_features_dim=1
            )
        ).scenes("train")
    with pytest.raises(DatasetError, match="geometry.ply: no label field 'class'"):
        load_dataset(
            folder_config(
                root, extra={"train": "train/geometry.ply", "label_field": "class"}, in_features_dim=1
            )
        ).scenes("train")
    # Test files without labels give unlabelled scenes.
    (root / "test" / "u.txt").write_text("".join(f"{x} {y} {z}\n" for x, y, z in points))
    unlabelled = load_dataset(
        folder_config(root, extra={"train": "train/geometry.ply", "test": "test/u.txt"}, in_features_dim=1)
    )
    assert unlabelled.scenes("test")[0].labels is None
    with pytest.raises(DatasetError, match="u.txt: no label field 'label'"):
        unlabelled.scenes("validation")  # the test files validate, and validation needs labels
    (root / "train" / "bad.las").write_bytes(b"LASF broken")
    skipping = load_dataset(
        folder_config(root, extra={"train": "train/*"}, in_features_dim=1, on_bad_file="skip")
    )
    assert [s.name for s in skipping.scenes("train")] == ["geometry"]
    assert "skipped 2 of 3 files" in capsys.readouterr().err


@pytest.mark.slow
def test_training_and_testing_on_a_folder_write_predictions(tmp_path, private_cache):
    from training.test import run_test
    from training.train import train

    rng = np.random.default_rng(9)
    root = tmp_path / "plots"
    write_plot(root / "train" / "a.laz", forest_plot(rng))
    write_plot(root / "train" / "b.ply", forest_plot(rng))
    test_plot = forest_plot(rng)
    write_plot(root / "test" / "c.las", test_plot)
    (root / "classes.txt").write_text("ground\ntree\nclutter\n")
    tiny = [
        f"dataset.path={root}",
        "dataset.extra={class_names_file: classes.txt}",
        "dataset.in_radius=1.0",
        "dataset.validation_size=1",
        "model.first_subsampling_dl=0.12",
        "model.first_features_dim=8",
        "model.architecture=[simple, resnetb_strided, resnetb, nearest_upsample, unary]",
        "train.batch_num=2",
        "train.epoch_steps=2",
        "train.max_epoch=1",
    ]
    run_dir = train("point_cloud_folder", tiny, run_dir=tmp_path / "run", verbose=0)
    result = run_test(run_dir, votes=0.3, log=lambda *a: None)
    assert result["class_names"] == FOREST and len(result["per_class_iou"]) == 3
    assert json.loads((run_dir / "test" / "metrics.json").read_text())["class_names"] == FOREST
    data = read_ply(run_dir / "test" / "predictions" / "predictions" / "c.ply")
    assert len(data) == len(test_plot[0])
    assert data["preds"].min() >= 0 and data["preds"].max() < 3
    np.testing.assert_array_equal(data["labels"], test_plot[3])
