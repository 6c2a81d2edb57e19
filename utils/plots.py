"""Convergence curves and confusion matrices of training runs, written as PNG files.

A run directory holds ``training_log.csv`` (header row, one row per epoch, column ``epoch`` plus
any of ``loss``, ``output_loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``val_mean_iou``,
``learning_rate``; other columns are ignored) and optionally ``test/metrics.json`` (as written by
``kpconv_tf.metrics.summarize``: ``confusion`` and ``class_names``).

    python -m utils.plots RUN_DIR [RUN_DIR ...] [--out DIR]

writes ``convergence_<quantity>.png`` (all runs on one figure per quantity) into ``--out`` or the
first run directory, and ``confusion_matrix.png`` into each run directory that has test metrics
(``confusion_matrix_<run name>.png`` in ``--out`` when given). Figures are drawn with matplotlib's
Agg canvas, so no display is needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOG_NAME = "training_log.csv"
METRICS_PATH = Path("test") / "metrics.json"

# quantity -> (y label, log scale, ((column, series label, line style), ...))
QUANTITIES = {
    "loss": (
        "loss",
        True,
        (("loss", "train", "-"), ("output_loss", "train output", ":"), ("val_loss", "validation", "--")),
    ),
    "accuracy": ("accuracy", False, (("accuracy", "train", "-"), ("val_accuracy", "validation", "--"))),
    "miou": ("mean IoU", False, (("val_mean_iou", "validation", "--"),)),
    "learning_rate": ("learning rate", True, (("learning_rate", "", "-"),)),
}
_ANNOTATE_MAX_CLASSES = 20


def read_training_log(run_dir):
    """{column: float64 [E]} of ``RUN_DIR/training_log.csv``, sorted by epoch; blank cells are NaN.

    When an epoch appears twice (a resumed run that redid it), its last row is kept.
    """
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a training run directory")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ValueError(
                f"{path} must start with a header row containing 'epoch', got {reader.fieldnames}"
            )
        columns = [name for name in reader.fieldnames if name == "epoch" or _is_plotted(name)]
        rows_by_epoch = {}
        for line, row in enumerate(reader, start=2):
            values = {name: _parse_cell(row.get(name), path, line, name) for name in columns}
            if math.isnan(values["epoch"]):
                raise ValueError(f"{path} line {line}: epoch is missing")
            rows_by_epoch[values["epoch"]] = values
    epochs = sorted(rows_by_epoch)
    return {name: np.array([rows_by_epoch[e][name] for e in epochs], np.float64) for name in columns}


def _is_plotted(column):
    return any(column == name for _, _, series in QUANTITIES.values() for name, _, _ in series)


def _parse_cell(text, path, line, column):
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path} line {line}: column {column!r} holds {text!r}, not a number") from None


def _run_labels(run_dirs):
    names = [Path(run_dir).resolve().name for run_dir in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{name}_{index + 1}" for index, name in enumerate(names)]


def _save(figure, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def plot_convergence(run_dirs, out_dir=None):
    """One ``convergence_<quantity>.png`` per quantity logged by at least one run.

    ``run_dirs``: run directories (legend = directory name); ``out_dir`` defaults to the first.
    Returns the written paths.
    """
    run_dirs = [Path(run_dir) for run_dir in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not run_dirs:
        raise ValueError("run_dirs must name at least one run directory")
    logs = [read_training_log(run_dir) for run_dir in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0]
    labels = _run_labels(run_dirs)
    written = []
    for quantity, (y_label, log_scale, series) in QUANTITIES.items():
        figure = Figure(figsize=(7, 4.5))
        axes = figure.add_subplot()
        drawn = False
        for run_index, (log, run_label) in enumerate(zip(logs, labels)):
            color = f"C{run_index % 10}"
            for column, series_label, style in series:
                values = log.get(column)
                if values is None or not np.any(np.isfinite(values)):
                    continue
                finite = np.isfinite(values)
                label = f"{run_label} {series_label}".strip()
                axes.plot(
                    log["epoch"][finite], values[finite], style, color=color, linewidth=1.2, label=label
                )
                drawn = True
        if not drawn:
            continue
        axes.set_xlabel("epoch")
        axes.set_ylabel(y_label)
        if log_scale:
            axes.set_yscale("log")
        axes.grid(linestyle="-.", which="both", alpha=0.5)
        axes.legend(loc="best", fontsize="small")
        axes.set_title(y_label)
        figure.tight_layout()
        written.append(_save(figure, out_dir / f"convergence_{quantity}.png"))
    return written


def row_normalized(conf):
    """float64 [C, C]: each row divided by its sum (rows without samples stay 0)."""
    conf = np.asarray(conf, np.float64)
    support = conf.sum(axis=1, keepdims=True)
    return np.divide(conf, support, out=np.zeros_like(conf), where=support > 0)


def plot_confusion(metrics_json_path, out_path):
    """Row-normalised confusion matrix heat map (rows = true class) of a ``metrics.json``.

    Returns ``out_path`` as a Path.
    """
    path = Path(metrics_json_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    for key in ("confusion", "class_names"):
        if key not in content:
            raise ValueError(f"{path} has no {key!r} entry")
    conf = np.asarray(content["confusion"], np.float64)
    names = [str(name) for name in content["class_names"]]
    if conf.ndim != 2 or conf.shape != (len(names), len(names)):
        raise ValueError(
            f"{path}: confusion must be [{len(names)}, {len(names)}] for {len(names)} class names, "
            f"got shape {conf.shape}"
        )
    normalised = row_normalized(conf)

    size = max(5.0, 0.45 * len(names) + 2.5)
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=60, ha="right", fontsize="small")
    axes.set_yticks(ticks, names, fontsize="small")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if len(names) <= _ANNOTATE_MAX_CLASSES:
        for row in range(len(names)):
            for col in range(len(names)):
                value = normalised[row, col]
                axes.text(
                    col,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if value > 0.5 else "black",
                )
    title = "confusion (%)"
    scores = [
        f"{label} {100 * content[key]:.1f}"
        for key, label in (("overall_accuracy", "OA"), ("mean_iou", "mIoU"))
        if isinstance(content.get(key), (int, float))
    ]
    if scores:
        title += ": " + ", ".join(scores)
    axes.set_title(title)
    figure.tight_layout()
    return _save(figure, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the first RUN_DIR)"
    )
    args = parser.parse_args(argv)
    try:
        written = plot_convergence(args.run_dirs, args.out)
        labels = _run_labels(args.run_dirs)
        for run_dir, label in zip(args.run_dirs, labels):
            metrics_path = run_dir / METRICS_PATH
            if not metrics_path.is_file():
                continue
            if args.out is None:
                out_path = run_dir / "confusion_matrix.png"
            else:
                out_path = args.out / f"confusion_matrix_{label}.png"
            written.append(plot_confusion(metrics_path, out_path))
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    if not written:
        print("nothing to plot: the training logs hold no plotted column")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
