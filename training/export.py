"""Exports a run directory (or a run of the original release) as a SavedModel taking raw points.

    python -m training.export RUN_DIR OUT [--checkpoint best] [--fast-cpu]

Signatures (``loaded.signatures[...]``, also callable as ``loaded.<name>(...)``):

* ``serving_default``: ``points`` float32 [N, 3] at any density, ``features`` float32 [N, D] (the
  columns the run's config feeds, ``dataset.in_features_dim``), ``lengths`` int32 [B] (one cloud:
  ``[N]``) -> ``probabilities``: scene segmentation float32 [N, C] for every input point,
  classification [B, C] per cloud. Inside: grid subsampling at ``first_subsampling_dl`` (features
  averaged per cell), the pyramid, the network, softmax, and each input point takes the
  probabilities of its nearest subsampled point. One call is one input sphere or object: large
  scenes are tiled by ``training.predict``.
* ``subsampled``: the same inputs, points already subsampled at ``first_subsampling_dl``
  (what ``training.predict`` feeds per batch of spheres) -> [N, C] / [B, C].
* ``precomputed``: the stacked-batch input dict of ARCHITECTURE.md -> ``probabilities``
  (``loaded.precomputed(inputs)``).

Saved values: ``class_names`` (string [C]), ``task`` ("scene" | "classification" | "objects"),
``config_yaml`` (the run's config), ``portable`` (bool), as variables of the loaded object.

Portable by default: the pyramid, the subsampling and the convolutions use standard TF ops only,
so plain ``tf.saved_model.load`` works without ``tf_custom_ops`` (TF Serving, other runtimes,
converters). ``--fast-cpu`` keeps the compiled ``Kpconv*`` ops (faster on CPU; loading then needs
``import tf_custom_ops`` first).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf
import yaml

from kpconv_tf.config import Config
from kpconv_tf.export import LOADING_NOTE
from kpconv_tf.inputs import input_spec
from kpconv_tf.pyramid import build_pyramid, pyramid_ops

# The nearest subsampled point of an input point is at most its own cell's barycentre away, within
# the cell diagonal; the margin absorbs float32 rounding of the barycentres.
PROJECTION_RADIUS_FACTOR = math.sqrt(3.0) * 1.01
TASKS = ("scene", "classification", "objects")


def grid_subsampling(points, lengths, dl: float, features, implementation: str):
    """Grid subsampling of stacked clouds with features averaged per cell.

    points float32 [N, 3], lengths int32 [B], features float32 [N, D] or None -> (sub_points [M, 3],
    sub_lengths [B], sub_features [M, D] or None), as ``tf_custom_ops.batch_grid_subsampling(...,
    features=)``; ``implementation`` "standard" uses standard TF ops only.
    """
    ops = pyramid_ops(implementation)
    if features is None:
        return (*ops.batch_grid_subsampling(points, lengths, dl), None)
    return ops.batch_grid_subsampling(points, lengths, dl, features=features)


class ExportModule(tf.Module):
    """The exported object: the network's variables, the metadata and the three endpoints."""

    def __init__(
        self,
        network,
        config: Config,
        class_names: Sequence[str],
        task: str,
        neighbor_limits: Sequence[int] | None,
        implementation: str,
    ):
        super().__init__(name="kpconv")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.network = network
        # Listed explicitly: the blocks sit in Python lists that TF's object graph does not follow.
        self.network_variables = list(network.variables)
        self.class_names = tf.Variable([str(n) for n in class_names], trainable=False, name="class_names")
        self.task = tf.Variable(task, trainable=False, name="task")
        self.config_yaml = tf.Variable(
            yaml.safe_dump(config.to_dict(), sort_keys=False), trainable=False, name="config_yaml"
        )
        self.portable = tf.Variable(implementation == "standard", trainable=False, name="portable")
        ops = pyramid_ops(implementation)
        model_config = config.model
        limits = None if neighbor_limits is None else [int(v) for v in neighbor_limits]
        dl = float(model_config.first_subsampling_dl)
        dim = config.dataset.in_features_dim
        segmentation = task != "classification"
        signature = input_spec(config)

        def probabilities(inputs):
            inputs = {k: v for k, v in inputs.items() if k in signature}
            return tf.nn.softmax(network(inputs, training=False), axis=-1)

        def from_subsampled(points, features, lengths):
            pyramid = build_pyramid(
                points, lengths, features, model_config, limits, implementation=implementation
            )
            return probabilities(pyramid)

        def from_points(points, features, lengths):
            sub_points, sub_lengths, sub_features = grid_subsampling(
                points, lengths, dl, features, implementation
            )
            probs = from_subsampled(sub_points, sub_features, sub_lengths)
            if not segmentation:
                return probs
            nearest = ops.batch_neighbors(
                points, sub_points, lengths, sub_lengths, dl * PROJECTION_RADIUS_FACTOR, 1
            )
            # A shadow row for the (unreachable) case of no subsampled point within the radius.
            padded = tf.concat([probs, tf.zeros_like(probs[:1])], 0)
            return tf.gather(padded, nearest[:, 0])

        raw_spec = [
            tf.TensorSpec([None, 3], tf.float32, name="points"),
            tf.TensorSpec([None, dim], tf.float32, name="features"),
            tf.TensorSpec([None], tf.int32, name="lengths"),
        ]
        self.serving_default = tf.function(
            lambda points, features, lengths: {"probabilities": from_points(points, features, lengths)},
            input_signature=raw_spec,
        )
        self.subsampled = tf.function(
            lambda points, features, lengths: {"probabilities": from_subsampled(points, features, lengths)},
            input_signature=raw_spec,
        )
        self.precomputed = tf.function(
            lambda inputs: {"probabilities": probabilities(inputs)}, input_signature=[signature]
        )


