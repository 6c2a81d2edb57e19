"""Command-line helpers over the typed config tree (``kpconv_tf.config``).

    config = load_config("training/configs/modelnet40.yaml", ["train.learning_rate=0.01"])

The tree itself (sections, original defaults, validation) lives in ``kpconv_tf.config`` so that the
library can read run directories without the training package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kpconv_tf.config import (
    Config,
    ConfigError,
    ModelConfig,  # noqa: F401
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a file in ``training/configs`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} not found (a YAML path or one of {known})")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    return Config.from_yaml(resolve_config_path(name_or_path), overrides)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set train.learning_rate=0.01",
    )
