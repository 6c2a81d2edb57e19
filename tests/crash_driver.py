"""Test driver: trains a run to its end while it dies once at each stage of the save sequence.

    python tests/crash_driver.py RUN_DIR SECTION.KEY=VALUE ...

Each stage is a place in ``training.train`` / ``training.run_store`` where a process can die during an
epoch-end save; the driver raises ``SimulatedKill`` (a BaseException no handler catches) there, in the
first save of one training call, then resumes with ``train(resume=...)`` as a user would after a kill.
The files are then as a kill at that instant leaves them. Prints a JSON summary.
"""

import json
import os
import sys
from pathlib import Path

import tensorflow as tf

from training import run_store
from training import train as train_module
from training.run_store import RunStore


class SimulatedKill(BaseException):
    pass


ARMED = {"stage": None}


def _fire(stage):
    if ARMED["stage"] == stage:
        ARMED["stage"] = None
        raise SimulatedKill(stage)


def install():
    real_append = train_module.append_csv
    real_write = tf.train.Checkpoint.write
    real_json = run_store.write_json_atomically
    real_replace = os.replace
    real_prune = RunStore.prune
    real_commit = RunStore.commit
    in_commit = {"on": False}

    def append_csv(path, row):
        real_append(path, row)
        _fire("after the log row, before the checkpoint")

    def write(self, prefix, *args, **kwargs):
        result = real_write(self, prefix, *args, **kwargs)
        if ARMED["stage"] == "in the checkpoint write":
            for data in Path(prefix).parent.glob(f"{Path(prefix).name}.data-*"):
                data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # torn
        _fire("in the checkpoint write")
        return result

    def write_json(path, value):
        if Path(path).name.startswith("save_"):
            _fire("checkpoint written, before its record")
        elif Path(path).name == "state.json":
            _fire("record committed, before state.json")
        real_json(path, value)

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name.startswith("save_") and Path(dst).suffix == ".json":
            _fire("record written, before its rename")
        return real_replace(src, dst, *args, **kwargs)

    def commit(self, *args, **kwargs):
        in_commit["on"] = True
        try:
            return real_commit(self, *args, **kwargs)
        finally:
            in_commit["on"] = False

    def prune(self):
        if in_commit["on"]:
            _fire("committed, before pruning")
        real_prune(self)

    train_module.append_csv = append_csv
    tf.train.Checkpoint.write = write
    run_store.write_json_atomically = write_json
    train_module.write_json_atomically = write_json
    os.replace = replace
    RunStore.prune = prune
    RunStore.commit = commit


STAGES = [
    "after the log row, before the checkpoint",
    "in the checkpoint write",
    "checkpoint written, before its record",
    "record written, before its rename",
    "record committed, before state.json",
    "committed, before pruning",
]


def main(run_dir, overrides):
    install()
    summary = {"kills": [], "resumes": 0, "failures": []}
    resume = None
    for stage in STAGES + [None]:
        ARMED["stage"] = stage
        try:
            if resume:
                summary["resumes"] += 1
                train_module.train(resume=run_dir, verbose=0)
            else:
                train_module.train("embedded_shapes", overrides, run_dir, verbose=0)
            if stage is not None and ARMED["stage"] is not None:
                summary["failures"].append(f"stage {stage!r} was never reached")
        except SimulatedKill as kill:
            summary["kills"].append(str(kill))
        except Exception as err:  # noqa: BLE001 (reported to the test)
            summary["failures"].append(f"{stage}: {type(err).__name__}: {err}")
            break
        resume = run_dir
    state = json.loads((Path(run_dir) / "state.json").read_text())
    summary["finished"] = bool(state.get("finished"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
