"""Trains KP-CNN / KP-FCNN with one ``model.fit`` whose callbacks keep the run directory.

    python -m training.train --config FILE [--set k=v ...] [--run-dir DIR] [--max-minutes M]
                             [--resume DIR] [--finetune RUN_DIR_OR_CHECKPOINT]
                             [--strategy default|mirrored|multiworker]

A run directory holds ``config.yaml`` (the full tree used), ``training_log.csv`` (one row per epoch),
``training.txt`` (the original's per-step columns), ``tensorboard/`` scalars, ``checkpoints/`` (one
committed save per epoch, see ``training.run_store``: weights, momentum slots, learning rate, step
count, best score and log positions; ``last``, ``best`` and the ``epoch_NNNN`` snapshots every
``snapshot_gap`` epochs resolve to saves) and ``state.json`` (a copy of the newest commit).
``--resume`` continues from the newest save that loads, with the same data stream (the pipeline
rebuilds the batches from the step count) and the logs cut back to that save, so a run killed at any
moment ends with the weights and logs an uninterrupted run would have.

``--resume`` continues the run its ``config.yaml`` describes. ``--config FILE`` and ``--set`` may be
given with it, but may change only the run-time keys (``kpconv_tf.config.RUN_TIME_KEYS``:
``train.max_epoch``, ``train.snapshot_gap``, ``train.votes``, ``train.strategy``,
``train.save_freq``, ``model.pyramid`` and keys no code reads); any other difference from
``config.yaml`` is refused, naming the keys. Before anything is trained or written, a resume also
checks that the checkpoints hold the variables of the network ``config.yaml`` builds and that the
run directory can be written; every run checks that the disk of its run directory has room for its
saves (``KEPT_COMMITS`` commits, the best, one being written, the ``epoch_NNNN`` snapshots to come)
and logs. A save that cannot be committed (disk full, I/O error) stops the run with the previous
commit intact: free space, then ``--resume``.

``train.strategy`` (``--strategy``) trains on several GPUs or machines (``training.distribute``):
every worker runs the same command with the same run directory (a shared file system); the chief
writes it (and checks it can), the others only read it (``--resume``).
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
import numpy as np
import tensorflow as tf

from kpconv_tf.config import (
    DERIVED_KEYS,
    RUN_TIME_KEYS,
    STRATEGIES,
    Config,
    ConfigError,
    config_differences,
)
from kpconv_tf.models import build_network
from training.config import add_override_argument, load_config
from training.datasets import configure, load_dataset
from training.distribute import any_worker, is_chief, make_strategy
from training.pipeline import Pipeline
from training.run_store import (
    KEPT_COMMITS,
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


class RunDirError(ValueError):
    """The run directory cannot take the run: not a directory, not empty, not writable, or too little
    free space on its disk. Raised before anything is written; the message names the path."""


def checkpoint_for(training_model):
    """Checkpoint of everything a run needs to continue: every network variable (weights and
    batch-norm statistics, listed explicitly because the blocks sit in Python lists that TF's object
    graph does not follow) and, once compiled, the optimizer's (slots, learning rate, step count)."""
    optimizer = getattr(training_model, "optimizer", None)
    return tf.train.Checkpoint(
        network_variables=list(training_model.network.variables),
        optimizer_variables=list(optimizer.variables) if optimizer is not None else [],
    )


