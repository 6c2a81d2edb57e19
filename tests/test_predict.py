"""training.predict on test-written clouds: scene segmentation (.ply, .las) with a tiny KP-FCNN trained
on the embedded rooms, classification of a folder of .txt objects with a tiny KP-CNN, every bad input,
folder skipping and --strict, and Ctrl-C leaving no output file."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import train_tiny

from training import predict
from utils.point_files import read_point_file, write_point_file

ROOMS_TINY = [
    "dataset.extra={num_train: 2, num_test: 1, seed: 1}",
    "dataset.validation_size=1",
    "dataset.in_radius=1.5",
    "model.first_subsampling_dl=0.15",
    "model.first_features_dim=8",
    "train.batch_num=2",
    "train.epoch_steps=2",
    "train.max_epoch=1",
    "train.votes=1",
]
SHAPES = ["table", "mug", "dumbbell"]
SHAPES_TINY = [
    f"dataset.extra={{train_per_class: 3, test_per_class: 2, seed: 1, classes: {SHAPES}}}",
    "dataset.validation_size=1",
    "model.first_subsampling_dl=0.15",
    "model.first_features_dim=8",
    "model.architecture=[simple, resnetb_strided, resnetb, global_average]",
    "train.batch_num=3",
    "train.epoch_steps=2",
    "train.max_epoch=1",
]


@pytest.fixture(scope="module")
def rooms_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_rooms", ROOMS_TINY)


@pytest.fixture(scope="module")
def shapes_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_shapes", SHAPES_TINY)


def synthetic_room(n=6000, seed=0, offset=(0.0, 0.0, 0.0)):
    """A 4 x 3 x 2.5 m box room (floor, ceiling, walls) with a table: float64 [n, 3], uint8 rgb [n, 3]."""
    rng = np.random.default_rng(seed)
    u = rng.random((n, 2))
    surface = rng.integers(0, 7, n)
    size = np.array([4.0, 3.0, 2.5])
    points = np.zeros((n, 3))
    for s, (a, b, axis, value) in enumerate(
        [
            (0, 1, 2, 0.0),
            (0, 1, 2, 2.5),
            (0, 2, 1, 0.0),
            (0, 2, 1, 3.0),
            (1, 2, 0, 0.0),
            (1, 2, 0, 4.0),
            (0, 1, 2, 0.8),
        ]
    ):
        rows = surface == s
        points[rows, a] = u[rows, 0] * (size[a] if s < 6 else 1.2) + (0 if s < 6 else 1.5)
        points[rows, b] = u[rows, 1] * (size[b] if s < 6 else 0.8) + (0 if s < 6 else 1.0)
        points[rows, axis] = value
    points += rng.normal(scale=0.005, size=points.shape) + np.asarray(offset)
    palette = np.array(
        [
            [120, 100, 80],
            [230, 230, 230],
            [200, 180, 160],
            [190, 190, 170],
            [210, 200, 150],
            [180, 180, 200],
            [90, 50, 20],
        ]
    )
    colors = (palette[surface] + rng.integers(-10, 10, (n, 3))).astype(np.uint8)
    return points, colors


def write_room(path, n=6000, colors=True, seed=0, offset=(0.0, 0.0, 0.0)):
    points, rgb = synthetic_room(n, seed, offset)
    fields = {"intensity": np.arange(n, dtype=np.uint16)}
    if colors:
        fields.update(
            red=rgb[:, 0].astype(np.uint16) * 256,
            green=rgb[:, 1].astype(np.uint16) * 256,
            blue=rgb[:, 2].astype(np.uint16) * 256,
        )
    write_point_file(path, points, fields)
    return points


def run_predict(*argv):
    return predict.main([str(a) for a in argv])


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_scene_ply_and_las_every_input_point_labelled(rooms_run, tmp_path, capsys):
    room = write_room(tmp_path / "room.ply")
    tile = write_room(tmp_path / "tile.las", n=4000, seed=1, offset=(512000.0, 5400000.0, 300.0))
    out = tmp_path / "out"
    assert (
        run_predict(
            rooms_run,
            tmp_path / "room.ply",
            tmp_path / "tile.las",
            "--out",
            out,
            "--votes",
            2,
            "--probabilities",
        )
        == 0
    )
    assert listing(out) == ["room.ply", "tile.las", "tile.ply"]
    from training.datasets.embedded_rooms import CLASSES

    for name, points in (("room", room), ("tile", tile)):
        result = read_point_file(out / f"{name}.ply")
        np.testing.assert_allclose(result.points, points, atol=1e-3 if name == "tile" else 1e-6)
        pred = np.asarray(result.fields["pred"])
        assert pred.shape == (len(points),) and pred.min() >= 0 and pred.max() < len(CLASSES)
        assert {"red", "green", "blue", "intensity"} <= set(result.fields)
        probs = np.stack([np.asarray(result.fields[c], np.float64) for c in CLASSES], 1)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(np.argmax(probs, 1), pred)
    las = read_point_file(out / "tile.las")
    np.testing.assert_allclose(las.points, tile, atol=1e-3)
    np.testing.assert_array_equal(
        np.asarray(las.fields["classification"]), np.asarray(read_point_file(out / "tile.ply").fields["pred"])
    )
    assert las.las_header is not None and "intensity" in las.fields
    printed = capsys.readouterr().out
    assert "room.ply: 6000 points" in printed and all(c in printed for c in CLASSES)


def test_votes_reached_on_the_subsampled_cloud(rooms_run):
    model = predict.open_model(rooms_run, "last")
    points, rgb = synthetic_room(3000, seed=3)
    result = predict.predict_scene(model, points, rgb.astype(np.float32) / 255, votes=3, batch_spheres=2)
    assert result.coverage.min() >= 3 and result.spheres >= 3
    m = len(result.coverage)
    assert m < 3000 and result.sub_probabilities.shape == (m, len(model.class_names))
    np.testing.assert_allclose(result.sub_probabilities.sum(1), 1.0, atol=1e-5)
    # Every input point takes the probabilities of its nearest subsampled point.
    assert result.pred.shape == (3000,) and result.projection.min() >= 0 and result.projection.max() < m
    np.testing.assert_array_equal(result.pred, np.argmax(result.sub_probabilities, 1)[result.projection])
    np.testing.assert_array_equal(result.probabilities(2), result.sub_probabilities[result.projection, 2])


def test_classification_of_a_folder_of_txt_objects(shapes_run, tmp_path):
    from training.datasets.embedded_shapes import EmbeddedShapes

    clouds = EmbeddedShapes(0.05, (1, 2), seed=5, classes=SHAPES).clouds("test")
    folder = tmp_path / "objects"
    folder.mkdir()
    for i, cloud in enumerate(clouds):
        np.savetxt(folder / f"object_{i}.txt", np.concatenate([cloud.points, cloud.normals], 1), fmt="%.6f")
    (folder / "notes.md").write_text("not a point file: ignored in a folder")
    out = tmp_path / "out"
    assert run_predict(shapes_run, folder, "--out", out, "--columns", "x,y,z,nx,ny,nz", "--top-k", 2) == 0
    rows = json.loads((out / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in rows] == [f"object_{i}.txt" for i in range(len(clouds))]
    for row in rows:
        assert row["label"] in SHAPES and len(row["top"]) == 2
        assert row["top"][0]["label"] == row["label"]
        assert row["top"][0]["probability"] >= row["top"][1]["probability"]
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("file,label,probability,label_1,probability_1") and len(lines) == len(rows) + 1


def bad_inputs(folder: Path):
    """{case: (file, extra args, words the error must contain)}."""
    (folder / "empty.txt").write_text("")
    points, _ = synthetic_room(500)
    points[7, 1] = np.nan
    np.savetxt(folder / "nan.txt", points)
    np.savetxt(folder / "three_columns.txt", synthetic_room(500)[0])
    write_room(folder / "grey.las", n=500, colors=False)
    (folder / "cloud.foo").write_text("1 2 3\n")
    return {
        "empty": ("empty.txt", [], []),
        "nan": ("nan.txt", [], []),
        "columns": ("three_columns.txt", ["--columns", "x,y,z,r,g,b"], []),
        "no colours": ("grey.las", [], ["colour", "--features ones"]),
        "extension": ("cloud.foo", [], []),
    }


@pytest.mark.parametrize("case", ["empty", "nan", "columns", "no colours", "extension"])
def test_bad_input_is_an_error_naming_the_file(rooms_run, tmp_path, capsys, case):
    name, extra, words = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    assert run_predict(rooms_run, tmp_path / name, "--out", out, "--votes", 0.5, *extra) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / name) in err and all(w in err for w in words), err
    assert listing(out) == []


def test_missing_colours_can_be_fed_as_ones(rooms_run, tmp_path):
    write_room(tmp_path / "grey.las", n=800, colors=False)
    out = tmp_path / "out"
    assert (
        run_predict(rooms_run, tmp_path / "grey.las", "--out", out, "--votes", 0.5, "--features", "ones") == 0
    )
    assert listing(out) == ["grey.las", "grey.ply"]


def test_a_bad_file_in_a_folder_is_skipped_unless_strict(rooms_run, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a_empty.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\n"
        "property float y\nproperty float z\nend_header\n"
    )
    write_room(folder / "b_room.ply", n=1500)
    out = tmp_path / "out"
    assert run_predict(rooms_run, folder, "--out", out, "--votes", 0.5) == 1
    err = capsys.readouterr().err
    assert "a_empty.ply" in err and "1 of 2 inputs failed" in err
    assert listing(out) == ["b_room.ply"]
    strict = tmp_path / "strict"
    assert run_predict(rooms_run, folder, "--out", strict, "--votes", 0.5, "--strict") == 1
    assert listing(strict) == []


def test_ctrl_c_mid_run_leaves_no_output_file(rooms_run, tmp_path, monkeypatch):
    write_room(tmp_path / "tile.las", n=1500)
    out = tmp_path / "out"
    calls = []
    original = predict.RunModel.probabilities

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(predict.RunModel, "probabilities", interrupted)
    assert (
        run_predict(rooms_run, tmp_path / "tile.las", "--out", out, "--votes", 3, "--batch-spheres", 1) == 130
    )
    assert len(calls) == 2 and listing(out) == []


def test_ctrl_c_between_output_files_leaves_none(rooms_run, tmp_path, monkeypatch):
    import utils.point_files

    write_room(tmp_path / "tile.las", n=1500)
    out = tmp_path / "out"
    original = utils.point_files.write_point_file
    written = []

    def write_then_interrupt(path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt  # during the second file (the .las)
        written.append(original(path, *args, **kwargs))
        return written[-1]

    monkeypatch.setattr(utils.point_files, "write_point_file", write_then_interrupt)
    assert run_predict(rooms_run, tmp_path / "tile.las", "--out", out, "--votes", 0.5) == 130
    assert written and not written[0].exists() and listing(out) == []


def test_model_argument_errors(tmp_path):
    assert run_predict(tmp_path, tmp_path, "--out", tmp_path / "out") == 2
    with pytest.raises(SystemExit):
        predict.parse_args([str(tmp_path), str(tmp_path), "--out", str(tmp_path), "--votes", "0"])
