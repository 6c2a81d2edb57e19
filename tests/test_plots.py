"""utils.plots: training-log parsing, convergence and confusion PNGs, the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from kpconv_tf.metrics import summarize
from utils import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def write_log(run_dir, header, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(value) for value in row) for row in rows]
    (run_dir / "training_log.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def classification_run(run_dir, epochs=5, seed=0):
    rng = np.random.default_rng(seed)
    header = [
        "epoch",
        "steps",
        "loss",
        "output_loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "seconds",
        "something_new",
    ]
    rows = []
    for epoch in range(1, epochs + 1):
        loss = 2.0 / epoch + 0.05 * rng.random()
        rows.append(
            [
                epoch,
                10 * epoch,
                loss,
                0.9 * loss,
                1 - loss / 3,
                loss * 1.1,
                1 - loss / 2.5,
                0.01 * 0.9**epoch,
                3.5,
                "x",
            ]
        )
    return write_log(run_dir, header, rows)


def segmentation_run(run_dir, epochs=4):
    header = ["epoch", "loss", "accuracy", "val_accuracy", "val_mean_iou", "learning_rate"]
    rows = [[e, 1.0 / e, 0.5 + 0.1 * e, 0.45 + 0.1 * e, 0.3 + 0.1 * e, 0.01] for e in range(1, epochs + 1)]
    return write_log(run_dir, header, rows)


def write_metrics(run_dir, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, (num_classes, num_classes)) + np.diag(rng.integers(100, 200, num_classes))
    conf[-1] = 0  # a class absent from the test labels
    names = [f"class_{i}" for i in range(num_classes)]
    path = run_dir / "test" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summarize(conf, names)))
    return path, conf


def assert_png(path, min_pixels=200):
    path = Path(path)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.shape[0] >= min_pixels and image.shape[1] >= min_pixels
    assert float(np.std(image[..., :3])) > 0.01  # something is drawn on the white background


def test_read_training_log_parses_sorts_and_keeps_last_duplicate(tmp_path):
    run = write_log(
        tmp_path / "run",
        ["epoch", "loss", "val_mean_iou", "unknown"],
        [[2, 0.5, "", "a"], [1, 0.9, 0.2, "b"], [2, 0.4, 0.35, "c"], [3, 0.3, "", "d"]],
    )
    log = plots.read_training_log(run)
    assert set(log) == {"epoch", "loss", "val_mean_iou"}
    np.testing.assert_array_equal(log["epoch"], [1, 2, 3])
    np.testing.assert_array_equal(log["loss"], [0.9, 0.4, 0.3])
    np.testing.assert_array_equal(log["val_mean_iou"], [0.2, 0.35, np.nan])


def test_read_training_log_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing" / "training_log.csv")):
        plots.read_training_log(tmp_path / "missing")
    no_epoch = write_log(tmp_path / "no_epoch", ["loss"], [[0.5]])
    with pytest.raises(ValueError, match="epoch"):
        plots.read_training_log(no_epoch)
    bad = write_log(tmp_path / "bad", ["epoch", "loss"], [[1, "nan?"]])
    with pytest.raises(ValueError, match=r"training_log.csv line 2: column 'loss'"):
        plots.read_training_log(bad)


def test_plot_convergence_several_runs(tmp_path):
    first = classification_run(tmp_path / "kpcnn_a", seed=1)
    second = segmentation_run(tmp_path / "kpfcnn_b")
    written = plots.plot_convergence([first, second])
    expected = {first / f"convergence_{q}.png" for q in ("loss", "accuracy", "miou", "learning_rate")}
    assert set(written) == expected
    for path in written:
        assert_png(path)


def test_plot_convergence_writes_only_logged_quantities(tmp_path):
    run = classification_run(tmp_path / "run")
    out = tmp_path / "plots"
    written = plots.plot_convergence(run, out)
    assert {path.name for path in written} == {
        "convergence_loss.png",
        "convergence_accuracy.png",
        "convergence_learning_rate.png",
    }
    assert all(path.parent == out for path in written)
    assert not (out / "convergence_miou.png").exists()


def test_plot_convergence_requires_every_log(tmp_path):
    run = classification_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not_a_run"):
        plots.plot_convergence([run, tmp_path / "not_a_run"])
    with pytest.raises(ValueError, match="run_dirs"):
        plots.plot_convergence([])


def test_row_normalized():
    conf = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    expected = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    np.testing.assert_array_equal(plots.row_normalized(conf), expected)


def test_plot_confusion(tmp_path):
    metrics_path, _ = write_metrics(tmp_path / "run", num_classes=6)
    out = plots.plot_confusion(metrics_path, tmp_path / "figures" / "confusion.png")
    assert out == tmp_path / "figures" / "confusion.png"
    assert_png(out)


def test_plot_confusion_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        plots.plot_confusion(tmp_path / "nowhere.json", tmp_path / "c.png")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"confusion": [[1, 0], [0, 1]]}))
    with pytest.raises(ValueError, match="class_names"):
        plots.plot_confusion(partial, tmp_path / "c.png")
    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps({"confusion": [[1, 0], [0, 1]], "class_names": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="mismatch.json"):
        plots.plot_confusion(mismatch, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_main_writes_into_run_dirs_and_out(tmp_path, capsys):
    first = segmentation_run(tmp_path / "a" / "run")
    second = classification_run(tmp_path / "b" / "run")
    write_metrics(first)
    write_metrics(second, seed=2)
    written = plots.main([str(first), str(second)])
    assert first / "confusion_matrix.png" in written and second / "confusion_matrix.png" in written
    assert first / "convergence_miou.png" in written
    for path in written:
        assert_png(path)
    assert str(first / "confusion_matrix.png") in capsys.readouterr().out

    out = tmp_path / "out"
    written = plots.main([str(first), str(second), "--out", str(out)])
    # Both runs are named "run": file names are made unique.
    assert {p.name for p in written if p.name.startswith("confusion")} == {
        "confusion_matrix_run_1.png",
        "confusion_matrix_run_2.png",
    }
    assert all(p.parent == out for p in written)


def test_main_missing_log_exits_with_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path / "empty_run")])
    assert exit_info.value.code == 2
    assert str(tmp_path / "empty_run" / "training_log.csv") in capsys.readouterr().err


def test_command_line(tmp_path):
    run = segmentation_run(tmp_path / "run")
    write_metrics(run)
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="")
    env.pop("DISPLAY", None)
    result = subprocess.run(
        [sys.executable, "-m", "utils.plots", str(run)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.split()]
    assert set(printed) == {
        run / f"convergence_{q}.png" for q in ("loss", "accuracy", "miou", "learning_rate")
    } | {run / "confusion_matrix.png"}
    for path in printed:
        assert_png(path)

    result = subprocess.run(
        [sys.executable, "-m", "utils.plots", str(tmp_path / "absent")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "training_log.csv not found" in result.stderr
