"""Trains KP-CNN / KP-FCNN with ``model.fit``.

    python -m training.train --config FILE [--set k=v ...] [--run-dir DIR] [--max-minutes M]
                             [--resume DIR] [--finetune RUN_DIR_OR_CHECKPOINT]

A run directory holds ``config.yaml`` (the full tree used), ``training_log.csv`` (one row per epoch),
``training.txt`` (the original's per-step columns), ``tensorboard/`` scalars, ``checkpoints/``
(``last`` every epoch, ``best`` on the best validation score, ``epoch_NNNN`` every ``snapshot_gap``
epochs; ``tf.train.Checkpoint`` of weights, momentum slots, learning rate and step count) and
``state.json`` (epochs and steps done, best score). ``--resume`` continues from ``last`` with the
same data stream (the pipeline rebuilds the batches from the step count), so an interrupted run
ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.models import KPCNN, KPFCNN
from training.config import add_override_argument, load_config
from training.datasets import configure, load_dataset
from training.pipeline import Pipeline
from training.trainer import TrainingModel

LOG_COLUMNS = ("epoch", "steps", "loss", "output_loss", "regularization_loss", "offsets_loss", "accuracy",
               "val_loss", "val_accuracy", "val_mean_iou", "learning_rate", "seconds")


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
    graph does not follow), the momentum slots, the learning rate and the step count."""
    return tf.train.Checkpoint(model=training_model, network_variables=list(training_model.network.variables))


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
        # Test hook: hang after this many steps (in total) so a test can kill a run mid-epoch.
        self.stall_at_step = int(os.environ.get("KPCONV_TF_STALL_AT_STEP", "-1"))
        self.nan = False
        self.offsets_history = collections.deque(maxlen=OFFSETS_GROWTH_STEPS + 1)
        self.steps_text = open(run_dir / "training.txt", "a", buffering=1)  # line-buffered: a killed run keeps its steps
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
        self.steps_text.write(f"{self.state['epochs']} {self.state['steps']} {logs.get('output_loss', 0.0):.3f} "
                              f"{logs.get('offsets_loss', 0.0):.3f} {logs.get('accuracy', 0.0):.3f} "
                              f"{time.time() - self.state['start_time']:.3f}\n")
        if self.state["steps"] == self.stall_at_step:
            self.steps_text.flush()
            time.sleep(3600)  # interruption tests kill the process here, mid-epoch
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
        if (len(self.offsets_history) > OFFSETS_GROWTH_STEPS and first > 1e-4
                and value > OFFSETS_GROWTH * first):
            print(f"\nwarning: the offsets loss grew from {first:.3g} to {value:.3g} over the last "
                  f"{OFFSETS_GROWTH_STEPS} steps (step {self.state['steps']}): the deformable kernel points are "
                  "drifting away from the points (see offset_norm_* / lost_share_* in training_log.csv); "
                  "the stable definition is in README, \"Deformable KPConv\"",
                  file=sys.stderr, flush=True)
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
    new = not path.exists()
    columns = list(LOG_COLUMNS) + [k for k in row if k.startswith(DEFORMATION_PREFIXES)]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def save_state(run_dir: Path, state: dict):
    tmp = run_dir / "state.json.tmp"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in state.items() if k != "start_time"}, f, indent=1)
    tmp.replace(run_dir / "state.json")


def write_checkpoint(training_model, run_dir: Path, name: str):
    path = run_dir / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_for(training_model).write(str(path))
    return path


HEAD_LAYERS = ("softmax", "classifier", "multi_weights")


def finetune_from(network, source, skip_head=True):
    """Copies the weights of the run directory ``source`` (its ``checkpoints/best``, else ``last``)
    into ``network`` wherever variable paths and shapes agree; the classifier is skipped when
    ``skip_head`` (new classes). Returns the copied variable paths."""
    source = Path(source)
    prefix = next((source / "checkpoints" / n for n in ("best", "last")
                   if (source / "checkpoints" / f"{n}.index").exists()), None)
    if prefix is None or not (source / "config.yaml").exists():
        raise FileNotFoundError(f"--finetune: {source} is not a run directory with config.yaml and checkpoints")
    source_config = Config.from_yaml(source / "config.yaml")
    source_model = TrainingModel(build_network(source_config), source_config)
    checkpoint_for(source_model).read(str(prefix)).expect_partial()
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
    parser.add_argument("--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 line/epoch")
    args = parser.parse_args(argv)
    run_dir = train(args.config, args.overrides, args.run_dir, args.max_minutes, args.resume, args.finetune,
                    args.max_epochs, args.verbose)
    print(f"run directory: {run_dir}")
    return 0


