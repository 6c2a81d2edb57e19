"""Predicts on one's own point clouds with a trained run directory or an exported SavedModel.

    python -m training.predict MODEL INPUT... --out DIR [--checkpoint best] [--votes N]
        [--columns x,y,z,r,g,b] [--features file|ones] [--probabilities] [--top-k 3] [--strict]

MODEL: a run directory of ``training.train`` (or a converted original run) or a SavedModel written by
``training.export``. INPUT: point files (``utils.point_files.POINT_FILE_SUFFIXES``) or folders of them.

Scene segmentation: the cloud is grid-subsampled at ``first_subsampling_dl``, covered by input spheres
of ``dataset.in_radius`` placed by potentials (``training.scenes.SphereSampler``) until every
subsampled point is covered ``--votes`` times, probabilities are smoothed per subsampled point as
``training.test`` does (0.98 running average) and projected to every input point (nearest subsampled
point). Written: ``DIR/<name>.ply`` with the input fields, ``pred`` (class index) and, with
``--probabilities``, one field per class; for LAS input also ``DIR/<name>.las`` with ``classification``
set. Classification: ``DIR/predictions.csv`` and ``.json`` (label and top-k probabilities per file).

Spheres are not augmented and colours are never dropped (as ``utils.visualize``): a prediction depends
on the model, the input and ``--seed`` only. Memory holds the input cloud, its subsampled copy and the
probabilities of the subsampled points; spheres are streamed ``--batch-spheres`` at a time. Outputs
are written under temporary names and renamed when complete, so an interrupted run leaves none. A bad
input file is reported and skipped (``--strict``: stop at the first); the exit status is 1 when any
input failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from kpconv_tf.config import Config

# Features of scene models that hold colours (training.pipeline._features).
COLOR_FEATURE_DIMS = (3, 4, 5, 7)
PROJECTION_CHUNK = 1_000_000


class PredictError(ValueError):
    """A model or an input that predict cannot use; the message names it."""


# ----------------------------------------------------------------------------------------------
# models


class Model:
    """A network as predict drives it.

    config: the run's Config; class_names: C names; task: "scene" | "classification";
    ``probabilities(points, features, lengths)``: points float32 [N, 3] already subsampled at
    ``first_subsampling_dl`` (stacked clouds or spheres), features float32 [N, D], lengths int32 [B]
    -> float32 [N, C] (scene) or [B, C] (classification).
    """

    config: Config
    class_names: list[str]
    task: str

    def probabilities(self, points, features, lengths) -> np.ndarray:
        raise NotImplementedError


def _task(network_model: str, is_scene: bool) -> str:
    if network_model == "classification":
        return "classification"
    if network_model == "segmentation" and is_scene:
        return "scene"
    raise PredictError(
        f"predict handles scene segmentation and classification models, not "
        f"{'object ' if not is_scene else ''}{network_model}"
    )


class RunModel(Model):
    """A run directory's network (``training.test.load_run``) with the run's neighbour limits;
    ``implementation`` "standard": the pyramid and the convolutions on standard TF ops only (as a
    portable SavedModel computes), "compiled": the compiled ops where the layers choose them."""

    def __init__(self, run_dir, checkpoint="best", implementation="compiled"):
        from kpconv_tf.pyramid import build_pyramid
        from training.datasets.base import SceneDataset
        from training.test import load_run

        run_dir = Path(run_dir)
        self.config, dataset, network = load_run(run_dir, (), checkpoint)
        if implementation == "standard":
            network.use_standard_ops()
        self.class_names = [str(n) for n in dataset.label_names]
        self.task = _task(self.config.model.network_model, isinstance(dataset, SceneDataset))
        self.neighbor_limits = run_neighbor_limits(run_dir, self.config, dataset)
        model_config, limits = self.config.model, self.neighbor_limits

        @tf.function(reduce_retracing=True)
        def predict(points, features, lengths):
            inputs = build_pyramid(
                points, lengths, features, model_config, limits, implementation=implementation
            )
            return tf.nn.softmax(network(inputs, training=False), axis=-1)

        self._predict = predict

    def probabilities(self, points, features, lengths):
        return self._predict(
            tf.constant(points, tf.float32), tf.constant(features, tf.float32), tf.constant(lengths, tf.int32)
        ).numpy()


def run_neighbor_limits(run_dir: Path, config: Config, dataset) -> list[int]:
    """The run's calibrated neighbour limits (``calibration.json``, else the calibration cache)."""
    calibration = Path(run_dir) / "calibration.json"
    limits = None
    if calibration.is_file():
        limits = json.loads(calibration.read_text()).get("neighbor_limits")
    if not limits or len(limits) < config.model.num_layers:
        from training.pipeline import Pipeline

        limits = Pipeline(dataset, config).neighbor_limits
    return [int(v) for v in limits]


