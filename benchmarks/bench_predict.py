"""Benchmarks of prediction on new data (issue #16), one section per measurement.

Section ``pyramid``: ``kpconv_tf.pyramid.build_pyramid`` with the standard-op implementation against
the compiled ops, on the W1 / W2 batches with the networks that use them (KP-CNN of
modelnet40.yaml for W1, KP-FCNN of s3dis.yaml for W2), full neighbour rows and, for W1, the
calibrated limits; eagerly and inside a ``tf.function`` (unknown shapes), CPU, both
implementations timed in the same run. Medians over the repeats after one warm-up call; the ratio
is standard / compiled (target: <= 4).

Each section prints a table and stores ``{"meta": ..., "rows": [...]}`` under its name in
``benchmarks/results/bench_predict.json``, keeping the other sections' entries of earlier runs. A new
section is a function ``(workloads, repeats, quick) -> rows`` registered in ``SECTIONS``.

    python -m benchmarks.bench_predict [--section pyramid] [--repeats 7] [--workloads W1 W2] [--quick]

Section ``predict``: ``python -m training.predict`` end to end (reading, subsampling, spheres,
network, voting, projection, writing) on a synthetic 2-million-point scene (``.ply``: ground, boxes,
colours, 800 points / m^2) with a run of the ``embedded_rooms`` network trained for one step (speed
does not depend on the weights), in a subprocess: input points per second over the wall time and
the subprocess's peak resident memory. One timed run per implementation (each takes minutes).

``--quick``: a smoke run (3 repeats, the first 2 clouds of each workload, a 100k-point scene); its
numbers are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import tensorflow as tf

from benchmarks.bench_ops import median_ms
from benchmarks.workloads import make_w1, make_w2
from kpconv_tf.pyramid import build_pyramid
from training.config import load_config

CONFIGS = {"W1": "modelnet40", "W2": "s3dis"}
W1_LIMITS = [16, 29, 35, 38, 37]  # the calibrated neighbour limits of the workload definition
IMPLEMENTATIONS = ("compiled", "standard")


def _workload(name, quick):
    points, lengths = make_w1() if name == "W1" else make_w2()
    if quick:
        lengths = lengths[:2]
        points = points[: int(lengths.sum())]
    return points, lengths


def pyramid_rows(workloads, repeats, quick):
    """Section ``pyramid``: one row per (workload, limits, mode) with both implementations' medians."""
    rows = []
    for name in workloads:
        points, lengths = _workload(name, quick)
        model = load_config(CONFIGS[name]).model
        features = tf.ones([len(points), 1])
        pts, lens = tf.constant(points), tf.constant(lengths)
        print(f"{name}: {len(points)} points in {len(lengths)} clouds", flush=True)
        settings = [("full rows", None)] + ([("calibrated", W1_LIMITS)] if name == "W1" else [])
        for limits_name, limits in settings:
            for mode in ("eager", "tf.function"):
                row = dict(
                    workload=name,
                    points=int(len(points)),
                    clouds=int(len(lengths)),
                    limits=limits_name,
                    mode=mode,
                )
                for impl in IMPLEMENTATIONS:

                    def run(p, l, impl=impl):
                        return build_pyramid(p, l, features, model, limits, implementation=impl)

                    if mode == "tf.function":
                        run = tf.function(
                            run,
                            input_signature=[
                                tf.TensorSpec([None, 3], tf.float32),
                                tf.TensorSpec([None], tf.int32),
                            ],
                        )
                    row[f"{impl}_ms"] = median_ms(lambda: run(pts, lens), repeats)
                row["ratio"] = row["standard_ms"] / row["compiled_ms"]
                print(
                    f"  {limits_name}, {mode}: compiled {row['compiled_ms']:.1f} ms, "
                    f"standard {row['standard_ms']:.1f} ms",
                    flush=True,
                )
                rows.append(row)
    header = (
        f"{'workload':8} {'points':>8} {'limits':11} {'mode':12} {'compiled ms':>12} "
        f"{'standard ms':>12} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['workload']:8} {r['points']:8d} {r['limits']:11} {r['mode']:12} {r['compiled_ms']:12.1f} "
            f"{r['standard_ms']:12.1f} {r['ratio']:6.1f}x"
        )
    for r in rows:
        met = r["ratio"] <= 4.0
        print(
            f"target {r['workload']} {r['limits']} {r['mode']} standard <= 4x compiled: {r['ratio']:.1f}x "
            f"{'met' if met else 'NOT met'}"
        )
    return rows