def export_network(
    network,
    config: Config,
    path,
    class_names: Sequence[str],
    task: str,
    neighbor_limits=None,
    portable: bool = True,
) -> Path:
    """Writes the SavedModel of the module docstring to ``path`` (replaced whole when complete)."""
    path = Path(path)
    implementation = "standard" if portable else "compiled"
    if portable:
        network.use_standard_ops()
    module = ExportModule(network, config, class_names, task, neighbor_limits, implementation)
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tf.saved_model.save(
            module,
            str(partial),
            signatures={"serving_default": module.serving_default, "subsampled": module.subsampled},
        )
        if not portable:
            Path(partial, "README.txt").write_text(LOADING_NOTE)
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def is_original_run(run: Path) -> bool:
    """An original release's run directory (``parameters.txt``) or one of its checkpoint prefixes."""
    if run.is_dir():
        return (run / "parameters.txt").is_file()
    return (run.parent.parent / "parameters.txt").is_file()


def original_task(config: Config) -> str:
    kind = config.model.network_model
    if kind == "classification":
        return "classification"
    return "scene" if kind == "cloud_segmentation" else "objects"


def export_run(run, out, checkpoint: str = "best", portable: bool = True, log=print) -> Path:
    """Exports a run directory of ``training.train`` or an original run (as ``kpconv_tf.export``)."""
    run = Path(run)
    if is_original_run(run):
        from kpconv_tf.export import load_original_run

        config, network = load_original_run(run)
        num_classes = config.dataset.num_classes
        count = sum(num_classes) if isinstance(num_classes, list) else int(num_classes)
        # The original's parameters.txt keeps no class names.
        class_names, task, limits = [f"class_{i}" for i in range(count)], original_task(config), None
    else:
        from training.datasets.base import SceneDataset
        from training.predict import run_neighbor_limits
        from training.test import load_run

        config, dataset, network = load_run(run, (), checkpoint)
        kind = config.model.network_model
        task = (
            "classification"
            if kind == "classification"
            else ("scene" if isinstance(dataset, SceneDataset) else "objects")
        )
        class_names = list(dataset.label_names)
        limits = run_neighbor_limits(run, config, dataset)
    path = export_network(network, config, out, class_names, task, limits, portable)
    log(
        f"SavedModel ({'portable' if portable else 'compiled ops'}, {task}, {len(class_names)} classes) "
        f"written to {path}"
    )
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (training.train), original run directory or checkpoint")
    parser.add_argument("out", help="output SavedModel directory")
    parser.add_argument("--checkpoint", default="best", help="best, last or epoch_NNNN (run directories)")
    parser.add_argument(
        "--fast-cpu", action="store_true", help="keep the compiled Kpconv* ops (loading needs tf_custom_ops)"
    )
    args = parser.parse_args(argv)
    export_run(args.run, args.out, args.checkpoint, portable=not args.fast_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