class StepLog(keras.callbacks.Callback):
    """The original's per-step ``training.txt`` (``epochs steps out_loss offset_loss train_accuracy
    time``, epochs done and steps done after the step) and a warning when the offsets loss grows
    (deformable kernels diverging). Steps with a non-finite loss are not written."""

    def __init__(self, run_dir: Path, start_time: float):
        super().__init__()
        self.start_time = start_time
        self.epoch = 0
        self.offsets_history = collections.deque(maxlen=OFFSETS_GROWTH_STEPS + 1)
        # Line-buffered so that a killed run keeps its steps; closed by close().
        self.steps_text = open(run_dir / "training.txt", "a", buffering=1)  # noqa: SIM115
        if self.steps_text.tell() == 0:
            self.steps_text.write("epochs steps out_loss offset_loss train_accuracy time\n")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        steps = int(self.model.optimizer.iterations.numpy())
        self._watch_offsets(batch, float(logs.get("offsets_loss", 0.0)), steps)
        if not math.isfinite(float(logs.get("loss", 0.0))):
            return
        self.steps_text.write(
            f"{self.epoch} {steps} {logs.get('output_loss', 0.0):.3f} "
            f"{logs.get('offsets_loss', 0.0):.3f} {logs.get('accuracy', 0.0):.3f} "
            f"{time.time() - self.start_time:.3f}\n"
        )

    def _watch_offsets(self, batch, running_mean, steps=0):
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
                f"{OFFSETS_GROWTH_STEPS} steps (step {steps}): the deformable kernel points "
                "are drifting away from the points (see offset_norm_* / lost_share_* in training_log.csv); "
                'the stable definition is in README, "Deformable KPConv"',
                file=sys.stderr,
                flush=True,
            )
            self.offsets_history.clear()

    def close(self):
        self.steps_text.close()


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the step during which ``deadline`` (``time.time()`` seconds) passed
    (on any worker of ``strategy``: all stop at the same step)."""

    def __init__(self, deadline: float, strategy=None):
        super().__init__()
        self.deadline = deadline
        self.strategy = strategy or tf.distribute.get_strategy()
        self.reached = False

    def on_train_batch_end(self, batch, logs=None):
        if any_worker(self.strategy, time.time() > self.deadline):
            self.reached = True
            self.model.stop_training = True


class ContinueEpoch(keras.callbacks.Callback):
    """Puts back the metrics' running sums of an epoch stopped inside (``RunCommit``) after Keras
    resets them, so the resumed epoch logs the means of all its steps."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_begin(self, epoch, logs=None):
        strategy = self.model.distribute_strategy
        for metric, values in zip(self.model.metrics, self.values, strict=True):
            for variable, value in zip(metric.variables, values, strict=True):
                # metric sums are per replica (summed when read): the first replica holds them
                parts = strategy.experimental_local_results(variable.value)
                for index, part in enumerate(parts):
                    part.assign(value if index == 0 else tf.zeros_like(part))


class RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar counting the run's epochs ("Epoch 3/10"), also in the fit over the rest
    of an epoch a resume falls in (whose own ``epochs`` stops at that epoch)."""

    def __init__(self, total_epochs: int):
        super().__init__()
        self.total_epochs = total_epochs

    def set_params(self, params):
        super().set_params({**params, "epochs": self.total_epochs})


def _whole_epoch(model, epoch, steps_per_epoch):
    """True when the optimizer has made every step of ``epoch`` (not stopped inside it)."""
    return int(model.optimizer.iterations.numpy()) >= (epoch + 1) * steps_per_epoch


def _finite_loss(logs):
    return math.isfinite(float((logs or {}).get("loss", 0.0)))


class EpochValidation(keras.callbacks.Callback):
    """Validation pass ``epoch`` after every whole epoch, its results logged as ``val_*``.

    Each pass is a dataset of its own with its length known (``Pipeline.validation_pass``): passes
    differ in batch count (objects are packed by points), while ``fit(validation_data=...)`` keeps
    one iterator whose length is fixed by the first pass.
    """

    def __init__(self, pipeline, steps_per_epoch: int):
        super().__init__()
        self.pipeline = pipeline
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        if not (_finite_loss(logs) and _whole_epoch(self.model, epoch, self.steps_per_epoch)):
            return
        strategy = self.model.distribute_strategy
        if strategy.num_replicas_in_sync == 1:
            data, steps = self.pipeline.validation_pass(epoch), None
        else:  # replicas validate on whole batches of the pass, R at a time
            data = self.pipeline.distributed_dataset(strategy, "validation", start_pass=epoch)
            steps = self.pipeline.validation_steps(epoch, strategy.num_replicas_in_sync)
        results = self.model.evaluate(data, steps=steps, verbose=0, return_dict=True)
        logs.update({f"val_{name}": value for name, value in results.items()})


class RunCommit(keras.callbacks.Callback):
    """Commits the run (``RunStore``) at the end of every epoch.

    A whole epoch: its CSV row, then a commit with the state (epochs, steps, best score), the best
    save and the ``epoch_NNNN`` snapshots. A stop inside an epoch (time budget), and every
    ``train.save_freq`` steps inside one: a commit of the step reached, without a row, its state
    holding the metrics' running sums (``epoch_metrics``, for ``ContinueEpoch``). After a non-finite
    loss nothing is written: the last good commit stays.
    ``step_log`` None (a worker other than the chief): the state is kept, nothing is written.
    """

    def __init__(self, store, state, config, steps_per_epoch, step_log):
        super().__init__()
        self.store = store
        self.state = state
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.step_log = step_log
        self.write = step_log is not None
        self.committed_step = None
        segmentation = config.model.network_model == "segmentation"
        self.validation_key = "val_mean_iou" if segmentation else "val_accuracy"
        self.logs_of_run = [store.run_dir / "training_log.csv", store.run_dir / "training.txt"]
        self.epoch_start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        frequency = self.config.train.save_freq
        steps = int(self.model.optimizer.iterations.numpy())
        if frequency and steps % frequency == 0 and steps % self.steps_per_epoch and _finite_loss(logs):
            self._commit_inside_epoch(steps)

    def _commit_inside_epoch(self, steps):
        state, model = self.state, self.model
        state["steps"] = steps
        # read on every worker: reading a metric of a multi-worker strategy is a collective
        state["epoch_metrics"] = [[v.numpy().tolist() for v in m.variables] for m in model.metrics]
        self.committed_step = steps
        if self.write:
            self.step_log.steps_text.flush()
            self.store.commit(checkpoint_for(model), state, self.logs_of_run)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite_loss(logs):
            return
        state, model = self.state, self.model
        state["steps"] = int(model.optimizer.iterations.numpy())
        if not _whole_epoch(model, epoch, self.steps_per_epoch):
            if self.committed_step != state["steps"]:  # not just committed by save_freq
                self._commit_inside_epoch(state["steps"])
            return
        state.pop("epoch_metrics", None)
        state["epochs"] = epoch + 1
        if not self.write:
            return
        self.step_log.steps_text.flush()
        row = {"epoch": epoch + 1, "steps": state["steps"], **logs}
        row["seconds"] = round(time.time() - self.epoch_start, 2)
        row["learning_rate"] = float(model.optimizer.learning_rate)
        append_csv(self.store.run_dir / "training_log.csv", row)
        score = logs.get(self.validation_key)
        best = score is not None and (state["best"] is None or score > state["best"])
        if best:
            state["best"], state["best_epoch"] = float(score), epoch + 1
        gap = self.config.train.snapshot_gap
        snapshot = f"epoch_{epoch + 1:04d}" if gap and (epoch + 1) % gap == 0 else None
        self.store.commit(checkpoint_for(model), state, self.logs_of_run, best=best, snapshot=snapshot)


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


def main(argv=None, callbacks=()):
    """The command line; ``callbacks`` as ``train``'s."""
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file or name in training/configs (not needed with --resume)")
    add_override_argument(parser)
    parser.add_argument("--run-dir", help="output directory (default results/<dataset>_<time>)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this wall time")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="run directory to continue with its config.yaml; --config / --set may then change only "
        + ", ".join(RUN_TIME_KEYS)
        + " (any other difference is refused)",
    )
    parser.add_argument("--finetune", help="run directory or checkpoint prefix to start from (head skipped)")
    parser.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs in total")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="tf.distribute strategy (train.strategy): one device, this machine's GPUs, or the "
        "workers of TF_CONFIG / SLURM (README, 'Several GPUs or machines')",
    )
    parser.add_argument(
        "--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 line/epoch"
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.strategy={args.strategy}"] if args.strategy else [])
    run_dir = train(
        args.config,
        overrides,
        args.run_dir,
        args.max_minutes,
        args.resume,
        args.finetune,
        args.max_epochs,
        args.verbose,
        callbacks,
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
    callbacks=(),
) -> Path:
    """Runs (or resumes) a training; returns the run directory.

    ``callbacks``: Keras callbacks of the caller's, run after the run's own (which have written the
    epoch's commit when theirs see its end).

    Everything that can fail before training (config, architecture, data, calibration, the run
    directory being writable and having room for the saves; with ``resume``, a config or overrides
    changing more than ``RUN_TIME_KEYS``, checkpoints of another network) is checked before anything
    is written; a new run directory made for a start that fails anyway is removed.
    """
    start_time = time.time()
    if os.environ.get("KPCONV_TF_DETERMINISTIC") == "1":
        tf.config.experimental.enable_op_determinism()  # bitwise-repeatable runs (tests of --resume)
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"--resume: {run_dir}/config.yaml not found (not a run directory)")
        config = resume_config(run_dir, config_path, overrides)
    else:
        if not config_path:
            raise ValueError("--config is required unless --resume is given")
        config = load_config(config_path, list(overrides))
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(run_dir or Path("results") / f"{config.dataset.name}_{stamp}")
    strategy = make_strategy(config.train.strategy)  # before any other TF work (multi-worker)
    chief = is_chief(strategy)
    if chief and resume:
        check_resume_dir_writable(run_dir)
    elif chief:
        check_new_run_dir(run_dir)
    run_dir = Path(run_dir)
    keras.utils.set_random_seed(config.train.seed)
    dataset = load_dataset(config)
    configure(config, dataset)
    if resume:
        check_data_match(run_dir, config)
    pipeline = Pipeline(dataset, config)
    calibration = {"batch_limit": pipeline.batch_limit, "neighbor_limits": pipeline.neighbor_limits}
    epoch_steps = config.train.epoch_steps or _steps_per_pass(pipeline)
    with strategy.scope():
        network = build_network(config)
        model = TrainingModel(network, config)
        model.compile(optimizer=make_optimizer(config, epoch_steps))
    store = RunStore(run_dir)
    state = {"epochs": 0, "steps": 0, "best": None, "best_epoch": None, "finished": False}
    total_epochs = min(config.train.max_epoch, max_epochs) if max_epochs else config.train.max_epoch
    if resume:
        check_checkpoints_match(store, model)
        if chief:
            done = {**state, **((store.newest() or {}).get("state") or {})}
            check_free_space(run_dir, model, config, done, total_epochs, epoch_steps, store)
        state.update(store.restore(checkpoint_for(model), writable=chief)["state"])
        if int(model.optimizer.iterations.numpy()) != state["steps"]:
            raise CheckpointError(
                f"{run_dir}: checkpoint step {int(model.optimizer.iterations.numpy())} "
                f"differs from its record's steps {state['steps']}"
            )
    else:
        if chief:
            check_free_space(run_dir, model, config, state, total_epochs, epoch_steps)
        if finetune:
            copied = finetune_from(network, finetune)
            print(f"fine-tuning: {len(copied)} variables copied from {finetune}")
        cleanup = _create_run_dir(run_dir, config, calibration) if chief else (lambda: None)
    try:
        if finetune and not resume and chief:
            # a resume before the first epoch's save must start from these weights too
            store.commit(checkpoint_for(model), state)
        _fit(
            model,
            pipeline,
            config,
            store,
            state,
            start_time,
            max_minutes,
            total_epochs,
            epoch_steps,
            verbose,
            chief,
            callbacks,
        )
    except TrainingInterrupted:
        raise  # the run directory keeps its logs for diagnosis
    except (Exception, KeyboardInterrupt):
        if chief and not resume and store.newest() is None:
            cleanup()  # nothing was committed: the start failed
        raise
    return run_dir


