"""Trains KP-CNN / KP-FCNN with ``model.fit``.

    python -m training.train --config FILE [--set k=v ...] [--run-dir DIR] [--max-minutes M]
                             [--resume DIR] [--finetune RUN_DIR_OR_CHECKPOINT]

A run directory holds ``config.yaml`` (the full tree used), ``training_log.csv`` (one row per epoch),
``training.txt`` (the original's per-step columns), ``tensorboard/`` scalars, ``checkpoints/`` (one
committed save per epoch, see ``training.run_store``: weights, momentum slots, learning rate, step
count, best score and log positions; ``last``, ``best`` and the ``epoch_NNNN`` snapshots every
``snapshot_gap`` epochs resolve to saves) and ``state.json`` (a copy of the newest commit).
``--resume`` continues from the newest save that loads, with the same data stream (the pipeline
rebuilds the batches from the step count) and the logs cut back to that save, so a run killed at any
moment ends with the weights and logs an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.models import KPCNN, KPFCNN
from training.config import add_override_argument, load_config
from training.datasets import configure, load_dataset
from training.pipeline import Pipeline
from training.run_store import (
    CheckpointError,
    RunStore,
    latest_description,
    read_checkpoint,
    write_json_atomically,
)
from training.trainer import TrainingModel, make_optimizer

LOG_COLUMNS = (
    "epoch",
    "steps",
    "loss",
    "output_loss",
    "regularization_loss",
    "offsets_loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_mean_iou",
    "learning_rate",
    "seconds",
)


# A warning is printed when the per-step offsets loss grows this much over this many steps.
OFFSETS_GROWTH, OFFSETS_GROWTH_STEPS = 10.0, 50


class TrainingInterrupted(RuntimeError):
    """Training stopped on a non-finite loss; the last good checkpoint is kept."""


def build_network(config: Config):
    """KPCNN for classification, KPFCNN otherwise; variables created."""
    from kpconv_tf.models import dummy_inputs

    network = KPCNN(config) if config.model.network_model == "classification" else KPFCNN(config)
    network(dummy_inputs(config), training=False)
    return network


def checkpoint_for(training_model):
    """Checkpoint of everything a run needs to continue: every network variable (weights and
    batch-norm statistics, listed explicitly because the blocks sit in Python lists that TF's object
    graph does not follow) and, once compiled, the optimizer's (slots, learning rate, step count)."""
    optimizer = getattr(training_model, "optimizer", None)
    return tf.train.Checkpoint(
        network_variables=list(training_model.network.variables),
        optimizer_variables=list(optimizer.variables) if optimizer is not None else [],
    )


