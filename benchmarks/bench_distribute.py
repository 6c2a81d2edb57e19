"""One device against ``MirroredStrategy`` with 2 replicas on the same points (issue #15).

Each step of the ``mirrored`` row trains on two stacked batches, one per replica (2 logical CPU
devices of this process); the ``default`` row trains on their union (``join_batches``) on one
device, so both rows see the same points per step. On a CPU machine the replicas share the cores:
the ratio ``mirrored / default`` is the cost of distribution (all-reduces, per-replica overhead),
not a speed-up. Rows: KP-CNN (``embedded_shapes``) and KP-FCNN (``embedded_rooms``), per-replica
batch norm and synchronized batch norm; ``model.fit`` over prepared batches (no input pipeline
cost), median step time after one warm-up epoch.

    python -m benchmarks.bench_distribute [--steps 6] [--repeats 3] [--configs embedded_rooms ...]

Prints a table and writes ``benchmarks/results/bench_distribute.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.machine import machine_facts  # noqa: E402
from kpconv_tf.models import build_network  # noqa: E402
from training.config import load_config  # noqa: E402
from training.datasets import configure, load_dataset  # noqa: E402
from training.distribute import make_strategy  # noqa: E402
from training.pipeline import Pipeline, join_batches  # noqa: E402
from training.trainer import TrainingModel, batch_free_spec, make_optimizer  # noqa: E402

CONFIGS = ("embedded_shapes", "embedded_rooms")


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def _dataset(elements):
    specs = tf.nest.map_structure(batch_free_spec, elements[0])
    return tf.data.Dataset.from_generator(lambda: iter(elements), output_signature=specs).repeat()


def _median_step(config, strategy, data, steps, repeats):
    with strategy.scope():
        model = TrainingModel(build_network(config), config)
        model.compile(optimizer=make_optimizer(config))
    timer = StepTimes()
    model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)  # warm-up (tracing)
    model.fit(data, epochs=repeats, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[timer])
    return float(np.median(timer.times))


def rows_of(config_name, steps, repeats):
    rows = []
    for sync in (False, True):
        config = load_config(config_name, [f"model.sync_batch_norm={str(sync).lower()}", "augment.color=1.0"])
        dataset = load_dataset(config)
        configure(config, dataset)
        pipeline = Pipeline(dataset, config)
        stream = pipeline.stream("train", "random", seed=0).batches()
        pairs = [(next(stream), next(stream)) for _ in range(steps)]
        union = [pipeline.inputs_of(join_batches(list(pair))) for pair in pairs]
        halves = [pipeline.inputs_of(b) for pair in pairs for b in pair]
        single = _median_step(config, tf.distribute.get_strategy(), _dataset(union), steps, repeats)
        strategy = make_strategy("mirrored")
        data = strategy.distribute_datasets_from_function(lambda context, h=halves: _dataset(h))
        mirrored = _median_step(config, strategy, data, steps, repeats)
        points = float(np.mean([u[0]["points_0"].shape[0] for u in union]))
        rows.append(
            dict(
                config=config_name,
                batch_norm="synchronized" if sync else "per replica",
                points_per_step=int(points),
                default_step_ms=1000 * single,
                mirrored_step_ms=1000 * mirrored,
                ratio=mirrored / single,
            )
        )
        print(
            f"{config_name} ({rows[-1]['batch_norm']}): default {1000 * single:.0f} ms, "
            f"mirrored {1000 * mirrored:.0f} ms",
            flush=True,
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="prepared steps (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after the warm-up")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_distribute.json"))
    args = parser.parse_args(argv)
    rows = [row for name in args.configs for row in rows_of(name, args.steps, args.repeats)]
    header = (
        f"{'config':16} {'batch norm':13} {'points':>7} {'default ms':>10} {'mirrored ms':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:16} {r['batch_norm']:13} {r['points_per_step']:7d} {r['default_step_ms']:10.0f} "
            f"{r['mirrored_step_ms']:11.0f} {r['ratio']:5.2f}x"
        )
    meta = dict(
        steps=args.steps,
        repeats=args.repeats,
        statistic="median step after one warm-up epoch",
        replicas=2,
        devices="2 logical CPU devices of one process",
        **machine_facts(),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