def _fit(
    model,
    pipeline,
    config,
    store,
    state,
    start_time,
    max_minutes,
    total_epochs,
    epoch_steps,
    verbose,
    chief=True,
    extra=(),
):
    """One ``fit`` up to epoch ``total_epochs`` of ``epoch_steps`` steps (after one over the rest of
    an epoch a resume falls in); the bookkeeping is in the callbacks, whose writes only the chief
    makes."""
    run_dir = store.run_dir
    strategy = model.distribute_strategy
    step_log = StepLog(run_dir, start_time) if chief else None
    budget = TimeBudget(start_time + 60 * max_minutes, strategy) if max_minutes else None
    board = keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False, profile_batch=0)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        *([step_log] if chief else []),
        *([budget] if budget else []),
        EpochValidation(pipeline, epoch_steps),  # before the writers: it adds the val_* logs
        RunCommit(store, state, config, epoch_steps, step_log),
        *([board] if chief else []),
        *extra,
        *([RunProgbar(total_epochs)] if verbose else []),  # last: it prints the val_* logs too
    ]

    def train_data():
        if config.train.strategy == "default":
            return pipeline.dataset("train", start_batch=state["steps"])
        return pipeline.distributed_dataset(strategy, "train", start_step=state["steps"])

    def fit(epochs, steps_per_epoch, first=()):
        # shuffle=False: the stream is already shuffled (Keras would warn that it ignores the flag).
        history = model.fit(
            train_data(),
            epochs=epochs,
            initial_epoch=state["epochs"],
            steps_per_epoch=steps_per_epoch,
            shuffle=False,
            callbacks=[*first, *callbacks],
            verbose=verbose,
        )
        losses = history.history.get("loss", [])
        if losses and not math.isfinite(losses[-1]):
            raise TrainingInterrupted(
                f"non-finite loss at step {int(model.optimizer.iterations.numpy())} (epoch "
                f"{state['epochs']}); training stopped, {latest_description(run_dir)}. Lower "
                "train.learning_rate or check the data."
            )

    try:
        done_in_epoch = state["steps"] - state["epochs"] * epoch_steps
        if done_in_epoch and state["epochs"] < total_epochs:
            # the rest of the epoch stopped in, its running means continued
            fit(state["epochs"] + 1, epoch_steps - done_in_epoch, [ContinueEpoch(state["epoch_metrics"])])
        if not (budget and budget.reached) and state["epochs"] < total_epochs:
            fit(total_epochs, epoch_steps)
    finally:
        if step_log is not None:
            step_log.close()
    if budget and budget.reached:
        if state["steps"] > state["epochs"] * epoch_steps:
            print(
                f"time budget of {max_minutes} min reached at step {state['steps']}: checkpoint saved, "
                f"resume with --resume {run_dir}"
            )
        else:
            print(f"time budget of {max_minutes} min reached after epoch {state['epochs']}")
    if state["epochs"] >= total_epochs:
        state["finished"] = True
        if chief:
            store.write_state(state, (store.newest() or {}).get("save"))


