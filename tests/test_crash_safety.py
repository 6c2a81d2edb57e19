"""Crash-safe runs end to end: kill loops (SIGKILL at random moments, and a death at each stage of the
epoch-end save), damaged checkpoints named, failed starts leaving the results folder as it was, and
the non-finite-loss message naming only checkpoints that exist."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.run_store import CheckpointError, RunStore

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["table", "mug", "dumbbell"]
# Short epochs: enough commits for every save stage, snapshots and pruned saves.
EPOCHS = 8
RUN = [
    "dataset.name=EmbeddedShapes",
    "dataset.in_features_dim=4",
    "dataset.validation_size=1",
    f"dataset.extra={{train_per_class: 6, test_per_class: 2, seed: 1, classes: {SHAPES}}}",
    "model.first_subsampling_dl=0.15",
    "model.first_features_dim=8",
    "model.density_parameter=3.0",
    "model.architecture=[simple, resnetb, resnetb_strided, resnetb, global_average]",
    "train.batch_num=4",
    "train.epoch_steps=2",
    f"train.max_epoch={EPOCHS}",
    "train.learning_rate=0.002",
    "train.momentum=0.9",
    "train.snapshot_gap=2",
]


def sets(items):
    return [a for item in items for a in ("--set", item)]


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


@pytest.fixture
def subprocess_cache(env, monkeypatch):
    """The subprocesses' cache for in-process runs too (kernel points and data made once)."""
    monkeypatch.setenv("KPCONV_TF_CACHE", env["KPCONV_TF_CACHE"])


