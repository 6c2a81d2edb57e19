"""What training.train checks about a run directory before it trains or writes anything (a resume with
another config, checkpoints of another network, a directory it cannot write, a disk without room for
the saves), and a save that cannot be committed during training (disk full): the error names the path
and the cause, and the run directory is left as it was or, after a failed commit, resumable."""

import collections
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from test_crash_safety import RUN
from tiny_runs import train_tiny

from kpconv_tf.config import ConfigError
from training import run_store
from training import train as train_module
from training.run_store import CheckpointError, CommitError, RunStore
from training.train import RunDirError, train

ROOT = Path(__file__).resolve().parents[1]
# Two epochs of two steps: a commit per epoch, the epoch_0002 snapshot.
TWO_EPOCHS = [item for item in RUN if not item.startswith("train.max_epoch=")] + ["train.max_epoch=2"]

pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, module_cache):
    return train_tiny(tmp_path_factory, "embedded_shapes", TWO_EPOCHS)


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A copy of the tiny run, with a step logged after its last save (as a kill leaves it): a resume
    that went ahead would cut it off."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    with open(copy / "training.txt", "a") as f:
        f.write("2 5 0.000 0.000 0.000 1.000\n")
    return copy


def contents(folder):
    """Every path under ``folder`` with its mode and, for files, a hash of the bytes."""
    found = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(folder))] = (path.stat().st_mode, digest)
    return found


def test_resume_refuses_overrides_of_the_network_or_the_data(run_dir):
    before = contents(run_dir)
    for overrides, key in (
        (["model.first_features_dim=16"], "model.first_features_dim = 16 asked, 8 in the run"),
        (["dataset.extra={train_per_class: 7, seed: 1}"], "dataset.extra = "),
        (["train.learning_rate=0.1", "train.max_epoch=5"], "train.learning_rate = 0.1 asked, 0.002"),
    ):
        with pytest.raises(ConfigError) as error:
            train(resume=run_dir, overrides=overrides, verbose=0)
        message = str(error.value)
        assert f"--resume {run_dir}: --set " in message and str(run_dir / "config.yaml") in message
        assert key in message and "train.max_epoch =" not in message, message
    assert contents(run_dir) == before


def test_resume_refuses_a_config_file_that_differs_from_the_run(run_dir, tmp_path):
    config_file = tmp_path / "wider.yaml"
    config_file.write_text(
        (run_dir / "config.yaml").read_text().replace("first_features_dim: 8", "first_features_dim: 12")
    )
    before = contents(run_dir)
    with pytest.raises(ConfigError) as error:
        train(config_file, ["model.kp_extent=1.5"], resume=run_dir, verbose=0)
    message = str(error.value)
    assert (
        f"--config {config_file} with its --set overrides differs from {run_dir / 'config.yaml'}" in message
    )
    assert "model.first_features_dim = 12 asked, 8 in the run" in message
    assert "model.kp_extent = 1.5 asked, 1.0 in the run" in message
    assert contents(run_dir) == before


def test_resume_takes_run_time_keys_from_the_config_and_overrides(run_dir):
    """The command line of the run again, with --resume and a longer max_epoch: the run goes on."""
    longer = [item for item in TWO_EPOCHS if not item.startswith("train.max_epoch=")] + ["train.max_epoch=3"]
    train("embedded_shapes", longer, resume=run_dir, verbose=0)
    state = RunStore(run_dir).newest()["state"]
    assert state["epochs"] == 3 and state["steps"] == 6
    assert "max_epoch: 2" in (run_dir / "config.yaml").read_text()  # the run's config is not rewritten
    lines = (run_dir / "training.txt").read_text().splitlines()
    assert len(lines) == 1 + 6 and "2 5 0.000 0.000 0.000 1.000" not in lines  # cut back, then steps 5-6


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            ("first_features_dim: 8", "first_features_dim: 16"),
            "conv/weights is [15, 4, 16] in the config, [15, 4, 8]",
        ),
        (
            (
                "[simple, resnetb, resnetb_strided, resnetb, global_average]",
                "[simple, resnetb, global_average]",
            ),
            "the config builds 34 network variables, the checkpoint holds 71",
        ),
        (("optimizer: original_momentum", "optimizer: adam"), "optimizer variables, the checkpoint holds 42"),
    ],
)
def test_resume_refuses_checkpoints_of_another_network(run_dir, edit, problem):
    config_path = run_dir / "config.yaml"
    text = config_path.read_text()
    assert edit[0] in text
    config_path.write_text(text.replace(*edit))
    before = contents(run_dir)
    with pytest.raises(CheckpointError) as error:
        train(resume=run_dir, verbose=0)
    message = str(error.value)
    newest = run_dir / "checkpoints" / RunStore(run_dir).newest()["save"]
    assert f"--resume {run_dir}: the config and the checkpoints differ: {config_path}" in message
    assert f"{newest} ({newest.name}.data-00000-of-00001, {newest.name}.index" in message
    assert problem in message, message
    assert contents(run_dir) == before  # no log cut back, no save removed, nothing new


def test_resume_refuses_data_that_now_give_other_classes(run_dir):
    """What the data determine (the classes) against what the run recorded; here config.yaml says 4
    classes while the data still give 3 (as if a class had been removed from dataset.path)."""
    config_path = run_dir / "config.yaml"
    config_path.write_text(config_path.read_text().replace("num_classes: 3", "num_classes: 4"))
    before = contents(run_dir)
    with pytest.raises(ConfigError) as error:
        train(resume=run_dir, verbose=0)
    message = str(error.value)
    assert f"--resume {run_dir}: the data at dataset.path" in message and str(config_path) in message
    assert "dataset.num_classes = 3 now, 4 in the run" in message, message
    assert contents(run_dir) == before


