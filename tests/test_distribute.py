"""Training under tf.distribute: 2 replicas (logical CPU devices) against one device fed the union
of their batches, and the strategy choice."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training.distribute import cluster_resolver, is_chief, make_strategy, num_workers

TESTS = Path(__file__).resolve().parent
# float32 sums in another order (gradients all-reduced, E[x^2] - m^2 variances), 3 steps
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 2e-5, 2e-5


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    out = tmp_path_factory.mktemp("distribute") / "results.json"
    env = dict(os.environ, PYTHONPATH=f"{TESTS.parent}{os.pathsep}{TESTS}", TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, str(TESTS / "distribute_equivalence.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


SYNCHRONIZED = [
    "classification_paper_sgd",
    "classification_original",
    "segmentation_paper_sgd",
    "segmentation_original",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SYNCHRONIZED)
def test_two_replicas_train_as_one_device_on_the_union(equivalence, case):
    result = equivalence[case]
    sizes = np.array(result["replica_points"])
    assert (sizes[:, 0] > 2.5 * sizes[:, 1]).all(), sizes  # replicas of very different sizes
    np.testing.assert_allclose(result["mirrored_losses"], result["single_losses"], rtol=LOSS_TOLERANCE)
    assert result["weights_moved"] > 1e-3  # the steps did change the weights
    assert result["weight_error"] < WEIGHT_TOLERANCE, result["weight_error"]
    assert result["replica_spread"] == 0.0  # every replica holds the same variables


@pytest.mark.slow
def test_per_replica_batch_norm_normalises_each_replica_by_its_own_batch(equivalence):
    # What differs from the union: each replica normalises with the statistics of its own batch,
    # so the losses already differ at the first step (same weights) and the weights after it; the
    # moving statistics are averaged over the replicas, so all replicas still hold the same values.
    result = equivalence["segmentation_per_replica_norm"]
    first_mirrored, first_single = result["mirrored_losses"][0], result["single_losses"][0]
    assert abs(first_mirrored - first_single) > 100 * LOSS_TOLERANCE * abs(first_single)
    assert result["weight_error"] > 100 * WEIGHT_TOLERANCE
    assert np.isfinite(result["mirrored_losses"]).all()
    assert result["replica_spread"] == 0.0


def test_default_strategy_is_one_device_and_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = make_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert is_chief(strategy) and num_workers(strategy) == 1
    with pytest.raises(ValueError, match="train.strategy must be one of"):
        make_strategy("horovod")


def test_multiworker_without_a_cluster_says_what_to_set(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="set TF_CONFIG on every worker"):
        cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON"):
        cluster_resolver()
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}})
    )
    with pytest.raises(ValueError, match="task index 3 is not one of the 1 workers"):
        cluster_resolver()


def test_chief_is_worker_zero_unless_the_cluster_has_a_chief(monkeypatch):
    import tensorflow as tf

    class Strategy:
        def __init__(self, task_type, task_id, cluster):
            self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id
            )

    workers = {"worker": ["a:1", "b:1"]}
    assert is_chief(Strategy("worker", 0, workers)) and not is_chief(Strategy("worker", 1, workers))
    assert num_workers(Strategy("worker", 1, workers)) == 2
    with_chief = {"chief": ["c:1"], **workers}
    assert is_chief(Strategy("chief", 0, with_chief)) and not is_chief(Strategy("worker", 0, with_chief))
    assert num_workers(Strategy("worker", 0, with_chief)) == 3


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Workers:
    """Worker processes of one multi-worker run on 127.0.0.1 (tests/multiworker_driver.py)."""

    def __init__(self, tmp_path, args):
        self.tmp_path, self.args = tmp_path, args
        self.cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        self.processes, self.starts = {}, 0

    def start(self, index, *extra):
        self.starts += 1
        config = {"cluster": self.cluster, "task": {"type": "worker", "index": index}}
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(config),
            PYTHONPATH=f"{TESTS.parent}{os.pathsep}{TESTS}",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        log = open(self.tmp_path / f"worker{index}_{self.starts}.log", "w")  # noqa: SIM115
        command = [sys.executable, str(TESTS / "multiworker_driver.py"), str(self.weights(index)), "--"]
        self.processes[index] = subprocess.Popen(
            [*command, *self.args, *extra], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def weights(self, index):
        return self.tmp_path / f"weights{index}.npz"

    def wait(self, index, timeout):
        try:
            return self.processes[index].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp_path.glob("worker*.log")))
            pytest.fail(f"worker {index} still running after {timeout} s\n{logs}")

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_multiworker_run_survives_a_killed_worker(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "embedded_shapes",
        "--set",
        "dataset.extra={train_per_class: 4, test_per_class: 1, seed: 0}",
        "--set",
        "dataset.validation_size=2",
        "--set",
        "train.epoch_steps=4",
        "--set",
        "train.max_epoch=4",
        "--set",
        "train.save_freq=2",
        "--strategy",
        "multiworker",
        "--verbose",
        "2",
    ]
    workers = Workers(tmp_path, args)
    try:
        for index in (0, 1):
            workers.start(index, "--run-dir", str(run_dir))
        # kill worker 1 once the chief has committed step 6 (mid epoch 2)
        deadline = time.time() + 600
        while not (run_dir / "checkpoints" / "save_00000006.json").exists():
            assert time.time() < deadline and workers.processes[0].poll() is None, "no commit of step 6"
            time.sleep(0.2)
        workers.processes[1].send_signal(signal.SIGKILL)
        workers.processes[1].wait()
        # the survivor learns of the dead peer from the cluster's heartbeats and stops
        assert workers.wait(0, timeout=300) != 0
        for index in (0, 1):  # what a cluster manager does: restart the workers, here with --resume
            workers.start(index, "--resume", str(run_dir))
        assert workers.wait(0, timeout=600) == 0
        assert workers.wait(1, timeout=120) == 0
    finally:
        workers.stop()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["steps"] == 16 and state["epochs"] == 4
    first, second = np.load(workers.weights(0)), np.load(workers.weights(1))
    assert first.files == second.files and len(first.files) > 10
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    # steps after the last commit were redone once: every step is logged exactly once
    steps = [int(line.split()[1]) for line in (run_dir / "training.txt").read_text().splitlines()[1:]]
    assert steps == list(range(1, 17)), steps
    rows = (run_dir / "training_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]


MIRRORED_CLI = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from training.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_mirrored_training_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "embedded_rooms",
        "--run-dir",
        str(run_dir),
        "--strategy",
        "mirrored",
        "--verbose",
        "0",
    ]
    args += [
        "--set",
        "train.epoch_steps=3",
        "--set",
        "train.max_epoch=2",
        "--set",
        "dataset.validation_size=3",
    ]
    args += ["--set", "train.save_freq=2"]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_CLI, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["steps"] == 6
    rows = (run_dir / "training_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3
    for row in rows[1:]:
        values = dict(zip(header, row.split(",")))
        assert 0.0 <= float(values["val_mean_iou"]) <= 1.0 and float(values["loss"]) > 0
    steps = [int(line.split()[1]) for line in (run_dir / "training.txt").read_text().splitlines()[1:]]
    assert steps == list(range(1, 7))
    # a commit inside epoch 2 (save_freq) was kept as the previous commit
    records = {p.name for p in (run_dir / "checkpoints").glob("save_*.json")}
    assert {"save_00000004.json", "save_00000006.json"} <= records, records
