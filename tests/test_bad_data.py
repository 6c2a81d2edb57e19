"""Bad input data and damaged caches: non-finite values named at load time, ``dataset.on_bad_file``,
corrupt dataset / calibration caches rebuilt. Files are the tiny ones of test_datasets_original."""

import io
import json
import re

import numpy as np
import pytest
from test_datasets_original import SYNSETS, _written, config_for, write_mesh_ply, write_modelnet, write_s3dis

import tf_custom_ops  # noqa: F401  (loads the compiled ops from the shared cache before tests move it)
from kpconv_tf.config import Config, ConfigError
from training.datasets import common, load_dataset
from training.datasets.base import DatasetError, ObjectDataset
from utils.ply import read_ply_triangles, write_ply

pytestmark = pytest.mark.usefixtures("private_cache")

SHAPENET_TRAIN = f"{SYNSETS['Airplane']}/{SYNSETS['Airplane'][-3:]}abc0.txt"
S3DIS_FILE = "Area_1/office_1/Annotations/chair_1.txt"
SEMANTIC3D_SCAN = "sg27_station1_intensity_rgb"
SCANNET_MESH = "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
SCANNET_LABELS = "scans/scene0000_00/scene0000_00_vh_clean_2.labels.ply"

# (format, file under the root, column index or PLY property, column name): one case per field kind
# the format has (coordinates, normals, colours, intensity / reflectance, labels).
TEXT_CASES = [
    ("ModelNet40", "cup/cup_0001.txt", 1, "y"),
    ("ModelNet40", "cup/cup_0001.txt", 4, "normal_y"),
    ("ShapeNetPart", SHAPENET_TRAIN, 0, "x"),
    ("ShapeNetPart", SHAPENET_TRAIN, 3, "normal_x"),
    ("ShapeNetPart", SHAPENET_TRAIN, 6, "part"),
    ("S3DIS", S3DIS_FILE, 2, "z"),
    ("S3DIS", S3DIS_FILE, 5, "blue"),
    ("Semantic3D", f"{SEMANTIC3D_SCAN}.txt", 0, "x"),
    ("Semantic3D", f"{SEMANTIC3D_SCAN}.txt", 3, "intensity"),
    ("Semantic3D", f"{SEMANTIC3D_SCAN}.txt", 4, "red"),
    ("Semantic3D", f"{SEMANTIC3D_SCAN}.labels", 0, "label"),
]
NPM3D_FILE = "training_points/Paris.ply"
PLY_CASES = [
    ("NPM3D", NPM3D_FILE, "x"),
    ("NPM3D", NPM3D_FILE, "reflectance"),
    ("NPM3D", NPM3D_FILE, "class"),
    ("Scannet", SCANNET_MESH, "y"),
    ("Scannet", SCANNET_MESH, "green"),
    ("Scannet", SCANNET_LABELS, "label"),
]


def poison_text(path, column, word, row=4, delimiter=None):
    """Writes ``word`` into ``column`` of data line ``row`` (0-based) and a blank first line; returns
    the 1-based line of the poisoned value."""
    lines = path.read_text().splitlines()
    words = lines[row].split(delimiter)
    words[column] = word
    lines[row] = (delimiter or " ").join(words)
    path.write_text("\n" + "\n".join(lines) + "\n")
    return row + 2


def poison_ply(path, prop, value, index=7):
    """Rewrites the PLY (faces kept) with ``prop`` as float32 and ``value`` at vertex ``index``."""
    data, faces = read_ply_triangles(path)
    fields = {k: data[k] for k in data.dtype.names}
    fields[prop] = fields[prop].astype(np.float32)
    fields[prop][index] = value
    if len(faces):
        write_mesh_ply(path, fields, faces)
    else:
        write_ply(path, fields)


def write_format(name, root):
    """Writes tiny files of format ``name``; returns (dataset root, grid size)."""
    root, dl, _ = _written(name, root, np.random.default_rng(20))
    return root, dl


def open_dataset(name, root, dl, policy="error"):
    """The registered dataset through its config, as training builds it."""
    config = config_for(name, root, on_bad_file=policy)
    config.model.first_subsampling_dl = dl
    if name == "Scannet":
        config.dataset.extra = {"mesh_sampling": None}
    return load_dataset(config)


