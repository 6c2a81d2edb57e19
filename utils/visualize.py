"""Seeing what KPConv learned: kernels, deformations, effective receptive fields, features and
predictions of a trained run, rendered to files (no display needed).

    python -m utils.visualize kernels      [RUN_DIR] [--k 15 ...] [--fixed center ...]
    python -m utils.visualize deformations RUN_DIR [--cloud I] [--points I,J | --auto N] [--stat-clouds M]
    python -m utils.visualize erf          RUN_DIR [--compare RUN_DIR2] [--cloud I] [--point P] [--layer KEY]
    python -m utils.visualize features     RUN_DIR [--layer KEY] [--channel C] [--cloud I ...] [--top N]
    python -m utils.visualize predictions  RUN_DIR [--cloud I] [--count N]

Every command writes PNGs (Agg), the numbers behind them (``.npz``) and, where a 3-D viewer is the
better tool, a coloured ``.ply`` into ``RUN_DIR/visualizations/`` (or ``--out``), and prints the
paths; ``--tensorboard`` also logs the images as TensorBoard image summaries into
``RUN_DIR/tensorboard``. Clouds are drawn as orthographic views fitted to the cloud, at most
``--max-draw-points`` points per panel (the files keep every point).

* kernels: kernel point dispositions with their influence spheres (radius = extent) in three
  views: the run's stored kernel points of every KPConv (in extent units), and / or the
  dispositions of ``--k`` points for the ``--fixed`` modes.
* deformations: for chosen input points (``--points``, or ``--auto N`` corners / edges / planes), the
  rigid kernel beside the deformed kernel points of every deformable KPConv over the point's
  neighbourhood; per layer the share of lost kernel points (no input point within the extent),
  deformed and rigid, over ``--stat-clouds`` clouds, printed, as a bar chart and in a CSV.
* erf: the gradient of a block's response at a point (sum over channels, or ``--channel``) with
  respect to the input features, |gradient| summed over the features, as colour over the cloud;
  ``--compare`` draws a second run (e.g. rigid vs deformable) beside it on the same cloud.
* features: the input clouds coloured by one channel's activation at a block (projected to the
  input points); ``--top N`` searches the split for the N clouds that activate the channel most.
* predictions: segmentation: predicted classes beside the ground truth with the class legend and
  the errors in red (scenes: the run's ``test/predictions/<scene>.ply`` when ``training.test``
  wrote it, else predicted here on spheres covering the scene); classification: a gallery of test
  objects with predicted and true labels.

Blocks are named by keys as in the training logs: ``l3_0`` = encoder layer 3, block 0 of that
layer, ``u2_0`` = decoder; ``--layer`` also takes ``last`` or an index.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from kpconv_tf.config import FIXED_MODES
from utils import visualize_render as render
from utils.ply import write_ply

COMMANDS = ("kernels", "deformations", "erf", "features", "predictions")
DEFAULT_PANEL_PX = 300
KERNEL_VIEWS = ("top", "front", "oblique")
RIGID_COLOR = np.array([0.15, 0.35, 0.85])
DEFORMED_COLOR = np.array([0.9, 0.3, 0.05])
CLOUD_COLOR = np.array([0.55, 0.55, 0.55])
HIGHLIGHT_COLOR = np.array([0.9, 0.05, 0.6])


class VisualizeError(ValueError):
    """Bad arguments or an unsuitable run; the message names the argument."""


# ----------------------------------------------------------------------------------------------
# helpers


def _out_dir(args) -> Path:
    if args.out is not None:
        return Path(args.out)
    if getattr(args, "run_dir", None) is None:
        raise VisualizeError("RUN_DIR or --out is required (where to write the images)")
    return Path(args.run_dir) / "visualizations"


def _load(run_dir, args):
    from kpconv_tf.config import ConfigError
    from utils.visualize_model import load_visual_run

    try:
        return load_visual_run(run_dir, args.checkpoint, args.overrides)
    except ConfigError:
        raise
    except (
        FileNotFoundError,
        ValueError,
    ) as error:  # ValueError: e.g. a dataset root moved (--set dataset.path=)
        raise VisualizeError(f"RUN_DIR {run_dir}: {error}") from None


def _save_npz(path, **arrays) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _rgb_u8(colors) -> dict:
    c = np.clip(np.round(np.asarray(colors) * 255), 0, 255).astype(np.uint8)
    return {"red": c[:, 0], "green": c[:, 1], "blue": c[:, 2]}


def _save_ply(path, points, colors, **scalars) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = np.asarray(points, np.float32)
    fields = {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], **_rgb_u8(colors)}
    fields.update({k: np.asarray(v) for k, v in scalars.items()})
    write_ply(path, fields)
    return path


def _int_list(text, name):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise VisualizeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise VisualizeError(f"{name} must name at least one index")
    return values


def _check_positive(value, name):
    if value is not None and value < 1:
        raise VisualizeError(f"{name} must be >= 1, got {value}")


def _check_split(run, split):
    from utils.visualize_model import split_size

    try:
        size = split_size(run, split)
    except (KeyError, ValueError) as error:
        raise VisualizeError(f"--split {split!r}: {error}") from None
    if size == 0:
        raise VisualizeError(f"--split {split!r} holds no cloud")
    return size


def _label_names(run):
    return [str(n) for n in run.dataset.label_names]


def _batches(samples, size):
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


# ----------------------------------------------------------------------------------------------
# kernels


def _conv_layers(network):
    """[(key, KPConv)] of every KPConv in the network's blocks."""
    from kpconv_tf.layers import KPConv
    from utils.visualize_model import blocks_of

    convs = []
    for info in blocks_of(network):
        found = [(name, layer) for name, layer in vars(info.block).items() if isinstance(layer, KPConv)]
        for _, layer in found:
            convs.append((info.key if len(found) == 1 else f"{info.key}/{layer.name}", layer))
    return convs


