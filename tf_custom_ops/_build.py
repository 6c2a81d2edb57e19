"""Compiles the C++ ops against the installed TensorFlow, once, into a shared cache.

The library lands in ``$KPCONV_TF_CACHE/ops/<tf version>-<source hash>/kpconv_ops.so`` (default
cache ``~/.cache/kpconv_tf``). Concurrent builders serialise on a file lock and the library
appears by atomic rename, so several processes may import the ops at once.

    python -m tf_custom_ops.build [--quiet]     # build now and print where (see build.py)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "src"
LIBRARY_NAME = "kpconv_ops.so"


class BuildError(RuntimeError):
    """The ops could not be compiled; the message says what to install or shows the compiler output."""


# -fno-math-errno: sqrt need not set errno, so the influence loops vectorise.
COMPILE_FLAGS = (
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-shared",
    "-Wno-deprecated-declarations",
    "-Wno-unused-result",
    "-ffp-contract=off",
    "-fno-math-errno",
)


def _sources():
    return sorted(SOURCE_DIR.glob("*.cc"))


def _source_hash() -> str:
    """Hash of the sources and the flags: changing either builds a new library."""
    digest = hashlib.sha1(" ".join(COMPILE_FLAGS).encode())
    for path in sorted(SOURCE_DIR.glob("*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def library_path() -> Path:
    import tensorflow as tf

    root = Path(os.environ.get("KPCONV_TF_CACHE", Path.home() / ".cache" / "kpconv_tf"))
    return root / "ops" / f"tf{tf.__version__}-{_source_hash()}" / LIBRARY_NAME


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(
            f"no C++ compiler found ({compiler!r} is not on PATH). The kpconv-tf ops are compiled on "
            "first use: install g++ (Debian/Ubuntu: `apt-get install g++`) or set CXX."
        )
    return compiler


def build(force: bool = False, verbose: bool = False) -> Path:
    """Returns the path of the compiled library, compiling it first if needed."""
    import tensorflow as tf

    target = library_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and not force:
            return target
        tmp = target.with_name(f".{LIBRARY_NAME}.{os.getpid()}.tmp")
        command = [
            _compiler(),
            *COMPILE_FLAGS,
            *[str(s) for s in _sources()],
            "-o",
            str(tmp),
            *tf.sysconfig.get_compile_flags(),
            *tf.sysconfig.get_link_flags(),
        ]
        if verbose:
            print(" ".join(command), file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(
                "compiling the kpconv-tf ops failed:\n" + " ".join(command) + "\n" + result.stderr[-8000:]
            )
        os.replace(tmp, target)
    return target


def main(argv=None) -> int:  # the CLI of ``python -m tf_custom_ops.build``
    parser = argparse.ArgumentParser(description="Compile the kpconv-tf custom ops.")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    path = build(force=args.force, verbose=not args.quiet)
    if not args.quiet:
        print(f"kpconv-tf ops: {path}")
    return 0
