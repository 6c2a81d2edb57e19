"""Where kpconv-tf keeps what it computes once: ``$KPCONV_TF_CACHE`` (default ``~/.cache/kpconv_tf``).

Subfolders: ``kernels`` (kernel point dispositions), ``datasets`` (subsampled clouds),
``datasets/calibration`` (batch and neighbour limits); the compiled op library under ``ops``
(``tf_custom_ops._build`` reads the same variable itself: it runs before this package is importable).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """The cache root; never inside the dataset or the working directory."""
    return Path(os.environ.get("KPCONV_TF_CACHE", Path.home() / ".cache" / "kpconv_tf"))