def check_new_run_dir(run_dir: Path):
    """RunDirError unless ``run_dir`` can become a new run directory: absent or empty, and writable."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunDirError(f"--run-dir {run_dir} is a file, not a directory")
        if any(run_dir.iterdir()):
            hint = (
                " (it holds a run: continue it with --resume)" if (run_dir / "config.yaml").exists() else ""
            )
            raise RunDirError(f"--run-dir {run_dir} is not empty{hint}; give a new or empty directory")
    parent = run_dir if run_dir.exists() else _existing_ancestor(run_dir)
    try:
        _probe_directory(parent)
    except OSError as err:
        raise RunDirError(f"--run-dir {run_dir}: cannot write in {parent} ({err.strerror or err})") from err


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise RunDirError(f"--run-dir: {path} is a file, not a directory")
    return path


def _probe_directory(directory: Path):
    """OSError unless a file can be made in ``directory`` (an unnamed temporary one: nothing stays)."""
    with tempfile.TemporaryFile(dir=directory):
        pass


def _shorten(value, width=60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _listed(items, most=3) -> str:
    items = list(items)
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def resume_config(run_dir: Path, config_path=None, overrides=()) -> Config:
    """The config of a resume: ``run_dir/config.yaml``, with the run-time keys (``RUN_TIME_KEYS``) of
    ``config_path`` (when given) and ``overrides``. ConfigError naming both files and the first keys
    when they differ from the run's in any other key (what the checkpoints and the data stream were
    made with); keys that the data determine (``DERIVED_KEYS``) are compared after loading the data."""
    run_config_path = Path(run_dir) / "config.yaml"
    run_config = Config.from_yaml(run_config_path)
    if config_path:
        asked = load_config(config_path, list(overrides))
        source = f"--config {config_path}" + (" with its --set overrides" if overrides else "")
    else:
        asked = Config.from_yaml(run_config_path, list(overrides))
        source = "--set " + " ".join(overrides)
    differences = config_differences(asked, run_config, ignore=RUN_TIME_KEYS + DERIVED_KEYS)
    if differences:
        listed = _listed(
            f"{key} = {_shorten(a)} asked, {_shorten(b)} in the run" for key, a, b in differences
        )
        raise ConfigError(
            f"--resume {run_dir}: {source} differs from {run_config_path} (the config its checkpoints and "
            f"data stream were made with) in {listed}. A resume may change only {', '.join(RUN_TIME_KEYS)}; "
            "continue without these changes, or start a new run (--run-dir; --finetune "
            f"{run_dir} copies its weights)"
        )
    return asked


def check_data_match(run_dir: Path, config: Config):
    """ConfigError when the data now determine other ``DERIVED_KEYS`` (classes) than the run's."""
    run_config_path = Path(run_dir) / "config.yaml"
    run_config = Config.from_yaml(run_config_path)
    differences = [d for d in config_differences(config, run_config) if d[0] in DERIVED_KEYS]
    if differences:
        listed = _listed(f"{key} = {_shorten(a)} now, {_shorten(b)} in the run" for key, a, b in differences)
        raise ConfigError(
            f"--resume {run_dir}: the data at dataset.path {config.dataset.path!r} no longer give what "
            f"{run_config_path} records: {listed}"
        )