def train_command(run_dir, resume=False):
    args = (
        ["--resume", str(run_dir)]
        if resume
        else ["--config", "embedded_shapes", "--run-dir", str(run_dir), *sets(RUN)]
    )
    return [sys.executable, "-m", "training.train", "--verbose", "0", *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run, and how long a run takes once the data are cached (a second run, which
    must end exactly as the first)."""
    runs, seconds = [], []
    for name in ("reference", "again"):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        start = time.time()
        result = subprocess.run(
            train_command(run_dir), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(run_dir)
        seconds.append(time.time() - start)
    assert_same_run(*runs)
    return runs[0], seconds[1]


def network_values(run_dir):
    reader = tf.train.load_checkpoint(str(RunStore(run_dir).prefix("last")))
    # everything saved (weights, momentum slots, learning rate, step) but TF's own bookkeeping
    keys = sorted(
        k
        for k in reader.get_variable_to_shape_map()
        if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter")
    )
    assert any(k.startswith("network_variables/") for k in keys)
    return {k: reader.get_tensor(k) for k in keys}


def logs_without_times(run_dir):
    """The CSV rows without their wall-time column, and training.txt without its time column."""
    with open(run_dir / "training_log.csv") as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    steps = [line.split()[:-1] for line in (run_dir / "training.txt").read_text().splitlines()]
    return rows, steps


def assert_same_run(a, b, validation_rtol=1e-6):
    """Bitwise the same weights and training logs; validation values within ``validation_rtol``
    (inference sums are not bitwise repeatable from one process to the next here: two uninterrupted
    runs differ by ~1e-7 in val_loss, while their training is bitwise equal)."""
    values_a, values_b = network_values(a), network_values(b)
    assert values_a.keys() == values_b.keys()
    for key in values_a:
        np.testing.assert_array_equal(values_a[key], values_b[key], err_msg=key)
    rows_a, steps_a = logs_without_times(a)
    rows_b, steps_b = logs_without_times(b)
    assert [r["epoch"] for r in rows_b] == [str(e) for e in range(1, EPOCHS + 1)]
    for row_a, row_b in zip(rows_a, rows_b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            if key.startswith("val_") and row_a[key] and validation_rtol:
                assert float(row_b[key]) == pytest.approx(float(row_a[key]), rel=validation_rtol), (
                    key,
                    row_a,
                )
            else:
                assert row_a[key] == row_b[key], (key, row_a, row_b)
    assert steps_a == steps_b
    assert RunStore(a).names() == RunStore(b).names()
    state_a, state_b = (json.loads((d / "state.json").read_text()) for d in (a, b))
    assert state_b["finished"] and {k: state_a[k] for k in state_a if k != "save"} == {
        k: state_b[k] for k in state_b if k != "save"
    }


KILLS = 6


@pytest.mark.slow
def test_kill_loop_at_random_moments(tmp_path, env, reference):
    """SIGKILL at seeded random moments: the first during start-up, the others within a second of the
    process starting work on the run directory (steps, validation, saves); each time the run is
    resumed; it ends as the uninterrupted run."""
    reference_dir, duration = reference
    run_dir = tmp_path / "run"
    steps_file = run_dir / "training.txt"
    rng = np.random.default_rng(19)
    kills, resumes, failures = 0, 0, []
    while True:
        resume = (run_dir / "config.yaml").exists()
        resumes += resume
        touched = steps_file.stat().st_mtime_ns if steps_file.exists() else 0
        process = subprocess.Popen(
            train_command(run_dir, resume),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if kills < KILLS:
            if kills == 0:
                time.sleep(rng.uniform(0.2, 0.6) * duration)
            else:
                while process.poll() is None and not (
                    steps_file.exists() and steps_file.stat().st_mtime_ns != touched
                ):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.0))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.communicate()
                kills += 1
                continue
        out, err = process.communicate(timeout=600)
        if process.returncode != 0:
            failures.append(err[-2000:])
        elif resume:
            assert "resuming from" in out or "starting from the beginning" in out, out
        break
    print(f"kill loop: {kills} kills, {resumes} resumes, {len(failures)} failures")
    assert not failures, failures
    assert kills >= KILLS - 2, "the run ended before it could be killed"
    assert_same_run(reference_dir, run_dir)


@pytest.mark.slow
def test_kill_at_each_stage_of_the_save_sequence(tmp_path, env, reference):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash_driver.py"), str(run_dir), *RUN],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert not summary["failures"], summary
    assert len(summary["kills"]) == 6 and summary["resumes"] == 6 and summary["finished"], summary
    assert_same_run(reference[0], run_dir)


@pytest.mark.slow
def test_damaged_checkpoints_are_named(tmp_path, env, reference):
    """A run whose every save is damaged: --resume and training.test name the files."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    for data in (run_dir / "checkpoints").glob("*.data-*"):
        data.write_bytes(data.read_bytes()[:64])
    result = subprocess.run(
        train_command(run_dir, resume=True), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert "has no save that loads" in result.stderr, result.stderr[-2000:]
    newest = RunStore(run_dir).newest()["save"]
    assert f"{newest}: {newest}.data-00000-of-00001 has 64 bytes instead of" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "training.test", str(run_dir), "--checkpoint", "last"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert f"checkpoint {run_dir / 'checkpoints' / newest} (" in result.stderr, result.stderr[-2000:]
    assert "is damaged" in result.stderr
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint 'last'"):
        RunStore(run_dir).prefix("last")


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "overrides, error",
    [
        (["model.architecture=[simple, resnetb, no_such_block, global_average]"], "no_such_block"),
        (["model.architecture=[simple, resnetb, resnetb_strided, resnetb]"], "global_average"),
        (["dataset.name=ModelNet40", "dataset.path=/nonexistent/modelnet"], "/nonexistent/modelnet"),
    ],
)
def test_failed_starts_leave_the_results_folder_as_it_was(tmp_path, subprocess_cache, overrides, error):
    from training.train import train

    results = tmp_path / "results"
    results.mkdir()
    (results / "earlier_run").mkdir()
    before = listing(results)
    with pytest.raises(Exception, match=error):
        train("embedded_shapes", RUN + overrides, results / "new" / "run", verbose=0)
    assert listing(results) == before


def test_run_dir_checks_come_before_any_work(tmp_path, private_cache):
    from training.train import train

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("dataset: {}\n")
    with pytest.raises(ValueError, match="not empty.*--resume"):
        train("embedded_shapes", RUN, taken, verbose=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        train("embedded_shapes", RUN, blocker / "run", verbose=0)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write"):
            train("embedded_shapes", RUN, locked / "run", verbose=0)
    assert not list(Path(os.environ["KPCONV_TF_CACHE"]).glob("**/*.npz")), "data were read before the checks"


def test_failure_in_the_first_epoch_removes_the_new_run(tmp_path, subprocess_cache, monkeypatch):
    from training import train as train_module

    def broken_fit(*args, **kwargs):
        raise RuntimeError("out of memory in the first step")

    monkeypatch.setattr(train_module.TrainingModel, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_module.train("embedded_shapes", RUN, tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        train_module.train("embedded_shapes", RUN, given, verbose=0)
    assert given.is_dir() and not list(given.iterdir())


@pytest.mark.slow
def test_non_finite_loss_names_only_checkpoints_that_exist(tmp_path, env):
    run_dir = tmp_path / "nan"
    command = train_command(run_dir) + sets(["train.learning_rate=1e30", "train.grad_clip_norm=0"])
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr
    assert "no checkpoint was saved yet" in result.stderr, result.stderr[-2000:]
    assert (run_dir / "training.txt").exists()  # the logs stay for diagnosis