def _without_write_permission(command):
    """``command`` run so that the permission bits bind: as root, without CAP_DAC_OVERRIDE (setpriv
    takes it out of the bounding set, so the program runs without it)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no honest way to make a directory unwritable")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *command]


@pytest.mark.slow
@pytest.mark.parametrize("locked", [".", "checkpoints"])
def test_resume_refuses_a_run_dir_it_cannot_write(run_dir, locked):
    folder = run_dir / locked  # the run directory itself for "."
    before = contents(run_dir)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        command = [sys.executable, "-m", "training.train", "--resume", str(run_dir), "--verbose", "0"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(
            _without_write_permission(command), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    finally:
        folder.chmod(mode)
    assert result.returncode != 0
    expected = f"RunDirError: --resume {run_dir}: cannot write in {folder} (Permission denied)"
    assert expected in result.stderr, result.stderr[-2000:]
    assert contents(run_dir) == before


Usage = collections.namedtuple("Usage", "total used free")


def _full_disk(monkeypatch, free):
    real = shutil.disk_usage
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        usage = real(path)
        return Usage(usage.total, usage.total - free, free)

    monkeypatch.setattr(train_module.shutil, "disk_usage", disk_usage)
    return asked


def test_a_full_disk_is_refused_before_a_new_run_starts(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    asked = _full_disk(monkeypatch, 100_000)
    with pytest.raises(RunDirError) as error:
        train("embedded_shapes", TWO_EPOCHS, results / "new" / "run", verbose=0)
    message = str(error.value)
    assert asked == [results]
    new_run = results / "new" / "run"
    assert (
        f"{new_run}: not enough free space: 100000 bytes (0.1 MiB) free on the disk of {results}," in message
    )
    # two commits + the best + one being written + the epoch_0002 snapshot, and the logs
    assert "the run needs about " in message and "5 saves of ~" in message, message
    assert list(results.iterdir()) == []


def test_a_full_disk_is_refused_before_a_resume(run_dir, monkeypatch):
    before = contents(run_dir)
    _full_disk(monkeypatch, 2_000)
    with pytest.raises(RunDirError) as error:
        train(resume=run_dir, overrides=["train.max_epoch=4"], verbose=0)
    message = str(error.value)
    assert f"{run_dir}: not enough free space: 2000 bytes" in message and f"disk of {run_dir}," in message
    # epochs 3-4: the epoch_0004 snapshot to come; the two saves on disk are replaced by later ones
    assert "5 saves of ~" in message and "1 epoch snapshots to come" in message, message
    assert "bytes of saves on disk that later commits replace" in message
    assert contents(run_dir) == before


def test_the_space_estimate_covers_a_save(tiny_run):
    """``save_bytes`` of the run's network against the files of one of its commits."""
    from kpconv_tf.config import Config
    from kpconv_tf.models import build_network
    from training.trainer import TrainingModel, make_optimizer

    config = Config.from_yaml(tiny_run / "config.yaml")
    model = TrainingModel(build_network(config), config)
    model.compile(optimizer=make_optimizer(config, config.train.epoch_steps))
    save = RunStore(tiny_run).newest()["save"]
    on_disk = sum(p.stat().st_size for p in (tiny_run / "checkpoints").glob(f"{save}*"))
    estimate = train_module.save_bytes(model)
    assert on_disk <= estimate <= 1.25 * on_disk, (estimate, on_disk)


def _fail_second(real, exception, counted=lambda *args: True):
    """``real``, raising ``exception`` instead at the second call that ``counted`` selects."""
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += counted(*args)
        if calls[0] == 2 and counted(*args):
            raise exception
        return real(*args, **kwargs)

    return failing


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint data", "record"])
def test_a_commit_that_fails_stops_the_run_and_resume_continues(tmp_path, monkeypatch, where):
    run_dir = tmp_path / "run"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "checkpoint data":
        monkeypatch.setattr(tf.train.Checkpoint, "write", _fail_second(tf.train.Checkpoint.write, full))
    else:
        # the second commit's record (state.json is written through the same function)
        record = _fail_second(
            run_store.write_json_atomically, full, lambda path, *_: path.name.startswith("save_")
        )
        monkeypatch.setattr(run_store, "write_json_atomically", record)
    with pytest.raises(CommitError) as error:
        train("embedded_shapes", TWO_EPOCHS, run_dir, verbose=0)
    message = str(error.value)
    failed = run_dir / "checkpoints" / "save_00000004"
    assert f"could not commit the save {failed}: [Errno 28] No space left on device" in message, message
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'save_00000002'}" in message
    assert f"--resume {run_dir}" in message
    monkeypatch.undo()
    # the failed save left nothing; the previous commit is the run's newest and loads
    assert sorted(p.name.split(".")[0] for p in (run_dir / "checkpoints").iterdir()) == ["save_00000002"] * 3
    train(resume=run_dir, verbose=0)
    state = RunStore(run_dir).newest()["state"]
    assert state["epochs"] == 2 and state["steps"] == 4
    assert [line.split()[:2] for line in (run_dir / "training.txt").read_text().splitlines()[1:]] == [
        ["0", "1"],
        ["0", "2"],
        ["1", "3"],
        ["1", "4"],
    ]
    assert len((run_dir / "training_log.csv").read_text().splitlines()) == 1 + 2
