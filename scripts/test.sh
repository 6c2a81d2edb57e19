#!/usr/bin/env bash
# Sets up if needed, then runs the whole test suite (slow end-to-end checks included).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not slow" or tests/test_ops.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Lint and format checks first: they take a second and keep the tree as ruff formats it.
"$ROOT/.venv/bin/ruff" check --quiet .
"$ROOT/.venv/bin/ruff" format --check --quiet .
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