def _kernel_row(axes_row, points, extent, views, color, title):
    frame = np.concatenate(
        [points + extent * d for d in np.eye(3)] + [points - extent * d for d in np.eye(3)]
    )
    for axes, view in zip(axes_row, views):
        azimuth, elevation = render.VIEWS[view]
        render.fit_axes(axes, render.project(frame, azimuth, elevation)[0])
        render.draw_spheres(axes, points, extent, color, view)
        render.panel_title(axes, f"{title}: {view} view")


def command_kernels(args) -> list[Path]:
    out = _out_dir(args)
    panel = args.panel_size
    written = []
    if args.k:
        for k in args.k:
            _check_positive(k, "--k")
        fixed = args.fixed or ["center"]
        from kpconv_tf.kernel_points import load_kernels

        combos = [(k, mode) for k in args.k for mode in fixed]
        figure, axes = render.grid_figure(
            len(combos),
            len(KERNEL_VIEWS),
            panel,
            "kernel point dispositions (kernel radius 1.5, influence spheres of radius extent = 1)",
        )
        arrays, all_points, ids = {}, [], []
        for row, (k, mode) in enumerate(combos):
            points = load_kernels(1.5, k, mode, rotate=False, jitter=0.0).astype(np.float64)
            arrays[f"k{k}_{mode}"] = points
            _kernel_row(axes[row], points, 1.0, KERNEL_VIEWS, RIGID_COLOR, f"K={k}, fixed={mode}")
            all_points.append(points + np.array([4.0 * row, 0, 0]))
            ids.append(np.full(len(points), row, np.int32))
        name = "kernels_" + "_".join(f"k{k}" for k in args.k) + "_" + "_".join(fixed)
        written.append(render.save_png(figure, out / f"{name}.png"))
        written.append(_save_npz(out / f"{name}.npz", **arrays))
        points = np.concatenate(all_points)
        written.append(
            _save_ply(
                out / f"{name}.ply",
                points,
                np.tile(RIGID_COLOR, (len(points), 1)),
                disposition=np.concatenate(ids),
            )
        )
    elif args.fixed:
        raise VisualizeError("--fixed needs --k (the number of kernel points of the dispositions to draw)")
    if args.run_dir is not None:
        run = _load(args.run_dir, args)
        convs = _conv_layers(run.network)
        if not convs:
            raise VisualizeError(f"RUN_DIR {args.run_dir}: the network has no KPConv layer")
        figure, axes = render.grid_figure(
            len(convs),
            len(KERNEL_VIEWS),
            panel,
            f"stored kernel points of {Path(args.run_dir).name} (extent units; discs: influence radius)",
        )
        arrays, all_points, ids, all_colors = {}, [], [], []
        for row, (key, conv) in enumerate(convs):
            points = conv.kernel_points.numpy().astype(np.float64) / conv.extent
            arrays[key.replace("/", "_")] = points
            arrays[key.replace("/", "_") + "_extent"] = np.float64(conv.extent)
            kind = "deformable" if conv.deformable else "rigid"
            color = DEFORMED_COLOR if conv.deformable else RIGID_COLOR
            _kernel_row(
                axes[row],
                points,
                1.0,
                KERNEL_VIEWS,
                color,
                f"{key} {kind} K={conv.kernel_size} extent {conv.extent:.3g}",
            )
            all_points.append(points * conv.extent + np.array([6.0 * conv.extent * row, 0, 0]))
            ids.append(np.full(len(points), row, np.int32))
            all_colors.append(np.tile(color, (len(points), 1)))
        written.append(render.save_png(figure, out / "kernels_run.png"))
        written.append(_save_npz(out / "kernels_run.npz", **arrays))
        written.append(
            _save_ply(
                out / "kernels_run.ply",
                np.concatenate(all_points),
                np.concatenate(all_colors),
                layer=np.concatenate(ids),
            )
        )
    if not written:
        raise VisualizeError("kernels needs RUN_DIR (the run's stored kernels) or --k (dispositions)")
    return written


# ----------------------------------------------------------------------------------------------
# deformations


def _stat_samples(run, split, count, first):
    from utils.visualize_model import sample, split_size

    total = split_size(run, split)
    indices = [first] + [i for i in range(total) if i != first][: max(0, count - 1)]
    return [sample(run, split, i) for i in indices]


def lost_share_table(run, samples):
    """{conv key: (deformed share or nan, rigid share, mean offset norm in extents or nan, queries)}
    of lost kernel points over ``samples`` (stacked a few at a time)."""
    from utils.visualize_model import kpconv_records, lost_shares, make_inputs

    totals = {}
    for chunk in _batches(samples, 8):
        inputs, _ = make_inputs(run, chunk)
        for record in kpconv_records(run.network, inputs):
            extent = record.conv.extent
            rigid, _, _ = lost_shares(
                record.rigid, record.query_points, record.support_points, record.neighbors, extent
            )
            entry = totals.setdefault(record.key, {"deformed": [], "rigid": [], "norm": [], "n": 0})
            entry["rigid"].append(rigid)
            if record.deformed is not None:
                deformed, norm, _ = lost_shares(
                    record.deformed,
                    record.query_points,
                    record.support_points,
                    record.neighbors,
                    extent,
                    record.rigid,
                )
                entry["deformed"].append(deformed)
                entry["norm"].append(norm * len(deformed))
            entry["n"] += len(record.query_points)
    table = {}
    for key, entry in totals.items():
        rigid = float(np.mean(np.concatenate(entry["rigid"])))
        if entry["deformed"]:
            deformed = float(np.mean(np.concatenate(entry["deformed"])))
            norm = float(np.sum(entry["norm"]) / entry["n"])
        else:
            deformed = norm = float("nan")
        table[key] = (deformed, rigid, norm, entry["n"])
    return table


def _neighbourhood(record, query_row):
    row = record.neighbors[query_row]
    row = row[row < len(record.support_points)]
    return record.support_points[row] - record.query_points[query_row]


def _shown_records(records):
    """The deformable KPConvs; in a rigid network, the last KPConv of each of its last three levels."""
    deformable = [r for r in records if r.deformed is not None]
    if deformable:
        return deformable
    by_level = {}
    for record in records:
        by_level[len(record.query_points)] = record
    return list(by_level.values())[-3:]


