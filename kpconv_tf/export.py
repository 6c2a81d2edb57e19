"""SavedModel export of a KP-CNN / KP-FCNN.

The exported module has two signatures:

* ``serving_default`` (raw points): ``points`` float32 [N, 3], ``features`` float32 [N, D],
  ``lengths`` int32 [B] -> ``probabilities`` ([B, C] per cloud for KP-CNN, [N, C] per point for
  KP-FCNN). The input pyramid is built inside with the compiled ops (``kpconv_tf.pyramid``), so the
  points must already be subsampled at ``first_subsampling_dl`` as the training data were.
* ``precomputed``: the stacked-batch input dict (ARCHITECTURE.md) -> ``probabilities``; call it
  as ``loaded.precomputed(inputs)``.

The compiled ops are not part of TensorFlow: load with ``load_exported`` (which imports them), or
``import tf_custom_ops`` before ``tf.saved_model.load``.

    python -m kpconv_tf.export ORIGINAL_RUN_OR_CHECKPOINT OUT_DIR   # from an original run

``python -m training.export`` exports any run (ours or original) with a raw-points signature that
subsamples and projects back inside the graph, portable (no compiled op) by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.inputs import input_spec
from kpconv_tf.pyramid import build_pyramid


def export_saved_model(model, config: Config, path, neighbor_limits=None):
    """Writes the SavedModel with the two signatures described in the module docstring."""
    import keras

    limits = None if neighbor_limits is None else [int(x) for x in neighbor_limits]
    signature = input_spec(config)

    def probabilities(inputs):
        inputs = {k: v for k, v in inputs.items() if k in signature}
        return {"probabilities": tf.nn.softmax(model(inputs, training=False))}

    def from_points(points, features, lengths):
        return probabilities(build_pyramid(points, lengths, features, config.model, limits))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        from_points,
        input_signature=[
            tf.TensorSpec([None, 3], tf.float32, name="points"),
            tf.TensorSpec([None, config.dataset.in_features_dim], tf.float32, name="features"),
            tf.TensorSpec([None], tf.int32, name="lengths"),
        ],
    )
    archive.add_endpoint("precomputed", probabilities, input_signature=[signature])
    archive.write_out(str(path), verbose=False)
    # TensorFlow reports a missing custom op before any code of ours runs; this file is what a user
    # finds next to saved_model.pb when "Op type not registered 'KpconvBatchNeighbors'" appears.
    Path(path, "README.txt").write_text(LOADING_NOTE)
    return path


LOADING_NOTE = """This SavedModel uses the compiled ops of kpconv-tf: KpconvBatchNeighbors and
KpconvBatchGridSubsampling in its serving_default signature and, when it was exported on a machine
without a visible GPU, KpconvKernelAggregate in both signatures. Register them before loading:

    import tf_custom_ops            # from the kpconv-tf repository (built on first import)
    model = tf.saved_model.load(PATH)

or use kpconv_tf.export.load_exported(PATH). Without them TensorFlow stops with
"Op type not registered 'Kpconv...'".
"""


def load_exported(path):
    """Loads an exported SavedModel, registering the compiled ops first."""
    import tf_custom_ops  # noqa: F401  (registers the Kpconv* ops)

    return tf.saved_model.load(str(path))


def load_original_run(run):
    """(config, model) of an original run directory (its newest snapshot) or checkpoint prefix."""
    from kpconv_tf import convert

    run = Path(run)
    params = run / "parameters.txt" if run.is_dir() else run.parent.parent / "parameters.txt"
    config = convert.config_from_original(params)
    checkpoint = convert.latest_snapshot(run) if run.is_dir() else run
    return config, convert.load_original_checkpoint(checkpoint, config)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export an original KPConv run as a SavedModel.")
    parser.add_argument(
        "run", help="original run directory (parameters.txt + snapshots/) or a checkpoint prefix"
    )
    parser.add_argument("out", help="output SavedModel directory")
    args = parser.parse_args(argv)
    config, model = load_original_run(args.run)
    export_saved_model(model, config, args.out)
    print(f"SavedModel written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
