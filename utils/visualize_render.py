"""Drawing helpers of ``utils.visualize``: point clouds as orthographic views on matplotlib's Agg
canvas (no display), with the cloud filling its panel, subsampled for drawing only.

A view is an orthographic projection after a rotation by ``azimuth`` about the vertical axis and
``elevation`` above the horizontal plane (degrees): the horizontal screen axis, the vertical screen
axis and the depth towards the viewer. Points are drawn far to near (painter's order) and darkened
with depth, so the projection reads as 3-D without the empty margins of matplotlib's 3-D axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch

DPI = 100
# Points drawn per panel at most; the numbers saved beside the images keep every point.
MAX_DRAW_POINTS = 60_000
# (name, azimuth, elevation) in degrees
VIEWS = {"oblique": (-60.0, 30.0), "top": (0.0, 90.0), "front": (0.0, 0.0), "side": (90.0, 0.0)}
ERROR_COLOR = np.array([0.85, 0.1, 0.1])
CORRECT_COLOR = np.array([0.78, 0.78, 0.78])


def drawing_subset(count: int, max_points: int = MAX_DRAW_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``count`` points (uniform random, seeded):
    density looks the same, cost stays bounded whatever the cloud size."""
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if count <= max_points:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_points, replace=False))


def view_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """[3, 3] world -> screen (right, up, towards the viewer) for a camera at ``azimuth`` (about z,
    0 = looking along +y) and ``elevation`` (90 = from above)."""
    a, e = np.radians(azimuth), np.radians(elevation)
    right = np.array([np.cos(a), np.sin(a), 0.0])
    towards = np.array([np.sin(a) * np.cos(e), -np.cos(a) * np.cos(e), np.sin(e)])
    up = np.cross(towards, right)
    return np.stack([right, up, towards])


def project(points, azimuth: float, elevation: float):
    """(screen xy float64 [N, 2], depth towards the viewer [N]) of world points [N, 3]."""
    screen = np.asarray(points, np.float64) @ view_rotation(azimuth, elevation).T
    return screen[:, :2], screen[:, 2]


def class_colors(count: int) -> np.ndarray:
    """[count, 3] distinct RGB colours (tab10, Set2, Dark2; evenly spaced hues beyond 26 classes)."""
    base = np.array(colormaps["tab10"].colors + colormaps["Set2"].colors + colormaps["Dark2"].colors)[:, :3]
    if count <= len(base):
        return base[:count]
    return colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))[:, :3]


