"""training.train / training.test end to end on tiny embedded data (subprocesses where it matters)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.config import ConfigError
from training.run_store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["table", "mug", "dumbbell"]
TINY = [
    "dataset.name=EmbeddedShapes",
    "dataset.in_features_dim=4",
    "dataset.validation_size=1",
    f"dataset.extra={{train_per_class: 6, test_per_class: 2, seed: 1, classes: {SHAPES}}}",
    "model.first_subsampling_dl=0.15",
    "model.first_features_dim=8",
    "model.density_parameter=3.0",
    "model.architecture=[simple, resnetb, resnetb_strided, resnetb, global_average]",
    "train.batch_num=4",
    "train.epoch_steps=4",
    "train.max_epoch=3",
    "train.learning_rate=0.002",
    "train.momentum=0.9",
    "train.snapshot_gap=2",
    "train.votes=2",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(
        os.environ,
        KPCONV_TF_CACHE=str(cache),
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        KPCONV_TF_DETERMINISTIC="1",
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, env):
    """One uninterrupted 3-epoch run, shared by the tests that inspect a run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(
        "training.train",
        ["--config", "embedded_shapes", "--run-dir", str(run_dir), "--verbose", "2", *sets(TINY)],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # one fit over the run: Keras counts the real epochs, and reads no more data than there is
    assert [line for line in result.stdout.splitlines() if line.startswith("Epoch ")] == [
        "Epoch 1/3",
        "Epoch 2/3",
        "Epoch 3/3",
    ]
    assert "ran out of data" not in result.stdout + result.stderr
    return run_dir


def sets(items):
    return [a for item in items for a in ("--set", item)]


def run_cli(module, args, env, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def read_log(run_dir):
    with open(run_dir / "training_log.csv") as f:
        return list(csv.DictReader(f))


def network_values(run_dir, name="last"):
    reader = tf.train.load_checkpoint(str(RunStore(run_dir).prefix(name)))
    keys = sorted(k for k in reader.get_variable_to_shape_map() if k.startswith("network_variables/"))
    assert keys, "the checkpoint holds no network variables"
    return {k: reader.get_tensor(k) for k in keys}


@pytest.mark.slow
def test_train_writes_a_run_and_test_votes(straight_run, env):
    run_dir = straight_run
    rows = read_log(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["val_accuracy"] != "" for r in rows)
    assert float(rows[-1]["output_loss"]) < float(rows[0]["output_loss"])  # it learns
    for name in ("config.yaml", "calibration.json", "training.txt", "state.json"):
        assert (run_dir / name).exists(), name
    store = RunStore(run_dir)
    assert set(store.names()) == {"last", "best", "epoch_0002"}
    for name in store.names():
        assert Path(f"{store.prefix(name)}.index").exists(), name
    assert list((run_dir / "tensorboard").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epochs"] == 3 and state["steps"] == 12 and state["finished"]
    lines = (run_dir / "training.txt").read_text().splitlines()
    assert lines[0].split() == ["epochs", "steps", "out_loss", "offset_loss", "train_accuracy", "time"]
    assert len(lines) == 13

    result = run_cli("training.test", [str(run_dir), "--votes", "2", "--checkpoint", "last"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == set(SHAPES)
    conf = np.array(metrics["confusion"])
    assert conf.sum() == 2 * len(SHAPES)  # every test object once, votes averaged
    assert metrics["overall_accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert (run_dir / "test" / "confusion.png").exists()

    result = run_cli("utils.plots", [str(run_dir)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "convergence_loss.png").exists()


@pytest.mark.slow
def test_time_budget_stops_with_a_checkpoint(tmp_path, env):
    run_dir = tmp_path / "budget"
    result = run_cli(
        "training.train",
        [
            "--config",
            "embedded_shapes",
            "--run-dir",
            str(run_dir),
            "--verbose",
            "0",
            "--max-minutes",
            "0.001",
            *sets(TINY),
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget" in result.stdout
    state = json.loads((run_dir / "state.json").read_text())
    assert state["steps"] >= 1 and not state["finished"]
    assert Path(f"{RunStore(run_dir).prefix('last')}.index").exists()


@pytest.mark.slow
def test_resume_inside_an_epoch_ends_as_the_straight_run(tmp_path, env, straight_run):
    """A time-budget stop after the first step, then --resume: the rest of epoch 1, then epochs 2-3."""
    run_dir = tmp_path / "budget"
    args = ["--config", "embedded_shapes", "--run-dir", str(run_dir), "--verbose", "0"]
    result = run_cli("training.train", [*args, "--max-minutes", "0.001", *sets(TINY)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["steps"] == 1
    result = run_cli("training.train", ["--resume", str(run_dir), "--verbose", "2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    # the rest of epoch 1 (its own fit), then epochs 2 and 3, counted as the run's
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"], epochs
    assert "ran out of data" not in result.stdout + result.stderr
    ours, straight = network_values(run_dir), network_values(straight_run)
    for key in straight:
        np.testing.assert_array_equal(ours[key], straight[key], err_msg=key)
    for row, reference in zip(read_log(run_dir), read_log(straight_run), strict=True):
        for key in reference:
            if key.startswith("val_") and reference[key]:
                assert float(row[key]) == pytest.approx(float(reference[key]), rel=1e-6), key
            elif key != "seconds":
                assert row[key] == reference[key], key
    steps = [line.split()[:-1] for line in (run_dir / "training.txt").read_text().splitlines()]
    assert steps == [line.split()[:-1] for line in (straight_run / "training.txt").read_text().splitlines()]


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    from training.config import load_config
    from training.train import main

    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="train.no_such_key"):
        load_config("embedded_shapes", ["train.no_such_key=1"])
    with pytest.raises(ConfigError, match="train.batch_num"):
        load_config("embedded_shapes", ["train.batch_num=many"])
    with pytest.raises(ConfigError, match="not found"):
        main(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="dataset.name"):
        main(["--config", "embedded_shapes", "--set", "dataset.name=Nope", "--run-dir", str(tmp_path / "r")])


@pytest.mark.slow
def test_scene_training_and_test_write_predictions(tmp_path, env, monkeypatch):
    run_dir = tmp_path / "rooms"
    rooms = [
        "dataset.name=EmbeddedRooms",
        "dataset.in_features_dim=5",
        "dataset.in_radius=1.0",
        "dataset.validation_size=2",
        "dataset.extra={num_train: 1, num_test: 1, seed: 2}",
        "model.first_subsampling_dl=0.12",
        "model.first_features_dim=8",
        "model.density_parameter=3.0",
        "model.architecture=[simple, resnetb_strided, resnetb, nearest_upsample, unary]",
        "train.batch_num=2",
        "train.epoch_steps=3",
        "train.max_epoch=1",
        "train.learning_rate=0.002",
    ]
    result = run_cli(
        "training.train",
        ["--config", "embedded_shapes", "--run-dir", str(run_dir), "--verbose", "0", *sets(rooms)],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_log(run_dir)[0]["val_mean_iou"] != ""
    result = run_cli("training.test", [str(run_dir), "--votes", "0.3"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert 0 <= metrics["overall_accuracy"] <= 1 and len(metrics["per_class_iou"]) == 8
    from training.datasets.embedded_rooms import EmbeddedRooms
    from utils.ply import read_ply

    monkeypatch.setenv("KPCONV_TF_CACHE", env["KPCONV_TF_CACHE"])
    scene = EmbeddedRooms(0.12, num_train=1, num_test=1, seed=2).scenes("test")[0]
    plys = list((run_dir / "test" / "predictions").rglob("*.ply"))
    assert plys
    data = read_ply(plys[0])
    preds = np.asarray(data["preds"]) if isinstance(data, dict) else data["preds"]
    assert len(preds) == len(scene.full_points())
    assert preds.min() >= 0 and preds.max() < 8


@pytest.mark.slow
def test_part_segmentation_training_and_voting(tmp_path, env):
    run_dir = tmp_path / "parts"
    parts = [
        "dataset.name=EmbeddedParts",
        "dataset.in_features_dim=4",
        "dataset.validation_size=1",
        f"dataset.extra={{train_per_class: 3, test_per_class: 1, seed: 1, classes: {SHAPES}}}",
        "model.first_subsampling_dl=0.15",
        "model.first_features_dim=8",
        "model.density_parameter=3.0",
        "model.architecture=[simple, resnetb_strided, resnetb, nearest_upsample, unary]",
        "train.batch_num=3",
        "train.epoch_steps=2",
        "train.max_epoch=1",
        "train.learning_rate=0.002",
    ]
    result = run_cli(
        "training.train",
        ["--config", "embedded_parts", "--run-dir", str(run_dir), "--verbose", "0", *sets(parts)],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("training.test", [str(run_dir), "--votes", "2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert set(metrics["per_category_miou"]) == set(SHAPES)
    assert 0 <= metrics["class_miou"] <= 1 and 0 <= metrics["instance_miou"] <= 1
    assert metrics["class_miou"] == pytest.approx(np.mean(list(metrics["per_category_miou"].values())))