def load_train(dataset):
    return dataset.clouds("train") if isinstance(dataset, ObjectDataset) else dataset.scenes("train")


def cache_dir(tmp_path, dataset):
    return tmp_path / "cache" / "datasets" / dataset


# --------------------------------------------------------------------------------------------
# Non-finite values are named where they are read


@pytest.mark.parametrize("word", ["nan", "inf"])
@pytest.mark.parametrize("name, file, column, column_name", TEXT_CASES)
def test_text_non_finite_value_names_file_line_column(name, file, column, column_name, word, tmp_path):
    root, dl = write_format(name, tmp_path / name)
    path = root / file
    line = poison_text(path, column, word, delimiter="," if name == "ModelNet40" else None)
    message = f"{path}: line {line}: non-finite value in column {column + 1} ({column_name}): {word}"
    with pytest.raises(DatasetError, match=re.escape(message) + "$"):
        load_train(open_dataset(name, root, dl))


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("name, file, prop", PLY_CASES)
def test_ply_non_finite_value_names_file_vertex_property(name, file, prop, value, tmp_path):
    root, dl = write_format(name, tmp_path / name)
    poison_ply(root / file, prop, value)
    message = f"{root / file}: vertex 7: non-finite value in property {prop!r}: {np.float32(value)}"
    with pytest.raises(DatasetError, match=re.escape(message) + "$"):
        load_train(open_dataset(name, root, dl))


def test_scannet_alignment_must_be_finite(tmp_path):
    root, dl = write_format("Scannet", tmp_path / "s")
    meta = root / "scans" / "scene0001_00" / "scene0001_00.txt"
    meta.write_text(meta.read_text().replace("axisAlignment = 0 -1", "axisAlignment = nan -1"))
    with pytest.raises(DatasetError, match=re.escape(f"{meta}: line 2: non-finite value in axisAlignment")):
        load_train(open_dataset("Scannet", root, dl))


def test_read_table_non_finite_values_across_chunks_and_float32_range(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_CHUNK_LINES", 4)
    path = tmp_path / "t.txt"
    rows = ["1 2 3"] * 10
    rows[6] = "1 -inf 3"  # the 8th line once the blank line below is in: the second chunk
    path.write_text("\n".join(rows[:3] + [""] + rows[3:]) + "\n")
    message = f"{path}: line 8: non-finite value in column 2 (b): -inf"
    with pytest.raises(DatasetError, match=re.escape(message)):
        common.read_table(path, 3, names=["a", "b", "c"])
    path.write_text("1,2,3\n4,5,1e39\n")  # finite in float64, infinite in float32
    message = f"{path}: line 2: non-finite value in column 3: 1e39 (beyond float32)"
    with pytest.raises(DatasetError, match=re.escape(message)):
        common.read_table(path, 3, delimiter=",")
    ply = tmp_path / "t.ply"
    write_ply(ply, {"x": np.array([0.0, 1e39, 2.0]), "y": np.zeros(3, np.float32), "n": np.arange(3)})
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{ply}: vertex 1: non-finite value in property 'x': 1e+39 (beyond float32)"),
    ):
        common.read_ply_fields(ply, ["x", "y", "n"])
    np.testing.assert_array_equal(common.read_ply_fields(ply, ["y", "n"])["n"], [0, 1, 2])


# --------------------------------------------------------------------------------------------
# dataset.on_bad_file


def test_on_bad_file_is_a_validated_choice(tmp_path):
    assert Config().dataset.on_bad_file == "error"
    with pytest.raises(ConfigError, match=r"dataset.on_bad_file must be one of \['error', 'skip'\]"):
        Config.from_dict({"dataset": {"on_bad_file": "ignore"}})
    from training.datasets.modelnet40 import ModelNet40

    write_modelnet(tmp_path / "m", np.random.default_rng(0))
    with pytest.raises(ValueError, match="on_bad_file"):
        ModelNet40(tmp_path / "m", 0.2, on_bad_file="ignore")