# Runs training.predict and prints the process's own peak resident memory last.
_PEAK_MEMORY_RUNNER = """
import resource, runpy, sys
sys.argv = ["training.predict", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("training.predict", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def _synthetic_scene(path, n, seed=0):
    """A ground plane with boxes, ~800 points / m^2, 8-bit colours, written as ``.ply``."""
    import numpy as np

    from utils.point_files import write_point_file

    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n / 800.0))
    points = np.column_stack([rng.random(n) * side, rng.random(n) * side, rng.normal(scale=0.01, size=n)])
    boxes = rng.random(n) < 0.3  # a third of the points on box tops at random heights
    cells = np.floor(points[boxes, :2] / 4.0).astype(np.int64)
    points[boxes, 2] += 0.5 + (np.abs(cells[:, 0] * 7919 + cells[:, 1] * 104729) % 20) / 10.0
    rgb = np.where(boxes[:, None], [180, 60, 40], [90, 140, 60]) + rng.integers(-20, 20, (n, 3))
    fields = {c: np.clip(rgb[:, i], 0, 255).astype(np.uint8) for i, c in enumerate(("red", "green", "blue"))}
    write_point_file(path, points, fields)


def predict_rows(workloads, repeats, quick):
    """Section ``predict``: one row per implementation (training.predict end to end)."""
    import subprocess
    import sys
    import tempfile
    import time

    from training.train import train

    n = 100_000 if quick else 2_000_000
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        env = dict(
            os.environ,
            KPCONV_TF_CACHE=str(tmp / "cache"),
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        )
        os.environ["KPCONV_TF_CACHE"] = env["KPCONV_TF_CACHE"]
        run_dir = tmp / "run"
        overrides = [
            "dataset.extra={num_train: 1, num_test: 1, seed: 1}",
            "dataset.validation_size=1",
            "train.epoch_steps=1",
            "train.max_epoch=1",
        ]
        train("embedded_rooms", overrides, run_dir, verbose=0)
        scene = tmp / "scene.ply"
        _synthetic_scene(scene, n)
        print(f"predict: {n} points, run {run_dir.name}", flush=True)
        for impl in IMPLEMENTATIONS:
            command = [
                sys.executable,
                "-c",
                _PEAK_MEMORY_RUNNER,
                str(run_dir),
                str(scene),
                "--out",
                str(tmp / f"out_{impl}"),
                "--checkpoint",
                "last",
                "--implementation",
                impl,
            ]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"training.predict failed:\n{done.stderr[-3000:]}")
            lines = done.stdout.splitlines()
            peak = int(lines[-1].split()[-1]) / 1024  # ru_maxrss: KiB on Linux
            summary = next(line for line in lines if "subsampled" in line)
            rows.append(
                dict(
                    implementation=impl,
                    points=n,
                    seconds=seconds,
                    points_per_s=n / seconds,
                    peak_rss_mb=peak,
                    summary=summary.split(": ", 1)[1].split(" -> ")[0],
                )
            )
            print(
                f"  {impl}: {seconds:.1f} s, {n / seconds:,.0f} points/s, peak RSS {peak:.0f} MB", flush=True
            )
    header = f"{'implementation':15} {'points':>9} {'seconds':>9} {'points/s':>10} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['implementation']:15} {r['points']:9d} {r['seconds']:9.1f} {r['points_per_s']:10,.0f} "
            f"{r['peak_rss_mb']:8.0f}"
        )
    return rows


SECTIONS = {"pyramid": pyramid_rows, "predict": predict_rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=["W1", "W2"])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 2 clouds per workload")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_predict.json"))
    args = parser.parse_args(argv)
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be >= 5 (medians)")
    repeats = 3 if args.quick else args.repeats
    tf.config.set_visible_devices([], "GPU")  # CPU figures, whatever the machine has
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    meta = dict(
        repeats=repeats,
        quick=args.quick,
        statistic="median",
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        tensorflow=tf.__version__,
    )
    for section in args.section:
        rows = SECTIONS[section](args.workloads, repeats, args.quick)
        results[section] = dict(meta=dict(meta, workloads=args.workloads), rows=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