def command_deformations(args) -> list[Path]:
    from utils.visualize_model import characteristic_points, kpconv_records, lost_shares, make_inputs, sample

    run = _load(args.run_dir, args)
    total = _check_split(run, args.split)
    _check_positive(args.auto, "--auto")
    _check_positive(args.stat_clouds, "--stat-clouds")
    if not 0 <= args.cloud < total:
        raise VisualizeError(f"--cloud {args.cloud} out of range: split {args.split!r} has {total} clouds")
    cloud = sample(run, args.split, args.cloud)
    points = cloud.points
    if args.points is not None:
        chosen = [(i, "chosen") for i in _int_list(args.points, "--points")]
        bad = [i for i, _ in chosen if not 0 <= i < len(points)]
        if bad:
            raise VisualizeError(f"--points {bad} out of range: cloud {args.cloud} has {len(points)} points")
    else:
        m = run.config.model
        chosen = characteristic_points(points, args.auto or 3, m.first_subsampling_dl * m.density_parameter)
    inputs, _ = make_inputs(run, [cloud])
    records = _shown_records(kpconv_records(run.network, inputs))
    deformable = records[0].deformed is not None
    panels = [
        (record, kernel)
        for record in records
        for kernel in (("rigid", "deformed") if deformable else ("rigid",))
    ]
    kind = "deformable" if deformable else "rigid run (no deformable KPConv): rigid kernels"
    legend = (
        "blue: rigid kernel, orange: deformed kernel points" if deformable else "blue: rigid kernel points"
    )
    title = (
        f"{Path(args.run_dir).name}: kernel points around chosen points ({args.split} cloud {args.cloud}, "
        f"{cloud.name}), {kind}\n{legend}, discs: influence radius (extent), grey: the layer's input "
        "points in the neighbourhood"
    )
    figure, axes = render.grid_figure(len(chosen), 1 + len(panels), args.panel_size, title)
    arrays = {"points": points, "chosen": np.array([i for i, _ in chosen], np.int64)}
    ply_points, ply_colors = [points], [np.tile(CLOUD_COLOR, (len(points), 1))]
    ply_kind = [np.zeros(len(points), np.uint8)]
    for row, (index, pick_kind) in enumerate(chosen):
        marker = points[index]
        render.draw_cloud(
            axes[row][0], points, np.tile(CLOUD_COLOR, (len(points), 1)), args.view, args.max_draw_points
        )
        xy = render.project(marker[None], *render.VIEWS[args.view])[0]
        axes[row][0].scatter(
            xy[:, 0],
            xy[:, 1],
            s=160,
            marker="*",
            color=HIGHLIGHT_COLOR,
            edgecolors="black",
            linewidths=0.6,
            zorder=4,
        )
        render.panel_title(axes[row][0], f"point {index} ({pick_kind})")
        queries = {}
        for column, (record, kernel_kind) in enumerate(panels, start=1):
            if record.key not in queries:
                queries[record.key] = int(np.argmin(np.sum(np.square(record.query_points - marker), axis=1)))
            q = queries[record.key]
            local = _neighbourhood(record, q)
            extent = record.conv.extent
            kernel = record.deformed[q] if kernel_kind == "deformed" else record.rigid
            frame = np.concatenate(
                [local, record.rigid + extent, record.rigid - extent, kernel + extent, kernel - extent]
            )
            if record.deformed is not None:
                frame = np.concatenate([frame, record.deformed[q] + extent, record.deformed[q] - extent])
            ax = axes[row][column]
            render.draw_cloud(
                ax,
                local,
                np.tile(CLOUD_COLOR * 0.6, (len(local), 1)),
                args.view,
                args.max_draw_points,
                frame_points=frame,
                size=12.0,
                zorder=2,
            )
            render.draw_spheres(
                ax,
                kernel,
                extent,
                DEFORMED_COLOR if kernel_kind == "deformed" else RIGID_COLOR,
                args.view,
                alpha=0.18,
                marker=18,
            )
            share = lost_shares(
                kernel[None],
                record.query_points[q : q + 1],
                record.support_points,
                record.neighbors[q : q + 1],
                extent,
            )[2]
            render.panel_title(ax, f"{record.key} {kernel_kind}: {100 * share:.0f}% lost")
            key = f"p{index}_{record.key.replace('/', '_')}"
            arrays[f"{key}_neighbourhood"] = local
            arrays[f"{key}_{kernel_kind}"] = kernel
            arrays[f"{key}_extent"] = np.float64(extent)
            ply_points.append(kernel + record.query_points[q])
            ply_colors.append(
                np.tile(DEFORMED_COLOR if kernel_kind == "deformed" else RIGID_COLOR, (len(kernel), 1))
            )
            ply_kind.append(np.full(len(kernel), 2 if kernel_kind == "deformed" else 1, np.uint8))
    out = _out_dir(args)
    name = f"deformations_{args.split}{args.cloud}"
    written = [render.save_png(figure, out / f"{name}.png")]
    samples = _stat_samples(run, args.split, args.stat_clouds, args.cloud)
    table = lost_share_table(run, samples)
    written += _lost_share_outputs(
        table, out, name, Path(args.run_dir).name, len(samples), args.split, arrays
    )
    written.append(_save_npz(out / f"{name}.npz", **arrays))
    written.append(
        _save_ply(
            out / f"{name}.ply",
            np.concatenate(ply_points),
            np.concatenate(ply_colors),
            kind=np.concatenate(ply_kind),
        )
    )
    return written