class RunLogger(keras.callbacks.Callback):
    """Per-step ``training.txt`` (original columns), TensorBoard scalars, the time budget and the
    non-finite-loss stop; the epoch loop in ``train`` does the CSV, decay and checkpoints."""

    def __init__(self, run_dir: Path, state: dict, deadline=None):
        super().__init__()
        self.run_dir = run_dir
        self.state = state
        self.deadline = deadline
        self.writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
        self.epoch_start = time.time()
        self.stopped_for_time = False
        self.nan = False
        self.offsets_history = collections.deque(maxlen=OFFSETS_GROWTH_STEPS + 1)
        # Line-buffered so that a killed run keeps its steps; closed by on_train_end.
        self.steps_text = open(run_dir / "training.txt", "a", buffering=1)  # noqa: SIM115
        if self.steps_text.tell() == 0:
            self.steps_text.write("epochs steps out_loss offset_loss train_accuracy time\n")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        loss = float(logs.get("loss", 0.0))
        self.state["steps"] += 1
        self._watch_offsets(batch, float(logs.get("offsets_loss", 0.0)))
        if not math.isfinite(loss):
            self.nan = True
            self.model.stop_training = True
            return
        self.steps_text.write(
            f"{self.state['epochs']} {self.state['steps']} {logs.get('output_loss', 0.0):.3f} "
            f"{logs.get('offsets_loss', 0.0):.3f} {logs.get('accuracy', 0.0):.3f} "
            f"{time.time() - self.state['start_time']:.3f}\n"
        )
        if self.deadline is not None and time.time() > self.deadline:
            self.stopped_for_time = True
            self.model.stop_training = True

    def _watch_offsets(self, batch, running_mean):
        """Warns when the step's offsets loss is ``OFFSETS_GROWTH``x what it was 50 steps before
        (deformable kernels diverging). Keras logs epoch running means; the step's own value is
        recovered from two consecutive means."""
        if batch == 0:
            self._previous_mean = 0.0
        value = (batch + 1) * running_mean - batch * self._previous_mean
        self._previous_mean = running_mean
        self.offsets_history.append(value)
        first = self.offsets_history[0]
        if (
            len(self.offsets_history) > OFFSETS_GROWTH_STEPS
            and first > 1e-4
            and value > OFFSETS_GROWTH * first
        ):
            print(
                f"\nwarning: the offsets loss grew from {first:.3g} to {value:.3g} over the last "
                f"{OFFSETS_GROWTH_STEPS} steps (step {self.state['steps']}): the deformable kernel points "
                "are drifting away from the points (see offset_norm_* / lost_share_* in training_log.csv); "
                'the stable definition is in README, "Deformable KPConv"',
                file=sys.stderr,
                flush=True,
            )
            self.offsets_history.clear()

    def write_scalars(self, values: dict, step: int):
        with self.writer.as_default():
            for name, value in values.items():
                if value is not None and name not in ("epoch", "steps"):
                    tf.summary.scalar(name, float(value), step=step)
        self.writer.flush()

    def close(self):
        self.steps_text.close()
        self.writer.close()


DEFORMATION_PREFIXES = ("offset_norm_", "lost_share_", "val_offset_norm_", "val_lost_share_")


def append_csv(path: Path, row: dict):
    """Appends one epoch row: the ``LOG_COLUMNS`` and the deformation diagnostics of the run."""
    new = not path.exists() or path.stat().st_size == 0  # a resume may have cut it back to nothing
    columns = list(LOG_COLUMNS) + [k for k in row if k.startswith(DEFORMATION_PREFIXES)]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


HEAD_LAYERS = ("softmax", "classifier", "multi_weights")


def finetune_from(network, source, skip_head=True):
    """Copies the weights of the run directory ``source`` (its ``checkpoints/best``, else ``last``)
    into ``network`` wherever variable paths and shapes agree; the classifier is skipped when
    ``skip_head`` (new classes). Returns the copied variable paths."""
    source = Path(source)
    if not (source / "config.yaml").exists():
        raise FileNotFoundError(f"--finetune: {source} is not a run directory (no config.yaml)")
    store = RunStore(source)
    try:
        prefix = store.prefix("best")
    except CheckpointError:
        prefix = store.prefix("last")
    source_config = Config.from_yaml(source / "config.yaml")
    source_model = TrainingModel(build_network(source_config), source_config)
    read_checkpoint(checkpoint_for(source_model), prefix, exact=False)
    stored = {v.path: v for v in source_model.network.variables}
    copied = []
    for variable in network.variables:
        if skip_head and any(h in variable.path for h in HEAD_LAYERS):
            continue
        match = stored.get(variable.path)
        if match is not None and tuple(match.shape) == tuple(variable.shape):
            variable.assign(match)
            copied.append(variable.path)
    return copied


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file or name in training/configs (not needed with --resume)")
    add_override_argument(parser)
    parser.add_argument("--run-dir", help="output directory (default results/<dataset>_<time>)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this wall time")
    parser.add_argument("--resume", help="run directory to continue")
    parser.add_argument("--finetune", help="run directory or checkpoint prefix to start from (head skipped)")
    parser.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs in total")
    parser.add_argument(
        "--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 line/epoch"
    )
    args = parser.parse_args(argv)
    run_dir = train(
        args.config,
        args.overrides,
        args.run_dir,
        args.max_minutes,
        args.resume,
        args.finetune,
        args.max_epochs,
        args.verbose,
    )
    print(f"run directory: {run_dir}")
    return 0


