"""Tests a trained run with voting and writes ``RUN_DIR/test/metrics.json``.

    python -m training.test RUN_DIR [--votes N] [--split test] [--checkpoint best|last]
    python -m training.test --original-run ORIGINAL_LOG_DIR --set dataset.path=DATA [--out DIR]

Objects: N augmented passes over the split, softmax probabilities averaged per object (per point
for part segmentation, whose metrics are the instance and class mIoU of the paper's Table 1).
Scenes: spheres placed by potentials until every point has been covered N times (the potentials'
minimum reaches N), probabilities smoothed with the original's 0.98 running average, reprojected to
the full-resolution clouds and written as ``.ply`` (plus the Semantic3D / NPM3D submission formats
for those datasets). Unlabelled clouds get predictions only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from kpconv_tf import metrics
from kpconv_tf.config import Config
from kpconv_tf.inputs import layer_keys
from kpconv_tf.models import build_network
from training.config import add_override_argument
from training.datasets import configure, load_dataset
from training.pipeline import Pipeline
from training.run_store import CheckpointError, RunStore, read_checkpoint
from training.train import checkpoint_for
from training.trainer import TrainingModel

SUBMISSION_FORMATS = {"Semantic3D": ("ply", "semantic3d"), "NPM3D": ("ply", "npm3d")}


def load_run(run_dir: Path, overrides=(), checkpoint="best"):
    """(config, dataset, network) of a run directory, weights restored from its checkpoint called
    ``checkpoint`` (``best``, ``last``, ``epoch_NNNN``; ``best`` falls back to ``last``) or from
    ``model.weights.h5`` (converted original runs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: not a run directory")
    config = Config.from_yaml(run_dir / "config.yaml", list(overrides))
    dataset = load_dataset(config)
    configure(config, dataset)
    network = build_network(config)
    if (run_dir / "model.weights.h5").exists() and not (run_dir / "checkpoints").exists():
        network.load_weights(run_dir / "model.weights.h5")
        return config, dataset, network
    store = RunStore(run_dir)
    try:
        prefix = store.prefix(checkpoint)
    except CheckpointError:
        if checkpoint != "best":
            raise
        prefix = store.prefix("last")  # a run without validation has no best
    read_checkpoint(checkpoint_for(TrainingModel(network, config)), prefix, exact=False)
    return config, dataset, network


def _predictor(network):
    @tf.function(reduce_retracing=True)
    def predict(inputs):
        return tf.nn.softmax(network(inputs, training=False), axis=-1)

    return predict


def test_objects(pipeline: Pipeline, network, votes: int, split: str, seed: int, log=print):
    """Vote over ``votes`` augmented passes; returns (probabilities per cloud, labels per cloud)."""
    clouds = pipeline.data.clouds(split)
    segmentation = pipeline.task != "classification"
    if segmentation:
        probs = [None] * len(clouds)
    else:
        probs = np.zeros((len(clouds), network.classifier.filters), np.float64)
    predict = _predictor(network)
    for vote in range(votes):
        stream = pipeline.stream(split, "sequential", seed=seed + vote)
        for inputs, _, meta in pipeline.tf_dataset(
            stream, pipeline.neighbor_limits, True, seed + 1000 + vote
        ):
            p = predict(inputs).numpy()
            cloud_indices = meta["cloud_indices"].numpy()
            if not segmentation:
                probs[cloud_indices] += p
                continue
            offsets = np.concatenate([[0], np.cumsum(inputs[layer_keys(0).lengths].numpy())])
            point_indices = meta["point_indices"].numpy()
            for b, c in enumerate(cloud_indices):
                rows = slice(offsets[b], offsets[b + 1])
                if probs[c] is None:
                    probs[c] = np.zeros((len(clouds[c].points), p.shape[1]), np.float64)
                probs[c][point_indices[rows]] += p[rows]
        if not segmentation:
            accuracy = np.mean(np.argmax(probs, 1) == np.array([c.label for c in clouds]))
            log(f"vote {vote + 1}/{votes}: accuracy {accuracy:.4f}")
        else:
            log(f"vote {vote + 1}/{votes}")
    return probs, clouds


def object_metrics(pipeline, probs, clouds):
    data = pipeline.data
    if pipeline.task == "classification":
        labels = np.array([c.label for c in clouds])
        conf = metrics.confusion_matrix(labels, np.argmax(probs, 1), len(data.label_names))
        return {**metrics.summarize(conf, data.label_names), "class_names": list(data.label_names)}
    ious, categories = [], []
    parts_per_category = data.num_parts if pipeline.task == "multi_segmentation" else [data.num_parts[0]]
    for cloud, p in zip(clouds, probs):
        category = cloud.label if pipeline.task == "multi_segmentation" else 0
        predictions = np.argmax(p, 1)
        ious.append(metrics.shape_part_ious(cloud.point_labels, predictions, parts_per_category[category]))
        categories.append(category)
    names = list(data.label_names) if pipeline.task == "multi_segmentation" else list(data.label_names[:1])
    result = metrics.part_segmentation_summary(np.array(ious), np.array(categories), names)
    result["class_names"] = names
    return result


def test_scenes(pipeline: Pipeline, network, votes: float, split: str, seed: int, out_dir: Path, log=print):
    """Potential-driven sphere testing; returns the metrics dict (empty when no scene is labelled)."""
    from training.scenes import SceneVoter, write_predictions

    data = pipeline.data
    num_classes = len(data.label_names)
    stream = pipeline.stream(split, "potentials", seed=seed)
    voter = SceneVoter(stream.scenes, num_classes, smoothing=0.98)
    predict = _predictor(network)
    last_report = time.time()
    for inputs, _, meta in pipeline.tf_dataset(stream, pipeline.neighbor_limits, True, seed):
        p = predict(inputs).numpy()
        offsets = np.concatenate([[0], np.cumsum(inputs[layer_keys(0).lengths].numpy())])
        point_indices = meta["point_indices"].numpy()
        for b, scene_index in enumerate(meta["cloud_indices"].numpy()):
            rows = slice(offsets[b], offsets[b + 1])
            voter.update(int(scene_index), point_indices[rows], p[rows])
        coverage = stream.sampler.min_potential()
        if time.time() - last_report > 10:
            log(f"min potential {coverage:.2f} / {votes}")
            last_report = time.time()
        if coverage >= votes:
            break
    formats = SUBMISSION_FORMATS.get(data.name, ("ply",))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    labelled = False
    for index, scene in enumerate(stream.scenes):
        full = voter.full_predictions(index)
        write_predictions(out_dir / "predictions", scene, full, data.label_names, formats=formats)
        labels = scene.full_labels if scene.full_labels is not None else scene.labels
        if labels is not None and scene.projection is None and len(labels) != len(full):
            labels = None
        if labels is not None:
            labelled = True
            confusion += metrics.confusion_matrix(labels, full, num_classes)
    if not labelled:
        return {"class_names": list(data.label_names), "note": "unlabelled split: predictions only"}
    return {**metrics.summarize(confusion, data.label_names), "class_names": list(data.label_names)}


def print_table(result: dict, log=print):
    for key in ("overall_accuracy", "mean_iou", "mean_recall", "instance_miou", "class_miou"):
        if result.get(key) is not None:
            log(f"{key:>18}: {100 * result[key]:6.2f}")
    per_class = result.get("per_class_iou") or result.get("per_category_miou") or {}
    for name, value in per_class.items():
        log(f"{name:>18}: {'  n/a' if value is None else f'{100 * value:6.2f}'}")


def run_test(run_dir, votes=None, split="test", checkpoint="best", overrides=(), out_dir=None, log=print):
    """Tests a run directory; writes and returns ``<out_dir or RUN_DIR/test>/metrics.json`` content."""
    run_dir = Path(run_dir)
    config, dataset, network = load_run(run_dir, overrides, checkpoint)
    pipeline = Pipeline(dataset, config)
    out_dir = Path(out_dir) if out_dir else run_dir / "test"
    out_dir.mkdir(parents=True, exist_ok=True)
    votes = config.train.votes if votes is None else votes
    seed = config.train.seed + 7919
    start = time.time()
    if pipeline.is_scene:
        result = test_scenes(pipeline, network, votes, split, seed, out_dir, log)
    else:
        probs, clouds = test_objects(pipeline, network, votes, split, seed, log)
        result = object_metrics(pipeline, probs, clouds)
    result.update(
        {"votes": votes, "split": split, "checkpoint": checkpoint, "seconds": round(time.time() - start, 1)}
    )
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(result, f, indent=1)
    print_table(result, log)
    if "confusion" in result:
        from utils.plots import plot_confusion

        plot_confusion(out_dir / "metrics.json", out_dir / "confusion.png")
    log(f"metrics: {out_dir / 'metrics.json'}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.test", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="run directory written by training.train")
    parser.add_argument(
        "--votes",
        type=float,
        default=None,
        help="augmented passes (objects) or coverage (scenes); default train.votes",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best", help="best, last or epoch_NNNN (a snapshot)")
    parser.add_argument("--original-run", help="a log directory of the original release (converted first)")
    parser.add_argument("--out", help="output directory (default RUN_DIR/test, or a new directory)")
    add_override_argument(parser)
    args = parser.parse_args(argv)
    votes = (
        None if args.votes is None else (int(args.votes) if float(args.votes).is_integer() else args.votes)
    )
    if args.original_run:
        from kpconv_tf.convert import convert_run

        converted = Path(args.out or tempfile.mkdtemp(prefix="kpconv_original_"))
        convert_run(args.original_run, converted)
        run_test(converted, votes, args.split, args.checkpoint, args.overrides, converted / "test")
        return 0
    if not args.run_dir:
        parser.error("RUN_DIR or --original-run is required")
    run_test(args.run_dir, votes, args.split, args.checkpoint, args.overrides, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
