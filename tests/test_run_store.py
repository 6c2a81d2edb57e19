"""training.run_store: commits survive a crash at every step of the save sequence, damaged saves are
named and skipped, names resolve."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training import run_store
from training.run_store import CheckpointError, RunStore, read_checkpoint


class SimulatedKill(BaseException):
    """The process dies here: no handler runs, the files stay as they are at this instant."""


def make_checkpoint(value):
    weights = tf.Variable(np.full([64, 8], value, np.float32))
    step = tf.Variable(int(value), dtype=tf.int64)
    return tf.train.Checkpoint(weights=weights, step=step), weights, step


def commit_state(store, value, logs, **kwargs):
    """Appends a line per log (as training does between saves), then commits weights = ``value``."""
    for path in logs:
        with open(path, "a") as f:
            f.write(f"line {value}\n")
    checkpoint, _, _ = make_checkpoint(value)
    state = {"epochs": int(value), "steps": int(value) * 10, "best": None}
    return store.commit(checkpoint, state, logs, **kwargs)


def restored_value(store, log=lambda message: None):
    checkpoint, weights, step = make_checkpoint(-1)
    record = store.restore(checkpoint, log=log)
    values = np.unique(weights.numpy())
    assert values.size == 1, "a restore mixed two saves"
    assert int(step.numpy()) == values[0]
    return int(values[0]), record


@pytest.fixture
def run(tmp_path):
    logs = [tmp_path / "training_log.csv", tmp_path / "training.txt"]
    for path in logs:
        path.write_text("header\n")
    return RunStore(tmp_path), logs


def test_commit_restore_names_and_pruning(run):
    store, logs = run
    commit_state(store, 1, logs, best=True)
    commit_state(store, 2, logs, snapshot="epoch_0002")
    commit_state(store, 3, logs)
    commit_state(store, 4, logs)
    saves = sorted(p.stem for p in store.directory.glob("save_*.json"))
    # newest two, the best (1) and the snapshot (2)
    assert saves == ["save_00000010", "save_00000020", "save_00000030", "save_00000040"]
    commit_state(store, 5, logs)
    saves = sorted(p.stem for p in store.directory.glob("save_*.json"))
    assert saves == ["save_00000010", "save_00000020", "save_00000040", "save_00000050"]
    assert not list(store.directory.glob("save_00000030*"))
    assert store.prefix("last").name == "save_00000050"
    assert store.prefix("best").name == "save_00000010"
    assert store.prefix("epoch_0002").name == "save_00000020"
    assert set(store.names()) == {"last", "best", "epoch_0002"}
    with pytest.raises(CheckpointError, match="epoch_0009.*last"):
        store.prefix("epoch_0009")
    assert json.loads((store.run_dir / "state.json").read_text())["save"] == "save_00000050"
    value, record = restored_value(store)
    assert value == 5 and record["state"]["steps"] == 50


def test_resume_cuts_logs_back_to_the_commit(run):
    store, logs = run
    commit_state(store, 1, logs)
    for path in logs:  # steps logged after the save, then a kill
        with open(path, "a") as f:
            f.write("after the save\n")
    value, _ = restored_value(store)
    assert value == 1
    assert [p.read_text() for p in logs] == ["header\nline 1\n"] * 2


@pytest.mark.parametrize(
    "damage", ["truncated data", "empty index", "missing data", "garbage record", "bit flip"]
)
def test_damaged_newest_save_is_named_skipped_and_removed(run, damage):
    store, logs = run
    commit_state(store, 1, logs)
    commit_state(store, 2, logs)
    prefix = store.directory / "save_00000020"
    data = next(store.directory.glob("save_00000020.data-*"))
    if damage == "truncated data":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "empty index":
        Path(f"{prefix}.index").write_bytes(b"")
    elif damage == "missing data":
        data.unlink()
    elif damage == "garbage record":
        Path(f"{prefix}.json").write_text("{not json")
    else:  # same size, one byte changed: only the checksums can tell
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    messages = []
    value, record = restored_value(store, messages.append)
    assert value == 1 and record["save"] == "save_00000010"
    assert any("skipping" in m and "save_00000020" in m for m in messages), messages
    assert any("resuming from" in m and "save_00000010" in m for m in messages), messages
    assert not list(store.directory.glob("save_00000020*"))
    assert [p.read_text() for p in logs] == ["header\nline 1\n"] * 2


def test_no_save_that_loads_lists_every_save(run):
    store, logs = run
    commit_state(store, 1, logs)
    for data in store.directory.glob("*.data-*"):
        data.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no save that loads\n  save_00000010: .*bytes"):
        restored_value(store)


def test_read_checkpoint_names_the_files(tmp_path):
    checkpoint, _, _ = make_checkpoint(3)
    prefix = tmp_path / "ckpt"
    checkpoint.write(str(prefix))
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(make_checkpoint(0)[0], tmp_path / "missing" / "last")
    Path(f"{prefix}.index").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"ckpt \(ckpt.data-00000-of-00001, ckpt.index\) is damaged"):
        read_checkpoint(make_checkpoint(0)[0], prefix)
    other = tf.train.Checkpoint(something_else=tf.Variable(1.0))
    checkpoint.write(str(prefix))
    with pytest.raises(CheckpointError, match="does not belong"):
        read_checkpoint(other, prefix)


SAVE_STAGES = 40  # more than the events of one commit


def test_a_crash_at_every_step_of_a_save_leaves_the_old_or_the_new_commit(tmp_path, monkeypatch):
    """Every file operation of a commit in turn is the last one the process makes; the store then
    restores exactly the previous commit or the new one, and the next commit works."""
    real_replace, real_fsync, real_unlink = os.replace, os.fsync, Path.unlink
    real_write = tf.train.Checkpoint.write
    outcomes = set()
    for stage in range(SAVE_STAGES):
        directory = tmp_path / f"stage_{stage}"
        directory.mkdir()
        logs = [directory / "training_log.csv", directory / "training.txt"]
        for path in logs:
            path.write_text("header\n")
        store = RunStore(directory)
        commit_state(store, 1, logs)
        events = [0]

        def event():
            events[0] += 1
            if events[0] == stage + 1:
                raise SimulatedKill

        def write(self, prefix, *args, **kwargs):
            event()
            result = real_write(self, prefix, *args, **kwargs)
            event()
            return result

        monkeypatch.setattr(os, "replace", lambda *a, **k: (event(), real_replace(*a, **k))[1])
        monkeypatch.setattr(os, "fsync", lambda *a, **k: (event(), real_fsync(*a, **k))[1])
        monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (event(), real_unlink(self, *a, **k))[1])
        monkeypatch.setattr(tf.train.Checkpoint, "write", write)
        try:
            commit_state(store, 2, logs)
            crashed = False
        except SimulatedKill:
            crashed = True
        finally:
            monkeypatch.undo()
        value, _ = restored_value(store)
        expected_logs = "header\nline 1\n" if value == 1 else "header\nline 1\nline 2\n"
        assert [p.read_text() for p in logs] == [expected_logs] * 2, (stage, value)
        outcomes.add(value)
        commit_state(store, 3, logs)
        assert restored_value(store)[0] == 3
        if not crashed:
            break
    else:
        pytest.fail(f"a commit makes more than {SAVE_STAGES} file operations")
    assert outcomes == {1, 2}, "the stages should cover both sides of the commit point"
    assert stage > 5, f"only {stage} file operations in a commit: the injection misses some"


def test_leftovers_of_an_interrupted_save_are_ignored_and_removed(run):
    store, logs = run
    commit_state(store, 1, logs)
    (store.directory / "save_00000020_temp").mkdir()
    (store.directory / "save_00000020_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (store.directory / "save_00000020.index").write_bytes(b"partial")
    (store.directory / ".save_00000020.json.123.tmp").write_text("{")
    assert restored_value(store)[0] == 1
    commit_state(store, 3, logs)
    names = sorted(p.name for p in store.directory.iterdir())
    assert all(n.startswith(("save_00000010", "save_00000030")) for n in names), names


def test_prefix_resolves_runs_written_before_records(tmp_path):
    checkpoint, _, _ = make_checkpoint(7)
    (tmp_path / "checkpoints").mkdir()
    checkpoint.write(str(tmp_path / "checkpoints" / "last"))
    (tmp_path / "state.json").write_text(json.dumps({"epochs": 7, "steps": 70}))
    store = RunStore(tmp_path)
    assert store.prefix("last") == tmp_path / "checkpoints" / "last"
    value, record = restored_value(store)
    assert value == 7 and record["state"]["steps"] == 70
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json is unreadable"):
        restored_value(store)


def test_write_json_atomically_leaves_no_temporary(tmp_path):
    run_store.write_json_atomically(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        # what SaveV2 raises on a full disk
        tf.errors.ResourceExhaustedError(
            None,
            None,
            "{{function_node __wrapped__SaveV2_dtypes_3_device_/job:localhost/replica:0/task:0/device:CPU:0}}"
            " save_00000020_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on"
            " device [Op:SaveV2]",
        ),
    ],
)
def test_a_failed_commit_names_the_save_and_keeps_the_previous_one(run, monkeypatch, failure):
    """The checkpoint write fails half way (TF raises its own error, an OSError comes from the
    fsyncs and renames): CommitError naming the save and the cause; the files of the failed save are
    removed and the previous commit is the one that restores."""
    store, logs = run
    commit_state(store, 1, logs)
    real_write = tf.train.Checkpoint.write

    def write(self, prefix, *args, **kwargs):
        real_write(self, prefix, *args, **kwargs)  # files written, then the disk is full
        raise failure

    monkeypatch.setattr(tf.train.Checkpoint, "write", write)
    with pytest.raises(run_store.CommitError) as error:
        commit_state(store, 2, logs)
    monkeypatch.undo()
    message = str(error.value)
    assert f"could not commit the save {store.directory / 'save_00000020'}: " in message
    assert "No space left on device" in message and "function_node" not in message
    assert f"the last good checkpoint is {store.directory / 'save_00000010'}" in message
    assert f"--resume {store.run_dir}" in message
    assert not list(store.directory.glob("save_00000020*"))
    assert restored_value(store)[0] == 1
