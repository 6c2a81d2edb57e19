"""The saves of a training run, each committed at one instant.

A save ``checkpoints/save_<steps>`` is a ``tf.train.Checkpoint`` (``.index`` + ``.data-*``) and its
record ``save_<steps>.json``, written last (temporary file, fsync, rename). The record is the commit
point: it holds the run state (epochs, steps, best score), the sizes of the checkpoint files and of
the logs at that moment, which save holds the best weights and which saves are the ``epoch_NNNN``
snapshots. A kill at any instant therefore leaves the previous commit or the new one, never a mix; a
save without a record never happened and is removed. ``state.json`` at the run root is a copy of
the newest record for people and tools, never read back.

Names: ``last`` (the newest commit that loads), ``best``, ``epoch_NNNN``, or ``save_<steps>``; run
directories written before records existed keep their ``checkpoints/<name>`` prefixes, which still
resolve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

RECORD_FORMAT = 1
SAVE_NAME = re.compile(r"^save_(\d{8,})$")
# Commits kept besides the best and the snapshots: the newest one, and the previous one should the
# newest be damaged later.
KEPT_COMMITS = 2


class CheckpointError(RuntimeError):
    """A checkpoint or run record that cannot be read; the message names the files and what to do."""


class CommitError(RuntimeError):
    """A save could not be committed (disk full, I/O error); the previous commit is intact and loads."""


def read_checkpoint(checkpoint: tf.train.Checkpoint, prefix, exact: bool = True):
    """Restores ``checkpoint`` from ``prefix``; CheckpointError naming the files on any failure.

    exact: every object of ``checkpoint`` must be found in the files (resume); otherwise missing and
    extra values are allowed (weights for testing or fine-tuning).
    """
    prefix = Path(prefix)
    index = Path(f"{prefix}.index")
    if not index.is_file():
        raise CheckpointError(f"checkpoint {prefix} not found ({index.name} is missing)")
    try:
        status = checkpoint.read(str(prefix))
        if exact:
            status.assert_existing_objects_matched()
        else:
            status.expect_partial()
    except (tf.errors.OpError, IndexError, ValueError, AssertionError, OSError) as err:
        files = ", ".join(p.name for p in _checkpoint_files(prefix)) or index.name
        cause = getattr(err, "message", None) or str(err)
        raise CheckpointError(
            f"checkpoint {prefix} ({files}) is damaged or does not belong to this network: "
            f"{cause.strip().splitlines()[0][:300]}"
        ) from err
    return status


def _checkpoint_files(prefix: Path) -> list[Path]:
    return sorted(
        p
        for p in prefix.parent.glob(f"{prefix.name}.*")
        if p.name.startswith(f"{prefix.name}.index") or p.name.startswith(f"{prefix.name}.data-")
    )


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, value: dict):
    """Writes ``value`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


class RunStore:
    """Commits and finds the saves of the run directory ``run_dir``."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "checkpoints"

    # -- records ---------------------------------------------------------------------------------
    def records(self) -> list[tuple[str, dict | None, str | None]]:
        """Every record, newest first, as (save name, record or None, why it is unreadable)."""
        found = []
        for path in self.directory.glob("save_*.json"):
            name = path.stem
            if not SAVE_NAME.match(name):
                continue
            try:
                record = json.loads(path.read_text())
                if record.get("format") != RECORD_FORMAT or record.get("save") != name:
                    raise ValueError("not a record of this format")
                found.append((name, record, None))
            except (OSError, ValueError) as err:
                found.append((name, None, f"its record {path.name} is unreadable ({err})"))
        return sorted(found, key=lambda item: int(SAVE_NAME.match(item[0]).group(1)), reverse=True)

    def newest(self) -> dict | None:
        """The newest readable record (not verified against its files), or None."""
        return next((record for _, record, _ in self.records() if record is not None), None)

    def _verify_files(self, record: dict) -> str | None:
        for name, size in record["files"].items():
            path = self.directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes instead of {size}"
        return None

    # -- commit ----------------------------------------------------------------------------------
    def commit(
        self,
        checkpoint: tf.train.Checkpoint,
        state: dict,
        logs: Sequence[Path] = (),
        best: bool = False,
        snapshot: str | None = None,
    ) -> Path:
        """Saves ``checkpoint`` as ``save_<state['steps']>`` and commits it with ``state``.

        logs: files whose current sizes are recorded (a resume truncates them back);
        best: these are the best weights so far; snapshot: a name such as ``epoch_0010`` kept for good.
        Returns the checkpoint prefix. CommitError naming the save and the cause when a file operation
        fails (OSError, or TF's error from the checkpoint write): the files of the save are removed
        when it was not committed yet, and the previous commit is what a resume continues from.
        """
        name = f"save_{int(state['steps']):08d}"
        try:
            return self._commit(name, checkpoint, state, logs, best, snapshot)
        except (OSError, tf.errors.OpError) as err:
            cause = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", getattr(err, "message", None) or str(err))
            committed = (self.directory / f"{name}.json").is_file()
            if not committed:
                self._remove_partial_save(name)
            stage = (
                f"{name} was committed, but what follows the commit failed"
                if committed
                else f"nothing of {name} was committed; {latest_description(self.run_dir)}"
            )
            raise CommitError(
                f"could not commit the save {self.directory / name}: {cause.strip().splitlines()[0][:300]}; "
                f"{stage}. Free space or fix the disk, then continue with --resume {self.run_dir}"
            ) from err

    def _remove_partial_save(self, name: str):
        """Removes what an uncommitted save left (its files, TF's staging folder, the record's
        temporary), as far as the disk allows: ``prune`` retries later."""
        try:
            self._remove_save(name)
            shutil.rmtree(self.directory / f"{name}_temp", ignore_errors=True)
            for path in self.directory.glob(f".{name}.json.*.tmp"):
                path.unlink(missing_ok=True)
        except OSError:
            pass

    def _commit(self, name, checkpoint, state, logs, best, snapshot) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        prefix = self.directory / name
        previous = self.newest() or {}
        # A save of the same step (a resume from an older commit) is replaced: its record goes first,
        # so that no record ever describes files being rewritten.
        self._remove_save(name)
        checkpoint.write(str(prefix))
        files = _checkpoint_files(prefix)
        for path in files:
            _fsync(path)
        _fsync(self.directory)
        log_sizes = {}
        for path in logs:
            path = Path(path)
            if path.is_file():
                _fsync(path)
                log_sizes[path.name] = path.stat().st_size
        snapshots = dict(previous.get("snapshots", {}))
        if snapshot:
            snapshots[snapshot] = name
        record = {
            "format": RECORD_FORMAT,
            "save": name,
            "state": {k: v for k, v in state.items() if k != "start_time"},
            "files": {p.name: p.stat().st_size for p in files},
            "logs": log_sizes,
            "best_save": name if best else previous.get("best_save"),
            "snapshots": snapshots,
        }
        write_json_atomically(self.directory / f"{name}.json", record)
        self.write_state(state, name)
        self.prune()
        return prefix

    def write_state(self, state: dict, save: str | None = None):
        """``state.json``: ``state`` (without its start time) and the save holding it."""
        kept = {k: v for k, v in state.items() if k != "start_time"}
        write_json_atomically(self.run_dir / "state.json", {**kept, "save": save})

    def prune(self):
        """Removes saves that no kept record needs, and leftovers of interrupted saves."""
        records = [r for _, r, _ in self.records() if r is not None]
        keep = set()
        for record in records[:KEPT_COMMITS]:
            keep.add(record["save"])
            if record.get("best_save"):
                keep.add(record["best_save"])
        if records:
            keep.update(records[0].get("snapshots", {}).values())
        for path in list(self.directory.iterdir()):
            stem = path.name.split(".", 1)[0]
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            elif SAVE_NAME.match(stem) and stem not in keep:
                self._remove_save(stem)
            elif path.is_dir() and path.name.endswith("_temp"):
                shutil.rmtree(path, ignore_errors=True)  # TF's staging folder of a save cut short

    def _remove_save(self, name: str):
        (self.directory / f"{name}.json").unlink(missing_ok=True)
        for path in _checkpoint_files(self.directory / name):
            path.unlink(missing_ok=True)

    # -- resume ----------------------------------------------------------------------------------
    def restore(self, checkpoint: tf.train.Checkpoint, log=print, writable: bool = True) -> dict:
        """Restores the newest commit that verifies and loads into ``checkpoint``; returns its record.

        Damaged or uncommitted newer saves are reported through ``log`` and removed; the logs are cut
        back to the record's sizes. CheckpointError (listing every save tried) when none loads.
        ``writable`` False (a worker that does not write the run): nothing is removed or cut.
        """
        tried = []
        for name, record, problem in self.records():
            if record is not None:
                problem = self._verify_files(record)
            if problem is None:
                try:
                    read_checkpoint(checkpoint, self.directory / name)
                except CheckpointError as err:
                    problem = str(err)
            if problem is None:
                if writable:
                    for skipped, _ in tried:
                        self._remove_save(skipped)
                    self.truncate_logs(record)
                    self.prune()
                state = record["state"]
                log(f"resuming from {self.directory / name} (epoch {state['epochs']}, step {state['steps']})")
                return record
            log(f"skipping {self.directory / name}: {problem}")
            tried.append((name, problem))
        legacy = self.directory / "last"
        if Path(f"{legacy}.index").is_file():
            return self._restore_legacy(checkpoint, legacy, log)
        if not tried:
            # Killed before its first commit: the run starts again from its (seeded) beginning.
            if writable:
                self.truncate_logs({"logs": {"training_log.csv": 0, "training.txt": 0}})
            log(f"{self.directory} holds no committed save yet: starting from the beginning")
            return {
                "state": {"epochs": 0, "steps": 0},
                "logs": {},
                "save": None,
                "best_save": None,
                "snapshots": {},
            }
        details = "".join(f"\n  {name}: {problem}" for name, problem in tried)
        raise CheckpointError(
            f"--resume: {self.run_dir} has no save that loads{details}\nStart a new run, "
            f"or copy its weights with --finetune from a run directory that has one."
        )

    def _restore_legacy(self, checkpoint, prefix: Path, log) -> dict:
        state_path = self.run_dir / "state.json"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{state_path} is unreadable ({err}); it records the epochs and steps the "
                f"checkpoint {prefix} belongs to"
            ) from err
        read_checkpoint(checkpoint, prefix)
        log(f"resuming from {prefix} (epoch {state['epochs']}, step {state['steps']})")
        return {"state": state, "logs": {}, "save": None, "best_save": None, "snapshots": {}}

    def truncate_logs(self, record: dict):
        """Cuts each recorded log back to its size at the commit (the steps after it are redone)."""
        for name, size in record.get("logs", {}).items():
            path = self.run_dir / name
            if path.is_file() and path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)

    # -- lookup ----------------------------------------------------------------------------------
    def prefix(self, name: str = "last") -> Path:
        """The checkpoint prefix called ``name``: ``last``, ``best``, ``epoch_NNNN`` or ``save_<steps>``
        (a run without records: ``checkpoints/<name>``). CheckpointError listing the names otherwise."""
        newest = self.newest()
        if newest is None:
            target = name
        else:
            aliases = {"last": newest["save"], "best": newest.get("best_save"), **newest.get("snapshots", {})}
            target = aliases.get(name, name if SAVE_NAME.match(name) else None)
        if target and Path(f"{self.directory / target}.index").is_file():
            return self.directory / target
        raise CheckpointError(
            f"{self.run_dir}: no checkpoint {name!r}; it has {', '.join(self.names()) or 'none'}"
        )

    def names(self) -> list[str]:
        """Names that ``prefix`` resolves in this run."""
        newest = self.newest()
        if newest is None:
            return sorted(p.name[: -len(".index")] for p in self.directory.glob("*.index"))
        return ["last"] + (["best"] if newest.get("best_save") else []) + sorted(newest.get("snapshots", {}))


def latest_description(run_dir) -> str:
    """Where the newest committed weights of ``run_dir`` are, for messages."""
    record = RunStore(run_dir).newest()
    if record is None:
        return "no checkpoint was saved yet"
    return f"the last good checkpoint is {Path(run_dir) / 'checkpoints' / record['save']}"