# (format, file made bad, the cloud or scene it takes away or None, what the split count says)
SKIP_CASES = [
    ("ModelNet40", "cup/cup_0001.txt", "cup_0001", "1 of 6 files"),
    ("ShapeNetPart", SHAPENET_TRAIN, SHAPENET_TRAIN[:-4], "1 of 9 files"),
    ("S3DIS", S3DIS_FILE, None, "1 of 16 files"),
    ("Semantic3D", f"{SEMANTIC3D_SCAN}.labels", SEMANTIC3D_SCAN, "1 of 2 scans"),
    ("NPM3D", NPM3D_FILE, "Paris", "1 of 2 files"),
    ("Scannet", SCANNET_LABELS, "scene0000_00", "1 of 2 scenes"),
]


@pytest.mark.parametrize("name, file, gone, count", SKIP_CASES)
def test_skip_mode_leaves_a_bad_file_out_with_a_warning(name, file, gone, count, tmp_path, capsys):
    root, dl = write_format(name, tmp_path / name)
    complete = [c.name for c in load_train(open_dataset(name, root, dl, "skip"))]
    for path in cache_dir(tmp_path, name).glob("*.npz"):
        path.unlink()
    if file.endswith(".ply"):
        poison_ply(root / file, "label" if "label" in file else "x", np.nan)
    else:
        poison_text(root / file, 0, "nan", delimiter="," if name == "ModelNet40" else None)
    capsys.readouterr()
    kept = [c.name for c in load_train(open_dataset(name, root, dl, "skip"))]
    assert kept == [n for n in complete if n != gone]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("warning: split 'train': skipped (dataset.on_bad_file: skip): ")
    assert f"{root / file}: " in err[0] and "non-finite value" in err[0]
    assert err[1] == f"warning: skipped {count} read for split 'train' (dataset.on_bad_file: skip)"
    with pytest.raises(DatasetError, match=re.escape(str(root / file))):
        load_train(open_dataset(name, root, dl))  # the default policy stops on it


def test_skip_mode_modelnet40_caches_complete_reads_only(tmp_path, capsys):
    from training.datasets.modelnet40 import ModelNet40

    root = tmp_path / "m"
    write_modelnet(root, np.random.default_rng(2))
    bad = root / "night_stand" / "night_stand_0002.txt"
    good_text = bad.read_text()
    poison_text(bad, 3, "inf", delimiter=",")
    (root / "cup" / "cup_0001.txt").write_text("0,0,0,1,0\n")  # malformed: skipped too
    dataset = ModelNet40(root, 0.2, on_bad_file="skip")
    kept = ["bowl_0001", "bowl_0002", "night_stand_0001", "cup_0002"]
    assert [c.name for c in dataset.clouds("train")] == kept
    assert len(dataset.clouds("test")) == 3
    err = capsys.readouterr().err
    assert "night_stand_0002.txt: line 6: non-finite value in column 4 (normal_x): inf" in err
    assert "cup_0001.txt: line 1 is malformed" in err
    assert "skipped 2 of 6 files read for split 'train' (dataset.on_bad_file: skip)" in err
    # The partial train split is not cached (the complete test split is); repaired files are read.
    assert [p.name[:4] for p in cache_dir(tmp_path, "ModelNet40").glob("*.npz")] == ["test"]
    bad.write_text(good_text)
    (root / "cup" / "cup_0001.txt").write_text("0,0,0,1,0,0\n")
    assert len(ModelNet40(root, 0.2).clouds("train")) == 6
    assert len(list(cache_dir(tmp_path, "ModelNet40").glob("train_*.npz"))) == 1
    assert "skipped" not in capsys.readouterr().err


def test_skip_mode_fails_when_every_file_is_bad(tmp_path):
    from training.datasets.modelnet40 import ModelNet40
    from training.datasets.s3dis import S3DIS

    root = tmp_path / "m"
    write_modelnet(root, np.random.default_rng(3))
    for path in root.glob("*/*.txt"):
        path.write_text("nan,0,0,0,0,1\n")
    with pytest.raises(
        DatasetError,
        match=r"split 'train' has nothing left: 6 of 6 files read are bad; "
        r"the first: .*bowl_0001\.txt: line 1: non-finite",
    ):
        ModelNet40(root, 0.2, on_bad_file="skip").clouds("train")
    root = tmp_path / "s"
    write_s3dis(root, np.random.default_rng(3), areas=(1, 5))
    for path in (root / "Area_1").glob("*/Annotations/*.txt"):
        path.write_text("0 0 nan 1 2 3\n")
    with (
        pytest.warns(UserWarning, match="empty cloud Area_1"),
        pytest.raises(DatasetError, match="split 'train' has nothing left: 8 of 8 files"),
    ):
        S3DIS(root, 0.3, on_bad_file="skip").scenes("train")


