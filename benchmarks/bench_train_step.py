"""Training steps against this machine's arithmetic limit (issue #18).

Rows: KP-CNN on W1 (modelnet40.yaml) and KP-FCNN on W2 (s3dis.yaml), each rigid and deformable
(rigid: every ``_deformable`` dropped from the block names; deformable: the blocks after the second
strided one made deformable, as in the original's deformable architectures). Every row runs in a
fresh subprocess (its peak resident memory is its own) and reports, all medians over the repeats
after one warm-up:

* ``step_ms``: one ``TrainStep.run`` (forward, backward, update) in a ``tf.function``;
  ``forward_ms`` (training-mode forward and losses) and ``fwd_bwd_ms`` (plus the gradients): the
  update is ``step - fwd_bwd``, the backward ``fwd_bwd - forward``;
* ``kpconv_ms``: forward plus backward of the network's KPConv calls alone, each replayed on the
  tensors it received in the step, so ``fwd_bwd - kpconv`` is the rest (batch norm, unary
  convolutions, pooling gathers, losses);
* ``step_gflop``: the step's FLOPs counted from the layer shapes (``step_flops``): per KPConv call
  10 per (query, neighbour, kernel point) for the influences, 2 per (query, neighbour, kernel
  point, input channel) for the neighbour sums and 2 per (query, kernel point, input channel,
  output channel) for the weight product; 2 per (point, input, output channel) per unary
  convolution; the backward counted as twice the forward;
* ``ceiling_gflops``: TF's float32 matmul on ``[100000, 960] x [960, 64]`` measured in the same
  process, and ``ratio = step_ms / (step_gflop / ceiling)`` (1.0 would be a step at the ceiling).

    python -m benchmarks.bench_train_step [--repeats 5] [--rows W1-rigid W2-deformable ...]

Prints a table and writes ``benchmarks/results/bench_train_step.json``. ``--quick`` runs two clouds
of each workload with two repeats (a smoke run; its numbers are not results).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_facts
from kpconv_tf.architecture import block_type

ROWS = ("W1-rigid", "W1-deformable", "W2-rigid", "W2-deformable")
INFLUENCE_FLOPS = 10  # differences, squares, sum, square root and linear influence per (q, h, k)


@dataclass
class KPConvCall:
    """One KPConv product of a forward pass: Nq queries, H neighbours, K kernel points."""

    queries: int
    neighbors: int
    kernel_points: int
    in_channels: int
    out_channels: int
    args: tuple = ()

    def flops(self) -> int:
        q, h, k, d = self.queries, self.neighbors, self.kernel_points, self.in_channels
        return INFLUENCE_FLOPS * q * h * k + 2 * q * h * k * d + 2 * q * k * d * self.out_channels


@dataclass
class UnaryCall:
    """One unary convolution (matmul) of a forward pass."""

    points: int
    in_channels: int
    out_channels: int

    def flops(self) -> int:
        return 2 * self.points * self.in_channels * self.out_channels


@contextmanager
def recording_calls(keep_tensors=False):
    """Records every KPConv and unary product run eagerly inside the block (benchmark
    instrumentation: the library functions are wrapped for the duration only)."""
    from kpconv_tf import blocks, layers

    calls = []
    original = {name: getattr(layers.ops, name) for name in ("kpconv", "kpconv_deformable")}
    weights_index = {"kpconv": 5, "kpconv_deformable": 6}

    def wrap(name):
        def recorded(*args, **kwargs):
            neighbors, features, weights = args[2], args[3], args[weights_index[name]]
            calls.append(
                KPConvCall(
                    int(neighbors.shape[0]),
                    int(neighbors.shape[1]),
                    int(weights.shape[0]),
                    int(features.shape[1]),
                    int(weights.shape[2]),
                    (name, args, kwargs) if keep_tensors else (),
                )
            )
            return original[name](*args, **kwargs)

        return recorded

    unary_call = blocks.UnaryConv.call

    def unary(self, features):
        calls.append(UnaryCall(int(features.shape[0]), int(features.shape[1]), int(self.kernel.shape[1])))
        return unary_call(self, features)

    for name in original:
        setattr(layers.ops, name, wrap(name))
    blocks.UnaryConv.call = unary
    try:
        yield calls
    finally:
        for name, function in original.items():
            setattr(layers.ops, name, function)
        blocks.UnaryConv.call = unary_call


def step_flops(network, inputs) -> dict:
    """FLOPs of one training step of ``network`` on the input dict ``inputs`` (module docstring):
    ``{"kpconv", "unary", "step"}`` (forward KPConv and unary FLOPs, and 3x their sum)."""
    with recording_calls() as calls:
        network(inputs, training=True)
    kpconv = sum(c.flops() for c in calls if isinstance(c, KPConvCall))
    unary = sum(c.flops() for c in calls if isinstance(c, UnaryCall))
    return {"kpconv": kpconv, "unary": unary, "step": 3 * (kpconv + unary)}


def variant_architecture(architecture, deformable: bool) -> list:
    """The rigid variant (no ``_deformable``) or the deformable one (blocks after the second
    strided block deformable)."""
    rigid = [_RIGID.get(name, name) for name in architecture]
    if not deformable:
        return rigid
    out, strided = [], 0
    for name in rigid:
        if strided >= 2:
            name = _DEFORMABLE.get(name, name)
        strided += block_type(name).kind == "strided"
        out.append(name)
    return out


_DEFORMABLE = {"resnetb": "resnetb_deformable", "resnetb_strided": "resnetb_deformable_strided"}
_RIGID = {deformable: rigid for rigid, deformable in _DEFORMABLE.items()}


def matmul_ceiling_gflops(repeats) -> float:
    """Median float32 GFLOP/s of ``[100000, 960] x [960, 64]`` (a 64->64 KPConv's product at K=15)."""
    import tensorflow as tf

    from benchmarks.bench_ops import median_ms

    a = tf.random.normal([100000, 960])
    b = tf.random.normal([960, 64])
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    return 2 * 100000 * 960 * 64 / (median_ms(lambda: float(product()), repeats) * 1e6)


def run_row(row: str, repeats: int, quick: bool) -> dict:
    """Measures one row in this process (see the module docstring)."""
    import tensorflow as tf

    from benchmarks.bench_ops import median_ms
    from benchmarks.bench_pipeline import W1_LIMITS, make_pipeline, pipeline_limits
    from benchmarks.workloads import make_w1, make_w2
    from kpconv_tf.models import build_network
    from training.trainer import TrainStep

    workload, variant = row.split("-")
    points, lengths = make_w1() if workload == "W1" else make_w2()
    if quick:
        lengths = lengths[:2]
        points = points[: int(lengths.sum())]
    limits = W1_LIMITS if workload == "W1" else [int(v) for v in pipeline_limits(workload)]
    pipeline, config = make_pipeline(workload, points, lengths, limits)
    config.model.architecture = variant_architecture(config.model.architecture, variant == "deformable")
    inputs, labels = next(iter(pipeline.dataset("train", parallel_calls=1)))
    network = build_network(config)
    network(inputs, training=False)
    step = TrainStep(network, config)
    flops = step_flops(network, inputs)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def forward(x, y):
        return step.losses(x, y, step.forward(x, True))["total_loss"]

    def fwd_bwd(x, y):
        with tf.GradientTape() as tape:
            loss = forward(x, y)
        return _checksum(tape.gradient(loss, step.variables))

    timed = {
        "forward_ms": tf.function(forward),
        "fwd_bwd_ms": tf.function(fwd_bwd),
        "step_ms": tf.function(lambda x, y: step.run(x, y)["total_loss"]),
    }
    result = {"row": row, "points": int(len(points)), "clouds": int(len(lengths))}
    for key, function in timed.items():
        result[key] = median_ms(
            lambda f=function: tf.nest.map_structure(np.asarray, f(inputs, labels)), repeats
        )
    result["kpconv_ms"] = _kpconv_ms(network, inputs, repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["step_rss_increase_mb"] = result["peak_rss_mb"] - base_rss
    result["step_gflop"] = flops["step"] / 1e9
    result["kpconv_share_of_flops"] = flops["kpconv"] / (flops["kpconv"] + flops["unary"])
    result["ceiling_gflops"] = matmul_ceiling_gflops(repeats)
    result["ratio"] = result["step_ms"] / (result["step_gflop"] / result["ceiling_gflops"] * 1e3)
    return result


def _kpconv_ms(network, inputs, repeats) -> float:
    """Forward plus backward of every KPConv call of one training forward, replayed on its tensors."""
    import tensorflow as tf

    from benchmarks.bench_ops import median_ms
    from kpconv_tf import layers

    with recording_calls(keep_tensors=True) as calls:
        network(inputs, training=True)
    replays = []
    for call in calls:
        if not isinstance(call, KPConvCall):
            continue
        name, args, kwargs = call.args
        function = getattr(layers.ops, name)
        tensors = [tf.identity(a) if isinstance(a, tf.Tensor | tf.Variable) else a for a in args]
        differentiable = [
            i for i, a in enumerate(tensors) if isinstance(a, tf.Tensor) and a.dtype.is_floating
        ]

        def replay(function=function, tensors=tensors, differentiable=differentiable, kwargs=kwargs):
            watched = list(tensors)
            with tf.GradientTape() as tape:
                for i in differentiable:
                    tape.watch(watched[i])
                out = function(*watched, **kwargs)
                loss = tf.reduce_sum(out * out)
            return _checksum(tape.gradient(loss, [watched[i] for i in differentiable]))

        replays.append(tf.function(replay))

    def all_calls():
        for replay in replays:
            replay().numpy()

    return median_ms(all_calls, repeats)


def _checksum(gradients):
    """One scalar that depends on every gradient: timing it waits for all of them without copying
    each gradient out of TF (which would count as step time)."""
    import tensorflow as tf

    return tf.add_n([tf.reduce_sum(g) for g in gradients if g is not None])


def _row_in_subprocess(row, repeats, quick):
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--child", row, "--repeats", str(repeats)]
    if quick:
        command.append("--quick")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 clouds, 2 repeats")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train_step.json"))
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    if args.child:
        print(json.dumps(run_row(args.child, repeats, args.quick)))
        return
    rows = []
    for row in args.rows:
        start = time.perf_counter()
        rows.append(_row_in_subprocess(row, repeats, args.quick))
        print(
            f"{row}: {rows[-1]['step_ms']:.0f} ms per step ({time.perf_counter() - start:.0f} s)", flush=True
        )
    header = (
        f"{'row':14} {'points':>7} {'step ms':>8} {'fwd ms':>7} {'bwd ms':>7} {'upd ms':>7} "
        f"{'kpconv ms':>9} {'rest ms':>8} {'GFLOP':>6} {'ceil GF/s':>9} {'ratio':>6} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        backward = r["fwd_bwd_ms"] - r["forward_ms"]
        update = r["step_ms"] - r["fwd_bwd_ms"]
        rest = r["fwd_bwd_ms"] - r["kpconv_ms"]
        print(
            f"{r['row']:14} {r['points']:7d} {r['step_ms']:8.0f} {r['forward_ms']:7.0f} {backward:7.0f} "
            f"{update:7.0f} {r['kpconv_ms']:9.0f} {rest:8.0f} {r['step_gflop']:6.1f} "
            f"{r['ceiling_gflops']:9.1f} {r['ratio']:5.1f}x {r['peak_rss_mb']:8.0f}"
        )
    for r in rows:
        met = r["ratio"] <= 2.5
        print(
            f"target {r['row']} step <= 2.5x FLOPs/ceiling: {r['ratio']:.1f}x {'met' if met else 'NOT met'}"
        )
    meta = dict(repeats=repeats, quick=args.quick, statistic="median after one warm-up", **machine_facts())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
