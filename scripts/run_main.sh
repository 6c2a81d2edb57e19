#!/usr/bin/env bash
# Sets up if needed, then runs the main job: KP-CNN trained on the embedded procedural shapes, tested
# with voting, plotted. Extra arguments go to training.train (e.g. --set train.max_epoch=5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="$ROOT/.venv/bin/python"
RUN_DIR="${KPCONV_RUN_DIR:-results/embedded_shapes_$(date +%Y-%m-%d_%H-%M-%S)}"
# The time budget keeps the whole job under 15 minutes on a 2-core CPU; training stops cleanly with
# a checkpoint when it runs out (resume with: python -m training.train --resume RUN_DIR).
"$PY" -m training.train --config embedded_shapes --run-dir "$RUN_DIR" \
    --max-minutes "${KPCONV_TRAIN_MINUTES:-10}" --verbose 2 "$@"
# The last checkpoint: "best" is chosen on the validation split, which is the test split here.
"$PY" -m training.test "$RUN_DIR" --checkpoint last
"$PY" -m utils.plots "$RUN_DIR"
# The run as a user would deploy it: a portable SavedModel, and predictions on new shapes.
"$PY" -m training.export "$RUN_DIR" "$RUN_DIR/exported" --checkpoint last
"$PY" -m training.datasets.embedded_shapes "$RUN_DIR/new_shapes"
"$PY" -m training.predict "$RUN_DIR/exported" "$RUN_DIR/new_shapes" --out "$RUN_DIR/predictions"
echo "run directory: $RUN_DIR (test metrics: $RUN_DIR/test/metrics.json, plots: $RUN_DIR/*.png," \
    "SavedModel: $RUN_DIR/exported, predictions on new shapes: $RUN_DIR/predictions/predictions.csv)"
