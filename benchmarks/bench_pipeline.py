"""Throughput of the full input pipeline (stream, augmentation, pyramid with the compiled ops) on the
W1 / W2 batches, with 1 and 2 parallel map calls, beside one training step of the matching network
(KP-CNN of modelnet40.yaml for W1, KP-FCNN of s3dis.yaml for W2).

    python -m benchmarks.bench_pipeline [--batches 30] [--steps 3] [--workloads W1 W2]

Every batch of the stream is the whole workload (its clouds stacked, freshly augmented), so batches
per second compare directly with the paper's 3.5 training batches/s (Table 3). W2's spheres are cut
once beforehand: the figure covers augmentation and the pyramid, not sphere picking. Prints a table
and writes ``benchmarks/results/bench_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.workloads import make_w1, make_w2
from training.config import load_config
from training.datasets import configure
from training.datasets.base import ObjectCloud, ObjectDataset
from training.pipeline import Pipeline

CONFIGS = {"W1": ("modelnet40", "classification"), "W2": ("s3dis", "segmentation")}
W1_LIMITS = [16, 29, 35, 38, 37]  # the calibrated neighbour limits of the workload definition


class WorkloadClouds(ObjectDataset):
    """The clouds of one workload as an object dataset (every split the same)."""

    def __init__(self, name, points, lengths, task):
        self.name = f"bench_{name}"
        self.task = task
        self.label_names = [f"c{i}" for i in range(13)]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        self._clouds = [
            ObjectCloud(points[a:b], None, i % 13, np.zeros(b - a, np.int32), f"{name}_{i}")
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]

    def clouds(self, split):
        return self._clouds


def make_pipeline(name, points, lengths, limits):
    config_name, task = CONFIGS[name]
    config = load_config(config_name)
    config.dataset.in_features_dim = 1
    data = WorkloadClouds(name, points, lengths, task)
    configure(config, data)
    pipeline = Pipeline(data, config)
    pipeline._batch_limit = float(len(points))  # exactly one workload per batch
    pipeline._neighbor_limits = limits
    return pipeline, config


def batches_per_second(pipeline, parallel_calls, batches):
    dataset = pipeline.dataset("train", parallel_calls=parallel_calls)
    iterator = iter(dataset)
    for _ in range(3):  # warm-up: tracing, thread pools, prefetch buffers
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def training_step_ms(pipeline, config, steps):
    from kpconv_tf.models import build_network
    from training.trainer import TrainingModel

    inputs, labels = next(iter(pipeline.dataset("train", parallel_calls=1)))
    model = TrainingModel(build_network(config), config)
    model.compile()  # the optimizer train.optimizer names
    step = tf.function(lambda x, y: model.step.run(x, y))
    step(inputs, labels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        result = step(inputs, labels)
        float(result["total_loss"])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=["W1", "W2"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_pipeline.json"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.workloads:
        points, lengths = make_w1() if name == "W1" else make_w2()
        pipeline, config = make_pipeline(
            name, points, lengths, W1_LIMITS if name == "W1" else [int(v) for v in pipeline_limits(name)]
        )
        row = {"workload": name, "points": int(len(points)), "clouds": int(len(lengths))}
        for calls in (1, 2):
            row[f"batches_per_s_{calls}"] = batches_per_second(pipeline, calls, args.batches)
            print(
                f"{name}: {calls} parallel call(s): {row[f'batches_per_s_{calls}']:.2f} batches/s", flush=True
            )
        if args.steps > 0:
            row["train_step_ms"] = training_step_ms(pipeline, config, args.steps)
            print(f"{name}: training step {row['train_step_ms']:.0f} ms", flush=True)
        rows.append(row)
    header = f"{'workload':8} {'points':>8} {'1 call b/s':>11} {'2 calls b/s':>12} {'train step ms':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        step = f"{r['train_step_ms']:14.0f}" if "train_step_ms" in r else f"{'':14}"
        rates = f"{r['batches_per_s_1']:11.2f} {r['batches_per_s_2']:12.2f}"
        print(f"{r['workload']:8} {r['points']:8d} {rates} {step}")
    for r in rows:
        if r["workload"] == "W1":
            best = max(r["batches_per_s_1"], r["batches_per_s_2"])
            print(f"target W1 >= 4 batches/s: {best:.2f} {'met' if best >= 4 else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        batches=args.batches,
        steps=args.steps,
        statistic="rate over timed batches; step median",
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        tensorflow=tf.__version__,
    )
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


def pipeline_limits(name):
    """W2 has no published limits: calibrate them once on the workload itself (cached)."""
    points, lengths = make_w2()
    pipeline, _ = make_pipeline(name, points, lengths, None)
    pipeline._neighbor_limits = None
    return pipeline.neighbor_limits


if __name__ == "__main__":
    main()
