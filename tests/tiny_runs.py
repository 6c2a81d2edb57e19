"""Tiny training runs made in-process by the tests that need a trained run directory."""

from pathlib import Path

from training.run_store import RunStore


def train_tiny(tmp_path_factory, config, overrides):
    """Trains ``config`` with ``overrides`` into a fresh run directory; returns it."""
    from training.train import train

    run_dir = tmp_path_factory.mktemp(config) / "run"
    train(config, overrides, run_dir, verbose=0)
    assert Path(f"{RunStore(run_dir).prefix('last')}.index").exists()
    return run_dir