def _lost_share_outputs(table, out, name, run_name, clouds, split, arrays):
    keys = list(table)
    print(f"lost kernel points (no input point within the extent) over {clouds} {split} clouds:")
    print(f"{'layer':>12} {'deformed':>9} {'rigid':>7} {'offset/extent':>14} {'queries':>8}")
    for key in keys:
        deformed, rigid, norm, n = table[key]
        print(
            f"{key:>12} {'-' if np.isnan(deformed) else f'{100 * deformed:.1f}%':>9} {100 * rigid:6.1f}% "
            f"{'-' if np.isnan(norm) else f'{norm:.3f}':>14} {n:>8}"
        )
    csv_path = out / f"{name}_lost_share.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["layer", "deformed_lost_share", "rigid_lost_share", "offset_norm_extents", "queries"]
        )
        for key in keys:
            deformed, rigid, norm, n = table[key]
            writer.writerow(
                [
                    key,
                    "" if np.isnan(deformed) else f"{deformed:.6f}",
                    f"{rigid:.6f}",
                    "" if np.isnan(norm) else f"{norm:.6f}",
                    n,
                ]
            )
    arrays["lost_share_layers"] = np.array(keys)
    arrays["lost_share_deformed"] = np.array([table[k][0] for k in keys])
    arrays["lost_share_rigid"] = np.array([table[k][1] for k in keys])
    arrays["offset_norm_extents"] = np.array([table[k][2] for k in keys])

    width = max(520, 70 * len(keys) + 160)
    figure = render.new_figure(width, 380)
    axes = figure.add_axes([90 / width, 0.2, 1 - 120 / width, 0.64])
    x = np.arange(len(keys))
    deformed = np.array([table[k][0] for k in keys])
    rigid = np.array([table[k][1] for k in keys])
    axes.bar(x - 0.2, 100 * rigid, 0.4, color=RIGID_COLOR, label="rigid kernel")
    has_deformed = np.isfinite(deformed)
    axes.bar(
        x[has_deformed] + 0.2,
        100 * deformed[has_deformed],
        0.4,
        color=DEFORMED_COLOR,
        label="deformed kernel",
    )
    axes.set_xticks(x, keys, rotation=45, ha="right", fontsize="small")
    axes.set_ylabel("lost kernel points (%)")
    axes.set_ylim(0, 100)
    axes.grid(axis="y", alpha=0.4)
    axes.legend(fontsize="small", loc="upper left")
    axes.set_title(
        f"{run_name}: share of kernel points with no input point within the extent\n"
        f"per KPConv, over {clouds} {split} clouds",
        fontsize=10,
    )
    return [render.save_png(figure, out / f"{name}_lost_share.png"), csv_path]


# ----------------------------------------------------------------------------------------------
# effective receptive field


def _default_block(network, key):
    from utils.visualize_model import blocks_of, find_block

    if key is not None:
        try:
            return find_block(network, key)
        except ValueError as error:
            raise VisualizeError(str(error)) from None
    # The last block of the middle encoder layer: a field that neither covers a few points nor the cloud.
    encoder = [i for i in blocks_of(network) if not i.decoder and i.level is not None]
    middle = max(i.level for i in encoder) // 2
    return [i for i in encoder if i.level == middle][-1]


def erf_of(run, split, cloud_index, point, key, channel):
    """(sample, chosen input point, block info, |gradient| per input point [n], response, position of
    the block's point nearest the chosen one: the point whose response is differentiated)."""
    from kpconv_tf.inputs import layer_keys
    from utils.visualize_model import erf_gradient, make_inputs, sample

    cloud = sample(run, split, cloud_index)
    if point is None:
        point = int(np.argmin(np.sum(np.square(cloud.points - cloud.points.mean(0)), axis=1)))
    if not 0 <= point < len(cloud.points):
        raise VisualizeError(
            f"--point {point} out of range: cloud {cloud_index} has {len(cloud.points)} points"
        )
    info = _default_block(run.network, key)
    inputs, _ = make_inputs(run, [cloud])
    level_points = np.asarray(inputs[layer_keys(info.level).points])
    row = int(np.argmin(np.sum(np.square(level_points - cloud.points[point]), axis=1)))
    try:
        gradient, response = erf_gradient(run.network, inputs, info.key, row, channel)
    except ValueError as error:
        raise VisualizeError(str(error)) from None
    return cloud, point, info, np.abs(gradient).sum(1), response, level_points[row]


def _erf_summary(points, centre, magnitude):
    total = magnitude.sum()
    if total <= 0:
        return 0.0, 0.0
    distance = np.linalg.norm(points - centre, axis=1)
    order = np.argsort(distance)
    mass = np.cumsum(magnitude[order]) / total
    return float(np.mean(magnitude > 0)), float(distance[order][np.searchsorted(mass, 0.9)])