def test_skip_mode_s3dis_keeps_the_rest_of_the_area(tmp_path, capsys):
    from training.datasets.s3dis import S3DIS

    root, clean = tmp_path / "s", tmp_path / "clean"
    for folder in (root, clean):
        write_s3dis(folder, np.random.default_rng(6), areas=(1, 2, 5))
    poison_text(root / S3DIS_FILE, 1, "nan")
    (clean / S3DIS_FILE).unlink()
    skipped = S3DIS(root, 0.3, on_bad_file="skip").scenes("train")
    assert [s.name for s in skipped] == ["Area_1", "Area_2"]
    err = capsys.readouterr().err
    assert f"{root / S3DIS_FILE}: line 6: non-finite value in column 2 (y): nan" in err
    assert "skipped 1 of 16 files read for split 'train'" in err
    # Area_2 was read whole and is cached, Area_1 is not.
    assert [p.name[:6] for p in cache_dir(tmp_path, "S3DIS").glob("*.npz")] == ["Area_2"]
    # The skipped area is the area without the bad file.
    for a, b in zip(skipped, S3DIS(clean, 0.3).scenes("train"), strict=True):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.colors, b.colors)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_skip_mode_run_trains(tmp_path, monkeypatch, capsys):
    import keras

    from kpconv_tf.models import KPCNN, dummy_inputs
    from training.datasets import configure
    from training.pipeline import Pipeline
    from training.trainer import TrainingModel

    # Neighbour calibration is tested with the pipeline; fixed widths keep this fast.
    monkeypatch.setattr(Pipeline, "calibrate_neighbors", lambda self, *a, **k: [20] * 2)  # 2 layers
    root = tmp_path / "m"
    write_modelnet(root, np.random.default_rng(4))
    poison_text(root / "bowl" / "bowl_0002.txt", 0, "nan", delimiter=",")
    config = config_for("ModelNet40", root, on_bad_file="skip")
    config.model.first_subsampling_dl = 0.2
    config.model.architecture = ["simple", "resnetb", "resnetb_strided", "resnetb", "global_average"]
    config.model.first_features_dim = 8
    config.train.batch_num = 2
    dataset = load_dataset(config)
    configure(config, dataset)
    pipeline = Pipeline(dataset, config)
    inputs, _ = next(iter(pipeline.dataset("train")))
    assert inputs["points_0"].shape[0] == inputs["lengths_0"].numpy().sum()
    assert np.all(np.isfinite(inputs["points_0"].numpy()))
    keras.utils.set_random_seed(0)
    network = KPCNN(config)
    network(dummy_inputs(config), training=False)
    model = TrainingModel(network, config)
    model.compile()
    history = model.fit(pipeline.dataset("train"), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    history = history.history
    assert np.isfinite(history["loss"][0])
    err = capsys.readouterr().err
    assert "bowl_0002.txt: line 6: non-finite value in column 1 (x): nan" in err
    assert "skipped 1 of 6 files read for split 'train'" in err


# --------------------------------------------------------------------------------------------
# Corrupt caches are named, deleted and rebuilt


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # a valid .npy where an .npz belongs
        buffer = io.BytesIO()
        np.save(buffer, np.arange(5))
        path.write_bytes(buffer.getvalue())


def assert_rebuilt(capsys, path):
    err = capsys.readouterr().err
    assert f"warning: cannot use the cache file {path} (" in err and "deleting and rebuilding it" in err, err
    assert path.stat().st_size > 0
    with np.load(path) as data:
        assert data.files


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "npy"])
def test_corrupt_dataset_cache_is_rebuilt(how, tmp_path, monkeypatch, capsys):
    from training.datasets.modelnet40 import ModelNet40

    root = tmp_path / "m"
    write_modelnet(root, np.random.default_rng(5))
    first = ModelNet40(root, 0.2).clouds("train")
    (path,) = cache_dir(tmp_path, "ModelNet40").glob("train_*.npz")
    corrupt(path, how)
    again = ModelNet40(root, 0.2).clouds("train")
    assert_rebuilt(capsys, path)
    for a, b in zip(first, again, strict=True):
        assert a.name == b.name and a.label == b.label
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.normals, b.normals)
    monkeypatch.setattr("training.datasets.modelnet40.read_table", lambda *a, **k: pytest.fail("not cached"))
    ModelNet40(root, 0.2).clouds("train")


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage"])
def test_lost_full_resolution_cloud_rebuilds_the_scene_cache(how, tmp_path, capsys):
    from training.datasets.s3dis import S3DIS

    root = tmp_path / "s"
    write_s3dis(root, np.random.default_rng(7), areas=(1, 2))
    first = S3DIS(root, 0.3, test_area=2).scenes("test")[0]
    full = first.full_points()
    (npy,) = cache_dir(tmp_path, "S3DIS").glob("Area_2_*_full_0.npy")
    (path,) = cache_dir(tmp_path, "S3DIS").glob("Area_2_*.npz")
    if how == "deleted":
        npy.unlink()
    else:
        corrupt(npy, how)
    again = S3DIS(root, 0.3, test_area=2).scenes("test")[0]
    err = capsys.readouterr().err
    assert f"warning: cannot use the cache file {path} (" in err and npy.name in err
    np.testing.assert_array_equal(again.full_points(), full)
    np.testing.assert_array_equal(again.points, first.points)
    np.testing.assert_array_equal(again.projection, first.projection)