def check_resume_dir_writable(run_dir: Path):
    """RunDirError unless the folders a resume writes in (the run directory, ``checkpoints``,
    ``tensorboard/*``) take new files and the logs it appends to open for writing. Nothing is
    changed: the probe files are unnamed temporaries and the logs are opened without writing."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / "checkpoints", run_dir / "tensorboard"]
    folders += sorted((run_dir / "tensorboard").glob("*"))
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            _probe_directory(folder)
        except OSError as err:
            raise RunDirError(
                f"--resume {run_dir}: cannot write in {folder} ({err.strerror or err}); a resume commits "
                "its saves and appends to its logs there: make it writable, or resume a copy of the run"
            ) from err
    for name in ("training.txt", "training_log.csv"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as err:
            raise RunDirError(
                f"--resume {run_dir}: cannot write {path} ({err.strerror or err}); a resume appends to it"
            ) from err


def check_checkpoints_match(store: RunStore, model):
    """CheckpointError when the newest save whose index reads holds other variables (count or shapes)
    than the network and optimizer built from the run's ``config.yaml``, e.g. after it was edited.
    Only the checkpoint index is read; a run without a readable save passes (``RunStore.restore``
    then reports the damage)."""
    prefixes = [store.directory / name for name, record, _ in store.records() if record is not None]
    prefixes.append(store.directory / "last")  # runs written before records
    for prefix in prefixes:
        try:
            stored = tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError):
            continue  # absent or damaged: restore skips it and says why
        break
    else:
        return
    problems = []
    # the names checkpoint_for gives: network variables, then the optimizer's (slots, rate, step)
    for group, variables in (
        ("network", model.network.variables),
        ("optimizer", model.optimizer.variables),
    ):
        held = sum(1 for k in stored if k.startswith(f"{group}_variables/"))
        if held != len(variables):
            problems.append(
                f"the config builds {len(variables)} {group} variables, the checkpoint holds {held}"
            )
        for i, variable in enumerate(variables):
            shape = stored.get(f"{group}_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
            if shape is not None and list(shape) != list(variable.shape):
                shapes = f"{list(variable.shape)} in the config, {list(shape)} in the checkpoint"
                problems.append(f"{variable.path} is {shapes}")
    if not problems:
        return
    files = ", ".join(p.name for p in sorted(prefix.parent.glob(f"{prefix.name}.*")))
    raise CheckpointError(
        f"--resume {store.run_dir}: the config and the checkpoints differ: {store.run_dir / 'config.yaml'} "
        f"does not build the network and optimizer saved in {prefix} ({files}): {_listed(problems)}. "
        "Was config.yaml changed after the run started? Put back the config it was trained with; nothing "
        f"was changed in {store.run_dir}"
    )


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


# Room for the logs besides the saves (training.txt lines, CSV rows, TensorBoard events), generously.
LOG_BYTES, LOG_BYTES_PER_STEP, LOG_BYTES_PER_EPOCH = 1 << 20, 128, 32 << 10


def save_bytes(model) -> int:
    """About the bytes of one committed save of ``model``: its network and optimizer variables (the
    checkpoint data), plus the index entries and the record."""
    variables = [*model.network.variables, *model.optimizer.variables]
    data = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return data + 256 * len(variables) + 4096


def space_needed(model, config, state, total_epochs, epoch_steps, store=None) -> tuple[int, str]:
    """(bytes the run still needs on its disk, how they are counted). The saves it may hold at once
    (``KEPT_COMMITS`` commits, the best, the one being written, the ``epoch_NNNN`` snapshots still to
    come) and its logs, less the saves of ``store`` on disk that later commits replace."""
    epochs_left = max(0, total_epochs - state["epochs"])
    gap = config.train.snapshot_gap
    snapshots = total_epochs // gap - state["epochs"] // gap if gap and epochs_left else 0
    saves = KEPT_COMMITS + 2 + snapshots if epochs_left else 0
    one = save_bytes(model)
    logs = LOG_BYTES + epochs_left * (LOG_BYTES_PER_EPOCH + epoch_steps * LOG_BYTES_PER_STEP)
    reclaimed = 0
    if store is not None and saves and store.directory.is_dir():
        kept = set(((store.newest() or {}).get("snapshots") or {}).values())
        reclaimed = sum(
            p.stat().st_size
            for p in store.directory.glob("save_*")
            if p.is_file() and p.name.split(".", 1)[0] not in kept
        )
    detail = (
        f"{saves} saves of ~{one} bytes (the {KEPT_COMMITS} newest commits, the best, one being written, "
        f"{snapshots} epoch snapshots to come at train.snapshot_gap={gap}) and {logs} bytes of logs"
        + (f", less {reclaimed} bytes of saves on disk that later commits replace" if reclaimed else "")
    )
    return max(0, saves * one + logs - reclaimed), detail


def check_free_space(run_dir, model, config, state, total_epochs, epoch_steps, store=None):
    """RunDirError naming the path, the free and the needed bytes when the disk of ``run_dir`` (its
    nearest existing folder for a new run) has less free space than ``space_needed``."""
    run_dir = Path(run_dir)
    where = run_dir if run_dir.is_dir() else _existing_ancestor(run_dir)
    needed, detail = space_needed(model, config, state, total_epochs, epoch_steps, store)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise RunDirError(
            f"{run_dir}: not enough free space: {free} bytes ({free / 2**20:.1f} MiB) free on the disk of "
            f"{where}, the run needs about {needed} bytes ({needed / 2**20:.1f} MiB): {detail}. Free space "
            "or give a run directory on another disk (a larger train.snapshot_gap keeps fewer snapshots)"
        )


def _steps_per_pass(pipeline):
    sizes = pipeline.stream("train", "sequential").sizes()
    return max(1, int(round(sizes.sum() / pipeline.batch_limit)))


if __name__ == "__main__":
    sys.exit(main())