def command_erf(args) -> list[Path]:
    run = _load(args.run_dir, args)
    _check_split(run, args.split)
    runs = [(Path(args.run_dir).name, run)]
    if args.compare is not None:
        other = _load(args.compare, args)
        if other.config.dataset.name != run.config.dataset.name:
            raise VisualizeError(
                f"--compare {args.compare}: dataset {other.config.dataset.name} differs from "
                f"{run.config.dataset.name}; the ERFs must be drawn on the same clouds"
            )
        runs.append((Path(args.compare).name, other))
    views = ("oblique", "front")
    figure, axes = render.grid_figure(
        len(runs),
        len(views),
        args.panel_size,
        "",
        footer_px=render.LEGEND_PX,
        panel_width_px=int(args.panel_size * 1.2),
    )
    arrays, results = {}, []
    point, centre = args.point, None
    for column, (name, current) in enumerate(runs):
        if centre is not None:  # the same spot on the other run's (maybe differently subsampled) cloud
            from utils.visualize_model import sample

            other_cloud = sample(current, args.split, args.cloud)
            point = int(np.argmin(np.sum(np.square(other_cloud.points - centre), axis=1)))
        cloud, point, info, magnitude, response, block_point = erf_of(
            current, args.split, args.cloud, point, args.layer, args.channel
        )
        centre = cloud.points[point]
        results.append((name, cloud, point, info, magnitude))
        share, radius = _erf_summary(cloud.points, block_point, magnitude)
        kind = (
            "deformable"
            if any(getattr(c, "deformable", False) for _, c in _conv_layers(current.network))
            else "rigid"
        )
        print(
            f"{name} ({kind}): block {info.key}, response {response:.4g}, {100 * share:.1f}% of the input "
            f"points influence it, 90% of the gradient within {radius:.3g} of the block's point"
        )
        arrays[f"{column}_points"] = cloud.points
        arrays[f"{column}_erf"] = magnitude
        arrays[f"{column}_point"] = np.int64(point)
        arrays[f"{column}_block_point"] = block_point
        arrays[f"{column}_radius90"] = np.float64(radius)
        peak = magnitude.max() if magnitude.max() > 0 else 1.0
        normalised = magnitude / peak
        colors, norm = render.scalar_colors(np.sqrt(normalised), "inferno_r", 0.0, 1.0)
        colors[magnitude == 0] = (0.85, 0.85, 0.85)
        for row, view in enumerate(views):
            ax = axes[column][row]
            render.draw_cloud(ax, cloud.points, colors, view, args.max_draw_points, shade=0.2)
            xy = render.project(block_point[None], *render.VIEWS[view])[0]
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=140,
                marker="*",
                color="cyan",
                edgecolors="black",
                linewidths=0.7,
                zorder=4,
            )
            render.panel_title(
                ax, f"{name} ({kind}), {view}" if row == 0 else f"{view}: 90% of it within {radius:.2g}"
            )
        if column == 0:
            first = (cloud.points, colors, magnitude)
    channel = "sum over channels" if args.channel is None else f"channel {args.channel}"
    render.set_title(
        figure,
        f"effective receptive field of block {results[0][3].key} ({channel}) at point "
        f"{results[0][2]} ({args.split} cloud {args.cloud}, {results[0][1].name}): "
        "|d response / d input features|\nstar: the block's point nearest it; grey: no "
        "influence",
    )
    render.colorbar(
        figure, render.footer_axes(figure, render.LEGEND_PX), norm, "inferno_r", "sqrt(|gradient| / max)"
    )
    out = _out_dir(args)
    name = f"erf_{args.split}{args.cloud}_{results[0][3].key}" + ("_compare" if len(runs) > 1 else "")
    written = [render.save_png(figure, out / f"{name}.png"), _save_npz(out / f"{name}.npz", **arrays)]
    points, colors, magnitude = first
    written.append(_save_ply(out / f"{name}.ply", points, colors, erf=magnitude.astype(np.float32)))
    return written


# ----------------------------------------------------------------------------------------------
# features


def activations_of(run, samples, key):
    """[(per-input-point activations [n, D], per-cloud maximum [D])] of block ``key`` per sample."""
    from utils.visualize_model import block_outputs, level_batch_index, make_inputs, to_input_points

    info = _default_block(run.network, key)
    results = []
    for chunk in _batches(samples, 8):
        inputs, _ = make_inputs(run, chunk)
        output = block_outputs(run.network, inputs)[info.key].numpy()
        projected = to_input_points(inputs, output, info.level)
        batch0 = level_batch_index(inputs, 0)
        level_batch = np.arange(len(chunk)) if info.level is None else level_batch_index(inputs, info.level)
        for b in range(len(chunk)):
            results.append((projected[batch0 == b], output[level_batch == b].max(0)))
    return info, results


def _scene_spheres(run, split, limit=None):
    """Input spheres covering every scene of the split (``sphere_centres`` with reach 1), named
    ``<scene>@<sphere>``; at most ``limit``."""
    from utils.visualize_model import scene_sample

    samples = []
    for index, scene in enumerate(run.dataset.scenes(split)):
        for number, centre in enumerate(
            sphere_centres(scene.points, run.config.dataset.in_radius, reach=1.0)
        ):
            if limit is not None and len(samples) >= limit:
                return samples
            cloud = scene_sample(run, split, index, centre)
            cloud.name = f"{scene.name}@{number}"
            samples.append(cloud)
    return samples