@pytest.mark.parametrize("text", ["", '{"batch_limit": 12', "\x00\xff garbage", "[1, 2]"])
def test_corrupt_calibration_cache_is_rebuilt(text, capsys):
    from test_pipeline import make_pipeline

    pipeline, data, config = make_pipeline()
    limit = pipeline.batch_limit
    path = pipeline._cache_path()
    assert json.loads(path.read_text()) == {"batch_limit": limit}
    path.write_bytes(text.encode("latin-1"))
    from training.pipeline import Pipeline

    assert Pipeline(data, config).batch_limit == limit
    err = capsys.readouterr().err
    assert f"warning: cannot use the cache file {path} (" in err and "deleting and rebuilding it" in err
    assert json.loads(path.read_text()) == {"batch_limit": limit}


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_embedded_dataset_caches_are_rebuilt(how, tmp_path, capsys):
    from training.datasets.embedded_rooms import EmbeddedRooms
    from training.datasets.embedded_shapes import EmbeddedShapes

    shapes = EmbeddedShapes(0.1, (1, 1), seed=3).clouds("train")
    rooms = EmbeddedRooms(0.1, num_train=1, num_test=1, seed=0).scenes("train")
    for name in ("EmbeddedShapes", "EmbeddedRooms"):
        (path,) = cache_dir(tmp_path, name).glob("train_*.npz")
        corrupt(path, how)
    shapes_again = EmbeddedShapes(0.1, (1, 1), seed=3).clouds("train")
    rooms_again = EmbeddedRooms(0.1, num_train=1, num_test=1, seed=0).scenes("train")
    err = capsys.readouterr().err
    for name in ("EmbeddedShapes", "EmbeddedRooms"):
        (path,) = cache_dir(tmp_path, name).glob("train_*.npz")
        assert f"warning: cannot use the cache file {path} (" in err, err
        with np.load(path) as data:
            assert data.files
    for a, b in zip(shapes, shapes_again, strict=True):
        assert a.label == b.label
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.normals, b.normals)
    for a, b in zip(rooms, rooms_again, strict=True):
        for x, y in (
            (a.points, b.points),
            (a.colors, b.colors),
            (a.labels, b.labels),
            (a.projection, b.projection),
            (a.full_points(), b.full_points()),
        ):
            np.testing.assert_array_equal(x, y)
