"""Benchmark of the KPConv layer against a straightforward transcription of the original formulation.

Workload: N = 100,000 query points (= supports) uniform in a cube with 100,000 points per unit
volume, H = 40 neighbours (the 40 nearest within radius 0.0486, ~48 expected, so interior rows are
full and border rows padded with shadows), K = 15, extent = 1.2 / 2.5 x radius (the original's
KP_extent / conv_radius), 64->64 and 128->128 channels, rigid and deformable. Implementations:
``transcription`` (the baseline: tiles the [N, H, K, 3] difference tensor as the original
``KPConv_ops`` does), our layer with ``implementation="standard"`` (standard TF ops) and with
``implementation="fused"`` (the compiled ``kernel_aggregate`` op), all inside a ``tf.function``.
``gemm`` times the layer's matrix products alone (the floor a fused layer approaches; the rows give
each implementation's time over it, ``*_gemm_ratio``). Each (implementation, layer, width, pass)
runs in a fresh subprocess so its peak RSS increase (over the process after the inputs exist) is
its own. Medians over the repeats after one warm-up.
Prints a table, writes ``benchmarks/results/bench_kpconv.json``.

    python -m benchmarks.bench_kpconv [--repeats 5] [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


RADIUS = 0.0486
EXTENT = 1.2 / 2.5 * RADIUS


def _inputs(n, h, d_in, seed=0):
    import tf_custom_ops

    rng = np.random.default_rng(seed)
    points = rng.random((n, 3)).astype(np.float32) * (n / 1e5) ** (1 / 3)
    # Pipeline clouds come in grid-cell order, which gives neighbour lists their memory locality.
    cells = np.floor(points / (2 * RADIUS)).astype(np.int64)
    points = points[np.lexsort((cells[:, 0], cells[:, 1], cells[:, 2]))]
    neighbors = tf_custom_ops.neighbors(points, points, RADIUS, max_neighbors=h).numpy()
    features = rng.normal(size=(n, d_in)).astype(np.float32)
    return points, neighbors, features


def _transcription(query, support, neighbors, features, kernel_points, weights, extent, offsets=None):
    """The original's rigid/deformable formulation (tiled differences), linear influence, sum."""
    import tensorflow as tf

    k = kernel_points.shape[0]
    shadow = 1e6 if offsets is None else 1000.0
    support = tf.concat([support, tf.ones_like(support[:1]) * shadow], 0)
    nb = tf.gather(support, neighbors) - query[:, None, :]
    nb = tf.tile(nb[:, :, None, :], [1, 1, k, 1])
    kp = kernel_points if offsets is None else (kernel_points + offsets)[:, None]
    d2 = tf.reduce_sum(tf.square(nb - kp), axis=3)
    w = tf.transpose(tf.maximum(1 - tf.sqrt(d2) / extent, 0.0), [0, 2, 1])
    if offsets is not None:
        in_range = tf.cast(tf.reduce_any(d2 < extent**2, axis=2), tf.float32)
        w = w * in_range[:, None, :]
    f = tf.concat([features, tf.zeros_like(features[:1])], 0)
    wf = tf.matmul(w, tf.gather(f, neighbors))
    return tf.reduce_sum(tf.matmul(tf.transpose(wf, [1, 0, 2]), weights), axis=0)


IMPLS = ("transcription", "standard", "fused")