def train(config_path=None, overrides=(), run_dir=None, max_minutes=None, resume=None, finetune=None,
          max_epochs=None, verbose=1) -> Path:
    """Runs (or resumes) a training; returns the run directory."""
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
    keras.utils.set_random_seed(config.train.seed)
    dataset = load_dataset(config)
    configure(config, dataset)
    if not resume:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(run_dir or Path("results") / f"{config.dataset.name}_{stamp}")
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save_yaml(run_dir / "config.yaml")
    run_dir = Path(run_dir)

    pipeline = Pipeline(dataset, config)
    with open(run_dir / "calibration.json", "w") as f:
        json.dump({"batch_limit": pipeline.batch_limit, "neighbor_limits": pipeline.neighbor_limits}, f)

    network = build_network(config)
    model = TrainingModel(network, config)
    model.compile()
    state = {"epochs": 0, "steps": 0, "best": None, "best_epoch": None, "finished": False}
    if resume:
        with open(run_dir / "state.json") as f:
            state.update(json.load(f))
        checkpoint_for(model).read(str(run_dir / "checkpoints" / "last")).assert_existing_objects_matched()
        if int(model.step.optimizer.iterations.numpy()) != state["steps"]:
            raise RuntimeError(f"{run_dir}: checkpoint step {int(model.step.optimizer.iterations.numpy())} "
                               f"differs from state.json steps {state['steps']}")
    elif finetune:
        copied = finetune_from(network, finetune)
        print(f"fine-tuning: {len(copied)} variables copied from {finetune}")
    state["start_time"] = start_time

    validation_key = "val_mean_iou" if config.model.network_model == "segmentation" else "val_accuracy"
    deadline = start_time + 60 * max_minutes if max_minutes else None
    logger = RunLogger(run_dir, state, deadline)
    validation = pipeline.dataset("validation")
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
            history = model.fit(train_data, steps_per_epoch=remaining, epochs=epoch + 1, initial_epoch=epoch,
                                shuffle=False, validation_data=validation, callbacks=[logger], verbose=verbose)
            if logger.nan:
                raise TrainingInterrupted(
                    f"non-finite loss at step {state['steps']} (epoch {epoch}); training stopped, the last good "
                    f"checkpoint is {run_dir / 'checkpoints' / 'last'}. Lower train.learning_rate or check the data.")
            if logger.stopped_for_time and state["steps"] - epoch * epoch_steps < epoch_steps:
                write_checkpoint(model, run_dir, "last")
                save_state(run_dir, state)
                print(f"time budget of {max_minutes} min reached at step {state['steps']}: checkpoint saved, "
                      f"resume with --resume {run_dir}")
                break
            logs = {k: v[-1] for k, v in history.history.items()}
            state["epochs"] = epoch + 1
            if (epoch + 1) in config.train.lr_decays:
                lr = model.learning_rate
                lr.assign(lr * config.train.lr_decays[epoch + 1])
            row = {"epoch": epoch + 1, "steps": state["steps"], "seconds": round(time.time() - t0, 2), **logs}
            row["learning_rate"] = float(model.learning_rate.numpy())
            append_csv(run_dir / "training_log.csv", row)
            logger.write_scalars(row, epoch + 1)
            score = logs.get(validation_key)
            write_checkpoint(model, run_dir, "last")
            if score is not None and (state["best"] is None or score > state["best"]):
                state["best"], state["best_epoch"] = float(score), epoch + 1
                write_checkpoint(model, run_dir, "best")
            if config.train.snapshot_gap and (epoch + 1) % config.train.snapshot_gap == 0:
                write_checkpoint(model, run_dir, f"epoch_{epoch + 1:04d}")
            save_state(run_dir, state)
            if logger.stopped_for_time:
                print(f"time budget of {max_minutes} min reached after epoch {epoch + 1}")
                break
        else:
            state["finished"] = True
            save_state(run_dir, state)
    finally:
        logger.close()
    return run_dir


def _steps_per_pass(pipeline):
    sizes = pipeline.stream("train", "sequential").sizes()
    return max(1, int(round(sizes.sum() / pipeline.batch_limit)))


if __name__ == "__main__":
    sys.exit(main())
