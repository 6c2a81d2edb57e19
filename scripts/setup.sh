#!/usr/bin/env bash
# Creates (once) the Python environment and compiles the custom ops; safe to re-run.
# The environment is cached outside the clone, keyed by the requirement files, so every clone on
# this machine reuses it. The project runs from the clone (PYTHONPATH) and is never installed into
# the shared environment, so clones cannot step on each other.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KPCONV_TF_CACHE:-$HOME/.cache/kpconv_tf}"
PYTHON="${PYTHON:-python3}"
KEY="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | sha1sum | cut -c1-12)"
VENV="${KPCONV_TF_VENV:-$CACHE/venv-$KEY}"

mkdir -p "$CACHE"
(
  flock 9
  if [ ! -f "$VENV/.complete" ]; then
    echo "[setup] creating the Python environment in $VENV (first time only, a few minutes)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
    touch "$VENV/.complete"
  fi
) 9>"$CACHE/.setup.lock"
ln -sfn "$VENV" "$ROOT/.venv"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
"$ROOT/.venv/bin/python" -m tf_custom_ops.build --quiet