def gemm_seconds(kind, width, mode, n, repeats):
    """Median time of the layer's matrix products alone, on random operands: the [N, K*Din] x
    [K*Din, Dout] output product (and for deformable the offset KPConv's [K*Din, 3K] one); fwd+bwd
    adds each product's weight gradient (transposed A) and input gradient (transposed B)."""
    import tensorflow as tf

    sums = tf.random.normal([n, 15 * width])
    products = [tf.random.normal([15 * width, width])]
    if kind == "deformable":
        products.append(tf.random.normal([15 * width, 45]))
    upstream = [tf.random.normal([n, w.shape[1]]) for w in products]

    @tf.function
    def step():
        total = 0.0
        for w, g in zip(products, upstream):
            total += tf.reduce_sum(tf.matmul(sums, w))
            if mode != "fwd":
                total += tf.reduce_sum(tf.matmul(sums, g, transpose_a=True))
                total += tf.reduce_sum(tf.matmul(g, w, transpose_b=True))
        return total

    step().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_one(impl, kind, width, mode, n, h, repeats):
    """Runs one configuration in this process; returns (median seconds, peak RSS increase MB)."""
    import tensorflow as tf

    from kpconv_tf.layers import KPConv

    points, neighbors, features = _inputs(n, h, width)
    points, neighbors, features = tf.constant(points), tf.constant(neighbors), tf.constant(features)
    extent = EXTENT
    layer = KPConv(
        width,
        15,
        extent=extent,
        deformable=kind == "deformable",
        kernel_seed=0,
        implementation="standard" if impl == "transcription" else impl,
    )
    layer(points[:10], points, neighbors[:10], features)
    if kind == "deformable":  # non-zero offsets, so the deformable path is exercised
        layer.offset_conv_weights.assign(tf.random.normal(layer.offset_conv_weights.shape, stddev=0.01))
    variables = layer.trainable_variables

    if impl != "transcription":

        def forward():
            return layer(points, points, neighbors, features)
    else:

        def forward():
            offsets = None
            if kind == "deformable":
                _, offsets, _ = layer.offsets(points, points, neighbors, features)
            return _transcription(
                points, points, neighbors, features, layer.kernel_points, layer.kernel, extent, offsets
            )

    @tf.function
    def step():
        if mode == "fwd":
            return tf.reduce_sum(forward())
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_sum(forward())
        grads = tape.gradient(loss, variables + [features])
        return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads])

    base = _rss_mb()
    step().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float(np.median(times)), peak - base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--h", type=int, default=40)
    parser.add_argument("--one", nargs=4, metavar=("IMPL", "KIND", "WIDTH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kpconv.json"))
    args = parser.parse_args(argv)
    if args.one:
        impl, kind, width, mode = args.one
        if impl == "gemm":
            print(json.dumps(dict(seconds=gemm_seconds(kind, int(width), mode, args.n, args.repeats))))
            return
        seconds, mb = run_one(impl, kind, int(width), mode, args.n, args.h, args.repeats)
        print(json.dumps(dict(seconds=seconds, peak_mb=mb)))
        return
    rows = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for kind in ("rigid", "deformable"):
        for width in (64, 128):
            for mode in ("fwd", "fwd+bwd"):
                row = dict(kind=kind, width=width, mode=mode)
                for impl in (*IMPLS, "gemm"):
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.bench_kpconv",
                            "--one",
                            impl,
                            kind,
                            str(width),
                            mode,
                            "--n",
                            str(args.n),
                            "--h",
                            str(args.h),
                            "--repeats",
                            str(args.repeats),
                        ],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr[-3000:])
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    row[f"{impl}_s"] = result["seconds"]
                    if "peak_mb" in result:
                        row[f"{impl}_mb"] = result["peak_mb"]
                for impl in IMPLS[1:]:
                    row[f"{impl}_speedup"] = row["transcription_s"] / row[f"{impl}_s"]
                    row[f"{impl}_memory_ratio"] = row[f"{impl}_mb"] / max(row["transcription_mb"], 1e-9)
                    row[f"{impl}_gemm_ratio"] = row[f"{impl}_s"] / row["gemm_s"]
                rows.append(row)
                print(
                    f"{kind:10} {width:4d} {mode:8} "
                    + " | ".join(
                        f"{impl} {row[impl + '_s']:.3f} s {row[impl + '_mb']:6.0f} MB" for impl in IMPLS
                    )
                    + f" | GEMMs {row['gemm_s']:.3f} s | fused: "
                    + f"{row['fused_speedup']:.2f}x faster, {row['fused_memory_ratio']:.2f}x memory, "
                    + f"{row['fused_gemm_ratio']:.2f}x its GEMMs",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                meta=dict(
                    n=args.n,
                    h=args.h,
                    k=15,
                    radius=RADIUS,
                    extent=EXTENT,
                    repeats=args.repeats,
                    statistic="median",
                    cpu_count=os.cpu_count(),
                ),
                rows=rows,
            ),
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