def train(
    config_path=None,
    overrides=(),
    run_dir=None,
    max_minutes=None,
    resume=None,
    finetune=None,
    max_epochs=None,
    verbose=1,
) -> Path:
    """Runs (or resumes) a training; returns the run directory.

    Everything that can fail before training (config, architecture, data, calibration, the run
    directory being writable) is checked before anything is written; a new run directory made for a
    start that fails anyway is removed.
    """
    start_time = time.time()
    if os.environ.get("KPCONV_TF_DETERMINISTIC") == "1":
        tf.config.experimental.enable_op_determinism()  # bitwise-repeatable runs (tests of --resume)
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"--resume: {run_dir}/config.yaml not found (not a run directory)")
        config = Config.from_yaml(run_dir / "config.yaml", list(overrides))
    else:
        if not config_path:
            raise ValueError("--config is required unless --resume is given")
        config = load_config(config_path, list(overrides))
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(run_dir or Path("results") / f"{config.dataset.name}_{stamp}")
        check_new_run_dir(run_dir)
    run_dir = Path(run_dir)
    keras.utils.set_random_seed(config.train.seed)
    dataset = load_dataset(config)
    configure(config, dataset)
    network = build_network(config)
    pipeline = Pipeline(dataset, config)
    calibration = {"batch_limit": pipeline.batch_limit, "neighbor_limits": pipeline.neighbor_limits}
    model = TrainingModel(network, config)
    model.compile(optimizer=make_optimizer(config, config.train.epoch_steps or _steps_per_pass(pipeline)))
    store = RunStore(run_dir)
    state = {"epochs": 0, "steps": 0, "best": None, "best_epoch": None, "finished": False}
    if resume:
        state.update(store.restore(checkpoint_for(model))["state"])
        if int(model.optimizer.iterations.numpy()) != state["steps"]:
            raise CheckpointError(
                f"{run_dir}: checkpoint step {int(model.optimizer.iterations.numpy())} "
                f"differs from its record's steps {state['steps']}"
            )
    else:
        if finetune:
            copied = finetune_from(network, finetune)
            print(f"fine-tuning: {len(copied)} variables copied from {finetune}")
        cleanup = _create_run_dir(run_dir, config, calibration)
    try:
        if (
            finetune and not resume
        ):  # a resume before the first epoch's save must start from these weights too
            store.commit(checkpoint_for(model), state)
        _train_epochs(model, pipeline, config, store, state, start_time, max_minutes, max_epochs, verbose)
    except TrainingInterrupted:
        raise  # the run directory keeps its logs for diagnosis
    except (Exception, KeyboardInterrupt):
        if not resume and store.newest() is None:
            cleanup()  # nothing was committed: the start failed
        raise
    return run_dir