class SavedModelModel(Model):
    """A SavedModel of ``training.export``: its ``subsampled`` endpoint and its saved metadata."""

    def __init__(self, path):
        path = Path(path)
        try:
            loaded = tf.saved_model.load(str(path))
        except (tf.errors.NotFoundError, ValueError) as err:
            if "Kpconv" not in str(err):
                raise
            import tf_custom_ops  # noqa: F401  (a --fast-cpu export: registers the Kpconv* ops)

            loaded = tf.saved_model.load(str(path))
        if not hasattr(loaded, "config_yaml") or not hasattr(loaded, "subsampled"):
            raise PredictError(f"{path}: not a SavedModel of training.export (no config_yaml / subsampled)")
        import yaml

        self.config = Config.from_dict(yaml.safe_load(loaded.config_yaml.numpy().decode()))
        self.class_names = [n.decode() for n in loaded.class_names.numpy()]
        self.task = loaded.task.numpy().decode()
        if self.task not in ("scene", "classification"):
            raise PredictError(
                f"{path}: predict handles scene segmentation and classification models, not {self.task!r}"
            )
        self._loaded = loaded

    def probabilities(self, points, features, lengths):
        out = self._loaded.subsampled(
            tf.constant(points, tf.float32), tf.constant(features, tf.float32), tf.constant(lengths, tf.int32)
        )
        return out["probabilities"].numpy()