def scalar_colors(values, cmap="viridis", vmin=None, vmax=None):
    """(RGB [N, 3], Normalize) of scalar ``values`` through ``cmap``."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-12
    norm = Normalize(lo, hi)
    return colormaps[cmap](norm(np.nan_to_num(values, nan=lo)))[:, :3], norm


def new_figure(width_px: int, height_px: int) -> Figure:
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def fit_axes(axes, xy, margin=0.03):
    """Limits of ``axes`` to the bounding box of ``xy`` [N, 2], widened along one side to the panel's
    aspect ratio (equal scales, so the cloud fills the panel's width or height), axis lines off."""
    axes.set_axis_off()
    if len(xy) == 0:
        return
    lo, hi = np.min(xy, 0), np.max(xy, 0)
    centre = 0.5 * (lo + hi)
    span = np.maximum(hi - lo, 1e-9) * (1 + 2 * margin)
    box = axes.get_position()
    figure = axes.get_figure()
    width, height = box.width * figure.get_figwidth(), box.height * figure.get_figheight()
    scale = max(span[0] / width, span[1] / height)
    half = 0.5 * scale * np.array([width, height])
    axes.set_xlim(centre[0] - half[0], centre[0] + half[0])
    axes.set_ylim(centre[1] - half[1], centre[1] + half[1])
    axes.set_aspect("equal", adjustable="box")
    axes.set_autoscale_on(False)


def marker_size(axes, drawn: int, fill=0.6, lo=0.3, hi=40.0) -> float:
    """Marker area (points^2) so that ``drawn`` points cover about ``fill`` of the panel."""
    box = axes.get_position()
    figure = axes.get_figure()
    area = box.width * figure.get_figwidth() * box.height * figure.get_figheight() * 72.0**2
    return float(np.clip(fill * area / max(drawn, 1), lo, hi))


def draw_cloud(
    axes,
    points,
    colors,
    view="oblique",
    max_points=MAX_DRAW_POINTS,
    size=None,
    shade=0.45,
    frame_points=None,
    seed=0,
    alpha=1.0,
    zorder=1,
):
    """Scatters ``points`` [N, 3] with RGB ``colors`` [N, 3] in one view; returns the drawn indices.

    At most ``max_points`` are drawn (``drawing_subset``). The view fits the drawn points, or
    ``frame_points`` [M, 3] when given (e.g. so that overlays stay inside the frame). ``shade``: how
    much the farthest points are darkened (0: flat colours, for colour scales).
    """
    points = np.asarray(points, np.float64)
    colors = np.asarray(colors, np.float64)
    if colors.shape != (len(points), 3):
        raise ValueError(f"colors must be [{len(points)}, 3], got {colors.shape}")
    azimuth, elevation = VIEWS[view] if isinstance(view, str) else view
    drawn = drawing_subset(len(points), max_points, seed)
    xy, depth = project(points[drawn], azimuth, elevation)
    order = np.argsort(depth, kind="stable")
    shown = colors[drawn][order]
    if shade and len(depth) > 1 and np.ptp(depth) > 0:
        nearness = (depth[order] - depth.min()) / np.ptp(depth)
        shown = shown * (1.0 - shade + shade * nearness)[:, None]
    frame = xy if frame_points is None else project(frame_points, azimuth, elevation)[0]
    fit_axes(axes, frame)
    if size is None:
        size = marker_size(axes, len(drawn))
    axes.scatter(
        xy[order, 0],
        xy[order, 1],
        c=np.clip(shown, 0, 1),
        s=size,
        linewidths=0,
        marker="o",
        alpha=alpha,
        rasterized=True,
        zorder=zorder,
    )
    return drawn


def draw_spheres(axes, centres, radius, colors, view="oblique", edge=True, alpha=0.12, marker=30.0):
    """Kernel points as dots with their influence spheres (projected discs of ``radius``), far to
    near; ``colors`` one RGB or [K, 3]."""
    centres = np.asarray(centres, np.float64)
    azimuth, elevation = VIEWS[view] if isinstance(view, str) else view
    xy, depth = project(centres, azimuth, elevation)
    colors = np.broadcast_to(np.asarray(colors, np.float64), (len(centres), 3))
    for k in np.argsort(depth, kind="stable"):
        axes.add_patch(
            Circle(
                xy[k],
                radius,
                facecolor=(*colors[k], alpha),
                edgecolor=(*colors[k], 0.6) if edge else "none",
                linewidth=0.6,
                zorder=1,
            )
        )
        axes.scatter(
            [xy[k, 0]], [xy[k, 1]], s=marker, color=colors[k], edgecolors="black", linewidths=0.5, zorder=3
        )
    return xy


def class_legend(figure, names, colors, loc="lower center", ncol=None):
    handles = [Patch(facecolor=c, edgecolor="none", label=str(n)) for n, c in zip(names, colors)]
    figure.legend(handles=handles, loc=loc, ncol=ncol or min(len(names), 8), fontsize="small", frameon=False)


def colorbar(figure, cax, norm, cmap, label):
    """A horizontal colour bar drawn into ``cax`` (e.g. ``footer_axes``)."""
    from matplotlib.cm import ScalarMappable

    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def save_png(figure, path) -> Path:
    """Writes ``figure`` at its own size (``DPI``) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor=figure.get_facecolor())
    return path


def write_tensorboard_images(log_dir, pngs, step: int = 0):
    """The PNG files as TensorBoard image summaries (tag = file stem) in ``log_dir``."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for png in pngs:
            image = tf.io.decode_png(tf.io.read_file(str(png)), channels=3)
            tf.summary.image(f"visualizations/{Path(png).stem}", image[None], step=step)
    writer.flush()
    writer.close()


HEADER_PX = 56  # figure title band
TITLE_PX = 22  # per-panel title band (inside the panel)
LEGEND_PX = 44  # class legend / colour bar band under the panels


def grid_figure(rows: int, cols: int, panel_px: int, title: str, footer_px: int = 0, panel_width_px=None):
    """(figure, axes [rows][cols]) of ``rows x cols`` panels of ``panel_px`` pixels (plus a
    ``HEADER_PX`` title band and ``footer_px`` under the panels), laid out exactly: the figure is
    ``cols * panel_width_px`` x ``rows * panel_px + HEADER_PX + footer_px`` pixels."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a figure needs at least one panel, got {rows} x {cols}")
    width_px = panel_width_px or panel_px
    width, height = cols * width_px, rows * panel_px + HEADER_PX + footer_px
    figure = new_figure(width, height)
    set_title(figure, title)
    axes = []
    for r in range(rows):
        row = []
        for c in range(cols):
            top = height - HEADER_PX - r * panel_px
            box = [
                (c * width_px + 4) / width,
                (top - panel_px + 4) / height,
                (width_px - 8) / width,
                (panel_px - TITLE_PX - 4) / height,
            ]
            row.append(figure.add_axes(box))
        axes.append(row)
    return figure, axes


def set_title(figure, title, fontsize=10.5):
    """The figure title, wrapped to the figure's width (at most three lines fit ``HEADER_PX``)."""
    import textwrap

    width, height = figure.get_figwidth() * DPI, figure.get_figheight() * DPI
    chars = max(30, int(width / (0.62 * fontsize * DPI / 72)))
    lines = [wrapped for line in str(title).split("\n") for wrapped in (textwrap.wrap(line, chars) or [""])]
    size = fontsize if len(lines) <= 2 else fontsize * 0.8
    figure.suptitle("\n".join(lines[:3]), y=1 - 4 / height, va="top", fontsize=size)


def panel_title(axes, text, color="black"):
    axes.set_title(text, fontsize=8.5, color=color, pad=3)


def footer_axes(figure, footer_px: int, left=0.2, right=0.8):
    """A horizontal strip in the footer band (for a colour bar)."""
    height = figure.get_figheight() * DPI
    return figure.add_axes([left, (footer_px * 0.55) / height, right - left, (footer_px * 0.25) / height])