def _train_epochs(model, pipeline, config, store, state, start_time, max_minutes, max_epochs, verbose):
    """The epoch loop: one ``fit`` per epoch, a commit at the end of each and at the time budget."""
    run_dir = store.run_dir
    state["start_time"] = start_time

    validation_key = "val_mean_iou" if config.model.network_model == "segmentation" else "val_accuracy"
    deadline = start_time + 60 * max_minutes if max_minutes else None
    logger = RunLogger(run_dir, state, deadline)
    logs_of_run = [run_dir / "training_log.csv", run_dir / "training.txt"]
    validation = pipeline.dataset("validation", start_pass=state["epochs"])
    total_epochs = min(config.train.max_epoch, max_epochs) if max_epochs else config.train.max_epoch
    epoch_steps = config.train.epoch_steps or _steps_per_pass(pipeline)
    try:
        while state["epochs"] < total_epochs:
            epoch = state["epochs"]
            done_in_epoch = state["steps"] - epoch * epoch_steps
            remaining = epoch_steps - done_in_epoch
            train_data = pipeline.dataset("train", start_batch=state["steps"])
            t0 = time.time()
            # shuffle=False: the stream is already shuffled (Keras would warn that it ignores the flag).
            history = model.fit(
                train_data,
                steps_per_epoch=remaining,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                validation_data=validation,
                callbacks=[logger],
                verbose=verbose,
            )
            if logger.nan:
                raise TrainingInterrupted(
                    f"non-finite loss at step {state['steps']} (epoch {epoch}); training stopped, "
                    f"{latest_description(run_dir)}. Lower train.learning_rate or check the data."
                )
            if logger.stopped_for_time and state["steps"] - epoch * epoch_steps < epoch_steps:
                logger.steps_text.flush()
                store.commit(checkpoint_for(model), state, logs_of_run)
                print(
                    f"time budget of {max_minutes} min reached at step {state['steps']}: checkpoint saved, "
                    f"resume with --resume {run_dir}"
                )
                break
            logs = {k: v[-1] for k, v in history.history.items()}
            state["epochs"] = epoch + 1
            row = {"epoch": epoch + 1, "steps": state["steps"], "seconds": round(time.time() - t0, 2), **logs}
            row["learning_rate"] = float(model.optimizer.learning_rate)
            append_csv(run_dir / "training_log.csv", row)
            logger.write_scalars(row, epoch + 1)
            score = logs.get(validation_key)
            best = score is not None and (state["best"] is None or score > state["best"])
            if best:
                state["best"], state["best_epoch"] = float(score), epoch + 1
            snapshot = (
                f"epoch_{epoch + 1:04d}"
                if config.train.snapshot_gap and (epoch + 1) % config.train.snapshot_gap == 0
                else None
            )
            logger.steps_text.flush()
            store.commit(checkpoint_for(model), state, logs_of_run, best=best, snapshot=snapshot)
            if logger.stopped_for_time:
                print(f"time budget of {max_minutes} min reached after epoch {epoch + 1}")
                break
        else:
            state["finished"] = True
            store.write_state(state, (store.newest() or {}).get("save"))
    finally:
        logger.close()


def check_new_run_dir(run_dir: Path):
    """ValueError unless ``run_dir`` can become a new run directory: absent or empty, and writable."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ValueError(f"--run-dir {run_dir} is a file, not a directory")
        if any(run_dir.iterdir()):
            hint = (
                " (it holds a run: continue it with --resume)" if (run_dir / "config.yaml").exists() else ""
            )
            raise ValueError(f"--run-dir {run_dir} is not empty{hint}; give a new or empty directory")
    parent = run_dir if run_dir.exists() else _existing_ancestor(run_dir)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(f"--run-dir {run_dir}: cannot write in {parent} ({err.strerror or err})") from err


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise ValueError(f"--run-dir: {path} is a file, not a directory")
    return path


def _create_run_dir(run_dir: Path, config: Config, calibration: dict):
    """Makes ``run_dir`` with its ``config.yaml`` and ``calibration.json`` at once (a staging folder
    beside it, renamed), so a kill leaves either no run or one that resumes. Returns a function that
    puts the results folder back as it was."""
    run_dir = run_dir.absolute()
    made = [p for p in [run_dir.parent, *run_dir.parent.parents] if not p.exists()]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run_dir.parent / f".{run_dir.name}.starting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    config.save_yaml(staging / "config.yaml")
    write_json_atomically(staging / "calibration.json", calibration)
    given_empty = run_dir.is_dir()
    os.replace(staging, run_dir)  # onto an absent or empty directory

    def cleanup():
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        elif given_empty:
            for child in run_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    return cleanup


def _steps_per_pass(pipeline):
    sizes = pipeline.stream("train", "sequential").sizes()
    return max(1, int(round(sizes.sum() / pipeline.batch_limit)))


if __name__ == "__main__":
    sys.exit(main())