def command_features(args) -> list[Path]:
    from utils.visualize_model import sample

    run = _load(args.run_dir, args)
    total = _check_split(run, args.split)
    _check_positive(args.top, "--top")
    _check_positive(args.search_clouds, "--search-clouds")
    if args.top is not None and run.is_scene:
        samples = _scene_spheres(run, args.split, args.search_clouds)
        indices = list(range(len(samples)))
    elif args.top is not None:
        indices = list(range(total if args.search_clouds is None else min(total, args.search_clouds)))
        samples = [sample(run, args.split, i) for i in indices]
    else:
        indices = _int_list(args.cloud, "--cloud")
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise VisualizeError(f"--cloud {bad} out of range: split {args.split!r} has {total} clouds")
        samples = [sample(run, args.split, i) for i in indices]
    info, results = activations_of(run, samples, args.layer)
    channels = results[0][0].shape[1]
    maxima = np.stack([m for _, m in results])
    channel = args.channel
    if channel is None:
        channel = int(np.argmax(maxima.max(0)))
        print(f"--channel not given: channel {channel} of block {info.key} (largest activation)")
    elif not 0 <= channel < channels:
        raise VisualizeError(f"--channel {channel} out of range: block {info.key} has {channels} channels")
    shown = list(range(len(samples)))
    if args.top is not None:
        shown = list(np.argsort(-maxima[:, channel], kind="stable")[: args.top])
    vmax = max(float(maxima[shown, channel].max()), 1e-12)
    vmin = min(0.0, float(min(results[i][0][:, channel].min() for i in shown)))
    cols = min(len(shown), 4)
    rows = -(-len(shown) // cols)
    unit = "input spheres" if run.is_scene else "clouds"
    what = (
        f"the {len(shown)} {args.split} {unit} (of {len(samples)}) that activate it most"
        if args.top
        else f"{args.split} clouds {', '.join(str(indices[i]) for i in shown)}"
    )
    figure, axes = render.grid_figure(
        rows,
        cols,
        args.panel_size,
        f"{Path(args.run_dir).name}: block {info.key} ({info.block.block_type}), "
        f"channel {channel} activation on the input points\n{what}",
        footer_px=render.LEGEND_PX,
    )
    names = _label_names(run)
    arrays, ply_points, ply_colors, ply_values, ply_cloud = {"channel": np.int64(channel)}, [], [], [], []
    offset = 0.0
    for slot in range(rows * cols):
        ax = axes[slot // cols][slot % cols]
        if slot >= len(shown):
            ax.set_axis_off()
            continue
        i = shown[slot]
        cloud, values = samples[i], results[i][0][:, channel]
        colors, norm = render.scalar_colors(values, "inferno", vmin, vmax)
        render.draw_cloud(ax, cloud.points, colors, args.view, args.max_draw_points, shade=0.2)
        label = "" if run.is_scene or run.task != "classification" else f" ({names[cloud.label]})"
        render.panel_title(ax, f"{cloud.name}{label}: max {results[i][1][channel]:.3g}")
        arrays[f"cloud{indices[i]}_points"] = cloud.points
        arrays[f"cloud{indices[i]}_activation"] = values
        span = np.ptp(cloud.points[:, 0]) if len(cloud.points) else 0.0
        ply_points.append(cloud.points + np.array([offset - cloud.points[:, 0].min(), 0, 0]))
        offset += 1.2 * span + 1e-3
        ply_colors.append(colors)
        ply_values.append(values)
        ply_cloud.append(np.full(len(values), indices[i], np.int32))
    arrays["max_activation_per_cloud"] = maxima
    arrays["cloud_indices"] = np.array(indices)
    render.colorbar(
        figure,
        render.footer_axes(figure, render.LEGEND_PX),
        norm,
        "inferno",
        f"activation of channel {channel}",
    )
    out = _out_dir(args)
    name = f"features_{info.key}_c{channel}" + (f"_top{args.top}" if args.top else "")
    return [
        render.save_png(figure, out / f"{name}.png"),
        _save_npz(out / f"{name}.npz", **arrays),
        _save_ply(
            out / f"{name}.ply",
            np.concatenate(ply_points),
            np.concatenate(ply_colors),
            activation=np.concatenate(ply_values).astype(np.float32),
            cloud=np.concatenate(ply_cloud),
        ),
    ]


# ----------------------------------------------------------------------------------------------
# predictions


def predict_samples(run, samples):
    """Class predictions: one int per sample (classification) or an int array per sample."""
    from utils.visualize_model import make_inputs

    out = []
    for chunk in _batches(samples, 8):
        inputs, _ = make_inputs(run, chunk)
        logits = run.network(inputs, training=False).numpy()
        if run.task == "classification":
            out += list(np.argmax(logits, 1))
            continue
        offsets = np.concatenate([[0], np.cumsum([len(s.points) for s in chunk])])
        out += [np.argmax(logits[offsets[b] : offsets[b + 1]], 1) for b in range(len(chunk))]
    return out


def sphere_centres(points, radius, reach=0.7, seed=0):
    """Centres (points of the cloud) of input spheres such that every point lies within
    ``reach * radius`` of one of them (greedy cover, seeded order): each point is predicted with
    context around it."""
    from sklearn.neighbors import KDTree

    tree = KDTree(points)
    covered = np.zeros(len(points), bool)
    centres = []
    for index in np.random.default_rng(seed).permutation(len(points)):
        if covered[index]:
            continue
        centres.append(points[index])
        covered[tree.query_radius(points[index][None], r=reach * radius)[0]] = True
    return np.array(centres, np.float64).reshape(-1, 3)


def predict_scene(run, split, scene_index, max_spheres=400):
    """Predictions of every subsampled point of a scene: softmax summed over the input spheres
    (``dataset.in_radius``) of ``sphere_centres``; returns (points, predictions, labels)."""
    import tensorflow as tf

    from utils.visualize_model import make_inputs, scene_sample

    scene = run.dataset.scenes(split)[scene_index]
    centres = sphere_centres(scene.points, run.config.dataset.in_radius)
    if len(centres) > max_spheres:
        raise VisualizeError(
            f"--max-spheres {max_spheres}: scene {scene.name!r} needs {len(centres)} input "
            "spheres; raise it, or run training.test first (its test/predictions are used)"
        )
    probs = np.zeros((len(scene.points), len(run.dataset.label_names)), np.float64)
    for chunk in _batches(list(centres), 4):
        samples = [scene_sample(run, split, scene_index, centre) for centre in chunk]
        inputs, _ = make_inputs(run, samples)
        p = tf.nn.softmax(run.network(inputs, training=False), axis=-1).numpy()
        offsets = np.concatenate([[0], np.cumsum([len(s.points) for s in samples])])
        for b, s in enumerate(samples):
            probs[s.source_indices] += p[offsets[b] : offsets[b + 1]]
    return scene.points, np.argmax(probs, 1), scene.labels


def plot_segmentation(
    points,
    predictions,
    labels,
    names,
    path,
    title,
    view="top",
    panel_px=DEFAULT_PANEL_PX,
    max_points=render.MAX_DRAW_POINTS,
    hidden=(),
):
    """Predicted | ground truth | errors of one segmented cloud (points [N, 3], class indices [N];
    labels < 0 are unlabelled). Classes in ``hidden`` are left out of the drawing (e.g. ceilings
    in top views). Returns the PNG path; only a drawing subset of large clouds is touched."""
    names = list(names)
    palette = render.class_colors(len(names))
    # A first bounded subset (4x the drawn points, so that hidden classes still leave enough).
    keep = render.drawing_subset(len(points), max_points * 4)
    predictions = np.asarray(predictions)[keep]
    labels = None if labels is None else np.asarray(labels)[keep]
    drawn_points = np.asarray(points)[keep]
    mask = np.ones(len(keep), bool)
    hidden_ids = [names.index(h) for h in hidden if h in names]
    for h in hidden_ids:
        mask &= (labels if labels is not None else predictions) != h
    drawn_points, predictions = drawn_points[mask], predictions[mask]
    labels = None if labels is None else labels[mask]
    panels = [("predicted", palette[np.clip(predictions, 0, len(names) - 1)])]
    if labels is not None:
        valid = labels >= 0
        truth = np.where(valid[:, None], palette[np.clip(labels, 0, len(names) - 1)], 0.3)
        errors = np.where(
            (predictions != labels)[:, None] & valid[:, None], render.ERROR_COLOR, render.CORRECT_COLOR
        )
        accuracy = float(np.mean(predictions[valid] == labels[valid])) if valid.any() else float("nan")
        panels += [("ground truth", truth), (f"errors in red (accuracy {100 * accuracy:.1f}%)", errors)]
    figure, axes = render.grid_figure(
        1, len(panels), panel_px, title, footer_px=render.LEGEND_PX, panel_width_px=int(panel_px * 1.3)
    )
    for ax, (label, colors) in zip(axes[0], panels):
        render.draw_cloud(ax, drawn_points, colors, view, max_points)
        render.panel_title(ax, label)
    render.class_legend(
        figure,
        [n for i, n in enumerate(names) if i not in hidden_ids],
        [c for i, c in enumerate(palette) if i not in hidden_ids],
        loc="lower center",
    )
    return render.save_png(figure, path)


def _read_test_predictions(run, scene):
    path = Path(run.run_dir) / "test" / "predictions" / "predictions" / f"{scene.name}.ply"
    if not path.is_file():
        path = Path(run.run_dir) / "test" / "predictions" / f"{scene.name}.ply"
    if not path.is_file():
        return None
    from utils.ply import read_ply

    data = read_ply(path)
    if "preds" not in data.dtype.names:
        return None
    points = np.stack([data["x"], data["y"], data["z"]], 1)
    labels = data["labels"] if "labels" in data.dtype.names else None
    return points, data["preds"].astype(np.int64), labels, path


def command_predictions(args) -> list[Path]:
    run = _load(args.run_dir, args)
    total = _check_split(run, args.split)
    _check_positive(args.count, "--count")
    names = _label_names(run)
    out = _out_dir(args)
    run_name = Path(args.run_dir).name
    written = []
    if run.is_scene:
        if not 0 <= args.cloud < total:
            raise VisualizeError(
                f"--cloud {args.cloud} out of range: split {args.split!r} has {total} scenes"
            )
        scene = run.dataset.scenes(args.split)[args.cloud]
        stored = _read_test_predictions(run, scene) if args.split == "test" else None
        if stored is not None:
            points, predictions, labels, source = stored
            origin = f"from {source.relative_to(run.run_dir)}"
        else:
            points, predictions, labels = predict_scene(run, args.split, args.cloud, args.max_spheres)
            origin = "predicted on spheres covering the subsampled scene"
        hidden = args.hide if args.hide is not None else [n for n in names if n == "ceiling"]
        title = f"{run_name}: {args.split} scene {scene.name} ({len(points):,} points, {origin})" + (
            f"\nhidden: {', '.join(hidden)}" if hidden else ""
        )
        name = f"predictions_{args.split}{args.cloud}"
        written.append(
            plot_segmentation(
                points,
                predictions,
                labels,
                names,
                out / f"{name}.png",
                title,
                args.view,
                args.panel_size,
                args.max_draw_points,
                hidden,
            )
        )
        arrays = {"points": points, "predictions": predictions, "class_names": np.array(names)}
        if labels is not None:
            arrays["labels"] = labels
        written.append(_save_npz(out / f"{name}.npz", **arrays))
        palette = render.class_colors(len(names))
        written.append(
            _save_ply(
                out / f"{name}.ply",
                points,
                palette[predictions],
                preds=predictions.astype(np.int32),
                **({} if labels is None else {"labels": np.asarray(labels, np.int32)}),
            )
        )
        return written

    from utils.visualize_model import sample

    count = min(args.count, total)
    if run.task == "classification":
        labels_all = np.array([c.label for c in run.dataset.clouds(args.split)])
        # Round-robin over the true classes so that every class shows.
        by_class = [list(np.flatnonzero(labels_all == c)) for c in range(len(names))]
        indices = []
        while len(indices) < count:
            for group in by_class:
                if group and len(indices) < count:
                    indices.append(int(group.pop(0)))
        samples = [sample(run, args.split, i) for i in indices]
        predicted = predict_samples(run, samples)
        cols = min(count, 4)
        rows = -(-count // cols)
        correct = sum(int(p == s.label) for p, s in zip(predicted, samples))
        figure, axes = render.grid_figure(
            rows,
            cols,
            args.panel_size,
            f"{run_name}: {count} {args.split} objects, predicted / true class "
            f"({correct} of {count} right; red: wrong)",
        )
        for slot in range(rows * cols):
            ax = axes[slot // cols][slot % cols]
            if slot >= count:
                ax.set_axis_off()
                continue
            s, p = samples[slot], int(predicted[slot])
            ok = p == s.label
            color = render.class_colors(len(names))[s.label]
            render.draw_cloud(
                ax, s.points, np.tile(color, (len(s.points), 1)), args.view, args.max_draw_points
            )
            render.panel_title(ax, f"pred {names[p]} / true {names[s.label]}", "black" if ok else "red")
        name = f"predictions_{args.split}_gallery"
        written.append(render.save_png(figure, out / f"{name}.png"))
        written.append(
            _save_npz(
                out / f"{name}.npz",
                cloud_indices=np.array(indices),
                predicted=np.array(predicted),
                true=np.array([s.label for s in samples]),
                class_names=np.array(names),
            )
        )
        return written

    # object part segmentation: one row per object
    samples = [sample(run, args.split, i) for i in range(count)]
    predicted = predict_samples(run, samples)
    arrays = {}
    for i, (s, p) in enumerate(zip(samples, predicted)):
        part_names = _part_names(run, s)
        name = f"predictions_{args.split}{i}"
        written.append(
            plot_segmentation(
                s.points,
                p,
                s.point_labels,
                part_names,
                out / f"{name}.png",
                f"{run_name}: {args.split} object {i} ({s.name}), parts",
                args.view,
                args.panel_size,
                args.max_draw_points,
            )
        )
        arrays[f"{i}_points"], arrays[f"{i}_predicted"] = s.points, p
        if s.point_labels is not None:
            arrays[f"{i}_labels"] = s.point_labels
    written.append(_save_npz(out / f"predictions_{args.split}_parts.npz", **arrays))
    return written


def _part_names(run, s):
    parts = run.dataset.num_parts
    count = (
        parts[s.label]
        if parts
        else int(max(s.point_labels.max() if s.point_labels is not None else 0, 1)) + 1
    )
    named = getattr(run.dataset, "part_names", None)
    if named and len(named) > s.label and len(named[s.label]) == count:
        return list(named[s.label])
    return [f"part {i}" for i in range(count)]


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser():
    from training.config import add_override_argument

    parser = argparse.ArgumentParser(
        prog="python -m utils.visualize",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def common(sub, clouds=True):
        if clouds:
            sub.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by training.train")
        sub.add_argument("--out", help="output directory (default RUN_DIR/visualizations)")
        sub.add_argument("--checkpoint", default="last", help="last, best or epoch_NNNN (a snapshot)")
        sub.add_argument(
            "--tensorboard",
            action="store_true",
            help="also log the images as TensorBoard image summaries into RUN_DIR/tensorboard",
        )
        sub.add_argument("--panel-size", type=int, default=DEFAULT_PANEL_PX, help="pixels per panel")
        add_override_argument(sub)
        if clouds:
            sub.add_argument("--split", default="test", help="dataset split the clouds come from")
            sub.add_argument(
                "--max-draw-points",
                type=int,
                default=render.MAX_DRAW_POINTS,
                help="points drawn per panel at most (clouds are subsampled for drawing only)",
            )
            sub.add_argument(
                "--view", choices=sorted(render.VIEWS), default="oblique", help="view of the clouds"
            )

    kernels = commands.add_parser("kernels", help="kernel point dispositions")
    kernels.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR")
    kernels.add_argument("--k", type=int, nargs="+", help="numbers of kernel points of dispositions to draw")
    kernels.add_argument("--fixed", nargs="+", choices=FIXED_MODES, help="fixed modes (default center)")
    common(kernels, clouds=False)

    deformations = commands.add_parser("deformations", help="rigid vs deformed kernels at chosen points")
    common(deformations)
    deformations.add_argument("--cloud", type=int, default=0, help="index of the cloud (scene) in the split")
    group = deformations.add_mutually_exclusive_group()
    group.add_argument("--points", help="comma-separated input point indices of the cloud")
    group.add_argument("--auto", type=int, default=None, help="pick N points on corners / edges / planes (3)")
    deformations.add_argument("--stat-clouds", type=int, default=8, help="clouds for the lost-share table")

    erf = commands.add_parser("erf", help="effective receptive field at a point")
    common(erf)
    erf.add_argument("--compare", metavar="RUN_DIR2", help="a second run drawn beside (same dataset)")
    erf.add_argument("--cloud", type=int, default=0)
    erf.add_argument(
        "--point", type=int, default=None, help="input point index (default: nearest the centroid)"
    )
    erf.add_argument(
        "--layer", default=None, help="block key, e.g. l3_0 (default: the last block of the middle layer)"
    )
    erf.add_argument("--channel", type=int, default=None, help="one channel (default: sum over channels)")

    features = commands.add_parser("features", help="one channel's activation over the input clouds")
    common(features)
    features.add_argument(
        "--layer", default=None, help="block key (default: the last block of the middle layer)"
    )
    features.add_argument("--channel", type=int, default=None, help="channel (default: the most active)")
    features.add_argument("--cloud", default="0", help="comma-separated cloud indices")
    features.add_argument(
        "--top", type=int, default=None, help="search the split for the N most activating clouds"
    )
    features.add_argument(
        "--search-clouds",
        type=int,
        default=None,
        help="with --top: search the first M clouds only (scenes: M input spheres)",
    )

    predictions = commands.add_parser("predictions", help="predicted vs true classes")
    common(predictions)
    predictions.add_argument("--cloud", type=int, default=0, help="scene index (scene datasets)")
    predictions.add_argument(
        "--count", type=int, default=12, help="objects in the gallery / segmented objects"
    )
    predictions.add_argument(
        "--hide",
        nargs="*",
        default=None,
        help="classes left out of the drawing (default for scenes: ceiling, if present)",
    )
    predictions.add_argument(
        "--max-spheres",
        type=int,
        default=400,
        help="scenes without test predictions: at most this many input spheres",
    )
    return parser


RUNNERS = {
    "kernels": command_kernels,
    "deformations": command_deformations,
    "erf": command_erf,
    "features": command_features,
    "predictions": command_predictions,
}


def run(argv=None) -> list[Path]:
    """Parses ``argv`` and runs the command; returns the written paths (VisualizeError on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.panel_size < 64:
        raise VisualizeError(f"--panel-size must be >= 64 pixels, got {args.panel_size}")
    if getattr(args, "max_draw_points", 1) < 1:
        raise VisualizeError(f"--max-draw-points must be >= 1, got {args.max_draw_points}")
    cloud = getattr(args, "cloud", None)
    if isinstance(cloud, int) and cloud < 0:
        raise VisualizeError(f"--cloud must be >= 0, got {cloud}")
    if args.tensorboard and args.run_dir is None:
        raise VisualizeError("--tensorboard needs RUN_DIR (images go to RUN_DIR/tensorboard)")
    from kpconv_tf.config import ConfigError

    try:
        written = RUNNERS[args.command](args)
    except ConfigError as error:
        raise VisualizeError(f"--set: {error}") from None
    if args.tensorboard:
        step = _run_step(args.run_dir)
        render.write_tensorboard_images(
            Path(args.run_dir) / "tensorboard", [p for p in written if p.suffix == ".png"], step
        )
    return written


def _run_step(run_dir) -> int:
    """The run's step count (``state.json``): the TensorBoard step of the images."""
    import json

    state = Path(run_dir) / "state.json"
    return int(json.loads(state.read_text()).get("steps", 0)) if state.is_file() else 0


def main(argv=None):
    try:
        written = run(argv)
    except VisualizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