def open_model(path, checkpoint="best", implementation="compiled") -> Model:
    """A RunModel for a run directory (``config.yaml``), a SavedModelModel for a SavedModel."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return SavedModelModel(path)
    if (path / "config.yaml").is_file():
        return RunModel(path, checkpoint, implementation)
    raise PredictError(
        f"MODEL {path}: neither a run directory (config.yaml) nor a SavedModel (saved_model.pb)"
    )


# ----------------------------------------------------------------------------------------------
# inputs


def input_files(inputs: Sequence, suffixes: Sequence[str]) -> list[Path]:
    """Files named in ``inputs``; a folder stands for its files with a known suffix (sorted)."""
    files = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in suffixes))
        else:
            files.append(item)  # missing or unknown: the reader names it
    return files


def scene_colors(point_file, uses_colors: bool, fill_ones: bool) -> np.ndarray | None:
    """float32 [n, 3] colours in [0, 1] the model needs, None when it uses none."""
    from utils.point_files import PointFileError, colors_of

    if not uses_colors:
        return None
    colors = colors_of(point_file)
    if colors is not None:
        return np.asarray(colors, np.float32)
    if fill_ones:
        return np.ones((len(point_file.points), 3), np.float32)
    raise PointFileError(
        f"{point_file.path}: the model uses colours (red, green, blue) but the file has "
        f"none; pass --features ones to feed white instead"
    )


def object_normals(point_file, needs_normals: bool) -> np.ndarray | None:
    """float32 [n, 3] normals (fields nx, ny, nz) for models with normal features, else None."""
    from utils.point_files import PointFileError

    if not needs_normals:
        return None
    names = ("nx", "ny", "nz")
    if not all(n in point_file.fields for n in names):
        raise PointFileError(
            f"{point_file.path}: the model uses normals but the file has no nx, ny, nz fields"
        )
    return np.stack([np.asarray(point_file.fields[n], np.float32) for n in names], 1)


# ----------------------------------------------------------------------------------------------
# progress


class Progress:
    """A one-line text bar: share done, points fed to the network per second and the ETA."""

    def __init__(self, name: str, stream=sys.stderr, width=30):
        self.name, self.stream, self.width = name, stream, width
        self.start = time.time()
        self.last = 0.0
        self.interactive = getattr(stream, "isatty", lambda: False)()

    def update(self, done: float, points: int, final=False):
        now = time.time()
        # A log file gets a line every 10 s, a terminal a redraw every 0.2 s.
        if not final and now - self.last < (0.2 if self.interactive else 10.0):
            return
        self.last = now
        done = min(max(done, 0.0), 1.0)
        elapsed = now - self.start
        rate = points / elapsed if elapsed > 0 else 0.0
        eta = f"{elapsed * (1 - done) / done:5.0f} s" if done > 0.01 else "    ?"
        bar = "=" * int(self.width * done)
        text = (
            f"{self.name} [{bar:<{self.width}}] {100 * done:5.1f}% {rate:,.0f} points/s ETA {eta}"
            if not final
            else f"{self.name} [{bar:<{self.width}}] done in {elapsed:.1f} s, {rate:,.0f} points/s"
        )
        end = "\n" if final or not self.interactive else ""
        self.stream.write(("\r" if self.interactive else "") + text + end)
        self.stream.flush()


# ----------------------------------------------------------------------------------------------
# scenes


@dataclass
class ScenePrediction:
    """sub_probabilities float32 [m, C]: smoothed votes of the m subsampled points, rows normalised
    to 1; projection int32 [n]: nearest subsampled point of every input point; pred int32 [n];
    coverage int32 [m]: predictions averaged into each subsampled point; spheres: spheres fed."""

    sub_probabilities: np.ndarray
    projection: np.ndarray
    pred: np.ndarray
    coverage: np.ndarray
    spheres: int

    def probabilities(self, class_index: int) -> np.ndarray:
        """float32 [n]: probability of one class for every input point (one column at a time, so a
        huge cloud never holds [n, C])."""
        return self.sub_probabilities[self.projection, class_index]


def subsample_cloud(points: np.ndarray, colors: np.ndarray | None, dl: float, implementation: str):
    """Grid subsampling of one cloud: (float32 [m, 3], float32 [m, 3] averaged colours or None)."""
    from training.export import grid_subsampling

    lengths = tf.constant([len(points)], tf.int32)
    sub_points, _, sub_colors = grid_subsampling(
        tf.constant(points, tf.float32), lengths, dl, colors, implementation
    )
    return sub_points.numpy(), None if sub_colors is None else sub_colors.numpy()


def predict_scene(
    model: Model,
    points: np.ndarray,
    colors: np.ndarray | None,
    votes: float,
    batch_spheres: int,
    seed: int = 0,
    implementation="compiled",
    progress=None,
    name="scene",
) -> ScenePrediction:
    """Votes over potential-placed spheres; points float64 [n, 3] (metres), colors float32 [n, 3]."""
    from sklearn.neighbors import KDTree

    from training.datasets.base import Scene
    from training.scenes import SceneVoter, SphereSampler, features_for

    config = model.config
    # float32 cannot hold georeferenced x, y to the millimetre: work relative to the cloud's corner.
    # z stays absolute, as the height features of the training data are.
    origin = np.array([points[:, 0].min(), points[:, 1].min(), 0.0])
    local = (points - origin).astype(np.float32)
    sub_points, sub_colors = subsample_cloud(local, colors, config.model.first_subsampling_dl, implementation)
    if sub_colors is None:
        sub_colors = np.zeros_like(sub_points)
    tree = KDTree(sub_points)
    scene = Scene(name=name, points=sub_points, colors=sub_colors, labels=None, tree=tree)
    sampler = SphereSampler([scene], config.dataset.in_radius, mode="potentials", seed=seed)
    voter = SceneVoter([scene], len(model.class_names), smoothing=0.98)
    coverage = np.zeros(len(sub_points), np.int32)
    dim = config.dataset.in_features_dim
    spheres = fed = 0
    while sampler.min_potential() < votes:
        crops = [sampler.sample() for _ in range(batch_spheres)]
        lengths = np.array([len(c.points) for c in crops], np.int32)
        probs = model.probabilities(
            np.concatenate([c.points for c in crops]),
            np.concatenate([features_for(c, dim) for c in crops]),
            lengths,
        )
        start = 0
        for crop, n in zip(crops, lengths):
            voter.update(0, crop.input_indices, probs[start : start + n])
            coverage[crop.input_indices] += 1
            start += n
        spheres += len(crops)
        fed += int(lengths.sum())
        if progress is not None:
            progress.update(sampler.min_potential() / votes, fed)
    if progress is not None:
        progress.update(1.0, fed, final=True)
    projection = np.empty(len(local), np.int32)
    for start in range(0, len(local), PROJECTION_CHUNK):
        rows = slice(start, start + PROJECTION_CHUNK)
        projection[rows] = tree.query(local[rows], k=1, return_distance=False)[:, 0]
    # The running average starts from zeros (training.test): its rows sum to 1 - 0.98^k, not 1.
    smoothed = voter.probs[0]
    smoothed = smoothed / np.maximum(smoothed.sum(1, keepdims=True), np.finfo(np.float32).tiny)
    pred = np.argmax(smoothed, 1).astype(np.int32)[projection]
    return ScenePrediction(smoothed, projection, pred, coverage, spheres)


def probability_field_names(class_names: Sequence[str], taken: Sequence[str]) -> list[str]:
    """One field name per class: the class name with non-word characters as ``_``; ``prob_<name>``
    when that name is taken by an input field (or x, y, z, pred)."""
    names = [re.sub(r"\W+", "_", str(n)).strip("_") or f"class_{i}" for i, n in enumerate(class_names)]
    taken = set(taken) | {"x", "y", "z", "pred"}
    names = [f"prob_{n}" if n in taken else n for n in names]
    if len(set(names)) != len(names):
        names = [f"prob_{i}" for i in range(len(names))]
    return names


def _partial_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` that keeps its suffix (the writers go by it)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def write_outputs(outputs: dict[Path, tuple]) -> list[Path]:
    """Writes every ``path: (points, fields, las_header)`` under a temporary name, then renames them
    all; on any failure (or Ctrl-C) the temporary files are removed and nothing is renamed."""
    from utils.point_files import write_point_file

    partial = {path: _partial_name(path) for path in outputs}
    try:
        for path, (points, fields, header) in outputs.items():
            write_point_file(partial[path], points, fields, las_header=header)
        for path in outputs:
            os.replace(partial[path], path)
    finally:
        for tmp in partial.values():
            if tmp.exists():
                tmp.unlink()
    return list(outputs)


def class_counts(pred: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(pred, minlength=len(class_names))
    return {str(name): int(c) for name, c in zip(class_names, counts)}


def predict_scene_file(model: Model, path: Path, out_dir: Path, out_name: str, args, log=print) -> list[Path]:
    """Predicts one scene file and writes its outputs; returns the written paths."""
    from utils.point_files import read_point_file

    point_file = read_point_file(path, columns=args.columns)
    uses_colors = model.config.dataset.in_features_dim in COLOR_FEATURE_DIMS
    colors = scene_colors(point_file, uses_colors, args.features == "ones")
    votes = model.config.train.votes if args.votes is None else args.votes
    result = predict_scene(
        model,
        np.asarray(point_file.points, np.float64),
        colors,
        votes,
        args.batch_spheres or model.config.train.batch_num,
        args.seed,
        args.implementation,
        Progress(path.name),
        name=path.stem,
    )
    fields = dict(point_file.fields)
    fields["pred"] = result.pred
    if args.probabilities:
        names = probability_field_names(model.class_names, list(point_file.fields))
        fields.update({n: result.probabilities(i) for i, n in enumerate(names)})
    outputs = {out_dir / f"{out_name}.ply": (point_file.points, fields, None)}
    if point_file.las_header is not None:
        las_fields = dict(point_file.fields, classification=result.pred.astype(np.uint8))
        outputs[out_dir / f"{out_name}.las"] = (point_file.points, las_fields, point_file.las_header)
    written = write_outputs(outputs)
    log(
        f"{path}: {len(result.pred)} points ({len(result.coverage)} subsampled, {result.spheres} spheres, "
        f"every subsampled point predicted >= {int(result.coverage.min())} times) -> "
        f"{', '.join(str(p) for p in written)}"
    )
    total = len(result.pred)
    for name, count in class_counts(result.pred, model.class_names).items():
        log(f"  {name:>20}: {count:>10} ({100 * count / total:5.1f}%)")
    return written


# ----------------------------------------------------------------------------------------------
# objects


def classify_file(model: Model, path: Path, args) -> np.ndarray:
    """float32 [C] class probabilities of one object file."""
    from training.export import grid_subsampling
    from utils.point_files import read_point_file

    point_file = read_point_file(path, columns=args.columns)
    points = np.asarray(point_file.points, np.float64)
    normals = object_normals(point_file, model.config.dataset.in_features_dim == 4)
    if model.config.dataset.in_features_dim not in (1, 4):
        raise PredictError(
            f"dataset.in_features_dim {model.config.dataset.in_features_dim}: object models use 1 or 4"
        )
    # Centred so that float32 keeps the object's detail; the network does not see translations.
    local = (points - points.mean(0)).astype(np.float32)
    lengths = tf.constant([len(local)], tf.int32)
    sub_points, sub_lengths, sub_normals = grid_subsampling(
        tf.constant(local), lengths, model.config.model.first_subsampling_dl, normals, args.implementation
    )
    features = np.ones((len(sub_points), 1), np.float32)
    if sub_normals is not None:
        features = np.concatenate([features, sub_normals.numpy()], 1)
    return model.probabilities(sub_points.numpy(), features, sub_lengths.numpy())[0]


def write_classifications(rows: list[dict], out_dir: Path) -> list[Path]:
    """``predictions.csv`` and ``predictions.json`` (temporary names, then renamed)."""
    paths = [out_dir / "predictions.csv", out_dir / "predictions.json"]
    partial = [_partial_name(p) for p in paths]
    try:
        with open(partial[0], "w", newline="") as f:
            k = len(rows[0]["top"]) if rows else 0
            writer = csv.writer(f)
            writer.writerow(
                ["file", "label", "probability"]
                + [f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "probability")]
            )
            for row in rows:
                top = [v for item in row["top"] for v in (item["label"], f"{item['probability']:.6f}")]
                writer.writerow([row["file"], row["label"], f"{row['probability']:.6f}", *top])
        with open(partial[1], "w") as f:
            json.dump(rows, f, indent=1)
        for tmp, path in zip(partial, paths):
            os.replace(tmp, path)
    finally:
        for tmp in partial:
            if tmp.exists():
                tmp.unlink()
    return paths


# ----------------------------------------------------------------------------------------------
# command line


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """Output base name per input: its stem, ``<stem>_<suffix>`` when two inputs share a stem."""
    stems = [f.stem for f in files]
    return {
        f: (f.stem if stems.count(f.stem) == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}") for f in files
    }


def predict(args, log=print, error=None) -> int:
    """Runs the prediction described by parsed ``args``; returns the exit status (1: an input failed)."""
    from utils.point_files import POINT_FILE_SUFFIXES, PointFileError

    error = error or (lambda text: print(text, file=sys.stderr))
    if args.implementation is None:
        # A SavedModel is usually run where the compiled ops are not built.
        saved = (Path(args.model) / "saved_model.pb").is_file()
        args.implementation = "standard" if saved else "compiled"
    model = open_model(args.model, args.checkpoint, args.implementation)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = input_files(args.inputs, POINT_FILE_SUFFIXES)
    if not files:
        raise PredictError(f"no point files ({', '.join(POINT_FILE_SUFFIXES)}) in {list(args.inputs)}")
    names = output_names(files)
    failed, rows = [], []
    for path in files:
        try:
            if model.task == "scene":
                predict_scene_file(model, path, out_dir, names[path], args, log)
                continue
            probs = classify_file(model, path, args)
            order = np.argsort(-probs, kind="stable")[: args.top_k]
            top = [{"label": model.class_names[i], "probability": float(probs[i])} for i in order]
            rows.append(
                {
                    "file": str(path),
                    "label": top[0]["label"],
                    "probability": top[0]["probability"],
                    "top": top,
                }
            )
            log(f"{path}: {rows[-1]['label']} ({rows[-1]['probability']:.3f})")
        except (PointFileError, PredictError, OSError) as err:
            failed.append(path)
            error(f"error: {err}" if str(path) in str(err) else f"error: {path}: {err}")
            if args.strict:
                break
    if model.task == "classification" and rows:
        for path in write_classifications(rows, out_dir):
            log(f"written {path}")
    if failed:
        error(f"{len(failed)} of {len(files)} inputs failed: {', '.join(str(p) for p in failed)}")
        return 1
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="run directory or SavedModel directory (training.export)")
    parser.add_argument("inputs", nargs="+", help="point files or folders of point files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--checkpoint", default="best", help="run directories: best, last or epoch_NNNN")
    parser.add_argument(
        "--votes",
        type=float,
        default=None,
        help="scenes: coverage every subsampled point reaches (default train.votes)",
    )
    parser.add_argument(
        "--columns",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=None,
        help="columns of .txt/.xyz/.csv/.npy files, e.g. x,y,z,r,g,b",
    )
    parser.add_argument(
        "--features",
        choices=("file", "ones"),
        default="file",
        help="'ones': feed white to a colour model for files without colours",
    )
    parser.add_argument("--probabilities", action="store_true", help="scenes: add one field per class")
    parser.add_argument("--top-k", type=int, default=3, help="classification: probabilities listed per file")
    parser.add_argument(
        "--batch-spheres",
        type=int,
        default=None,
        help="scenes: spheres per network call (default train.batch_num)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the sphere placement")
    parser.add_argument(
        "--implementation",
        choices=("compiled", "standard"),
        default=None,
        help="subsampling, neighbours and (run directories) convolutions: the compiled "
        "ops (default for run directories) or standard TF ops (default for SavedModels)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if args.votes is not None and not args.votes > 0:
        parser.error("--votes must be > 0")
    if args.batch_spheres is not None and args.batch_spheres < 1:
        parser.error("--batch-spheres must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return predict(args)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the input being predicted left no output file", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
