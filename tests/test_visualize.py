"""utils.visualize: every subcommand on tiny trained runs (rigid, deformable, scene segmentation),
the ERF against finite differences, the lost-kernel-point share, bounded drawing of huge clouds,
frame filling, TensorBoard images and argument errors."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.image import imread
from tiny_runs import train_tiny

from utils import visualize, visualize_model
from utils import visualize_render as render
from utils.ply import read_ply, write_ply

LIDAR_TINY = [
    "dataset.extra={train_per_class: 4, test_per_class: 2, seed: 1}",
    "dataset.validation_size=1",
    "model.first_subsampling_dl=0.1",
    "model.first_features_dim=8",
    "train.batch_num=4",
    "train.epoch_steps=2",
    "train.max_epoch=1",
]
ROOMS_TINY = [
    "dataset.extra={num_train: 2, num_test: 1, seed: 1}",
    "dataset.validation_size=1",
    "dataset.in_radius=1.5",
    "model.first_subsampling_dl=0.15",
    "model.first_features_dim=8",
    "train.batch_num=2",
    "train.epoch_steps=2",
    "train.max_epoch=1",
]
PANEL = 128
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rigid_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_lidar_rigid", LIDAR_TINY)


@pytest.fixture(scope="module")
def deformable_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_lidar", LIDAR_TINY)


@pytest.fixture(scope="module")
def rooms_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_rooms", ROOMS_TINY)


def run_cli(*argv):
    return visualize.run([str(a) for a in argv])


def pngs(paths):
    return [p for p in paths if p.suffix == ".png"]


def assert_picture(path, width, height):
    """A PNG of the expected size whose pixels are not all alike."""
    image = imread(path)
    assert image.shape[:2] == (height, width), path
    assert float(np.var(image[..., :3])) > 1e-3, f"{path} is blank"
    return image


def grid_size(rows, cols, panel=PANEL, footer=0, width=None):
    return cols * (width or panel), rows * panel + render.HEADER_PX + footer


# ----------------------------------------------------------------------------------------------
# numbers


def test_lost_share_zero_for_a_centred_rigid_kernel_and_one_for_far_kernel_points():
    extent = 0.1
    axis = np.arange(-0.35, 0.36, 0.02)
    dense = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    query = np.zeros((1, 3), np.float32)
    neighbors = np.arange(len(dense), dtype=np.int32)[None]
    from kpconv_tf.kernel_points import load_kernels

    kernel = load_kernels(1.5 * extent, 15, "center", seed=3)
    per_query, norm, share = visualize_model.lost_shares(kernel, query, dense, neighbors, extent)
    assert share == 0.0 and per_query.tolist() == [0.0] and norm == 0.0
    pushed = kernel[None] + np.array([10.0, 0, 0], np.float32)
    per_query, norm, share = visualize_model.lost_shares(pushed, query, dense, neighbors, extent, kernel)
    assert share == 1.0 and per_query.tolist() == [1.0]
    assert norm == pytest.approx(100.0, rel=1e-5)
    half = kernel[None].copy()
    half[0, ::2] += 10.0
    assert visualize_model.lost_shares(half, query, dense, neighbors, extent)[2] == pytest.approx(8 / 15)


def _tiny_network():
    from kpconv_tf.config import Config
    from kpconv_tf.models import KPCNN, dummy_inputs
    from training.config import resolve_config_path

    config = Config.from_yaml(
        resolve_config_path("embedded_shapes"),
        [
            "dataset.num_classes=3",
            "model.first_features_dim=4",
            "model.first_subsampling_dl=0.2",
            "model.density_parameter=2.5",
            "model.architecture=[simple, resnetb, resnetb_strided, resnetb, global_average]",
            "model.kernel_seed=1",
        ],
    )
    tf.keras.utils.set_random_seed(5)
    network = KPCNN(config)
    network(dummy_inputs(config), training=False)
    for variable in network.variables:  # non-trivial batch-norm statistics
        if "moving_mean" in variable.path or "moving_variance" in variable.path:
            variable.assign(tf.random.uniform(variable.shape, 0.5, 1.5, seed=7))
    return config, network


def test_erf_is_the_gradient_checked_against_finite_differences():
    from kpconv_tf.pyramid import build_pyramid

    config, network = _tiny_network()
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (300, 3)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)  # a sphere: empty inside
    features = rng.uniform(0.5, 1.5, (300, 4)).astype(np.float32)
    inputs = build_pyramid(points, np.array([300], np.int32), features, config.model)
    key = visualize_model.find_block(network, "l0_1").key  # simple + resnetb: a field of radius <= 1
    point = 3
    gradient, response = visualize_model.erf_gradient(network, inputs, key, point)
    assert gradient.shape == features.shape
    outputs = visualize_model.block_outputs(network, inputs)[key]
    assert response == pytest.approx(float(tf.reduce_sum(outputs[point])), rel=1e-5)

    def response_of(f):
        return float(
            tf.reduce_sum(visualize_model.block_outputs(network, {**inputs, "features": f})[key][point])
        )

    magnitude = np.abs(gradient)
    assert 0 < np.mean(magnitude.sum(1) > 0) < 1, "a local field: some input points influence, others not"
    flat = np.argsort(-magnitude.ravel())
    zeros = np.flatnonzero(magnitude.ravel() == 0)
    checked = list(flat[:6]) + list(rng.choice(flat[:200], 4, replace=False)) + list(rng.choice(zeros, 3))
    eps = 1e-2
    for index in checked:
        row, col = np.unravel_index(index, features.shape)
        up, down = features.copy(), features.copy()
        up[row, col] += eps
        down[row, col] -= eps
        finite = (response_of(up) - response_of(down)) / (2 * eps)
        assert finite == pytest.approx(
            gradient[row, col], abs=2e-3 + 2e-2 * abs(float(gradient[row, col]))
        ), (row, col)
    # The field of one channel is the gradient of that channel alone.
    single, value = visualize_model.erf_gradient(network, inputs, key, point, channel=1)
    assert value == pytest.approx(float(outputs[point, 1]), rel=1e-5)


def test_values_are_carried_to_the_input_points_from_the_nearest_block_point():
    inputs = {
        "points_0": np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0], [0.1, 0, 0]], np.float32),
        "lengths_0": np.array([3, 1]),
        "points_1": np.array([[0.9, 0, 0], [4, 0, 0], [0, 0, 0]], np.float32),
        "lengths_1": np.array([2, 1]),
    }
    values = np.array([10.0, 20.0, 30.0])
    # Cloud 1's point (0.1, 0, 0) takes its own cloud's point (value 30), not cloud 0's nearer ones.
    assert visualize_model.to_input_points(inputs, values, 1).tolist() == [10.0, 10.0, 20.0, 30.0]
    assert visualize_model.to_input_points(inputs, np.array([1.0, 2.0]), None).tolist() == [1, 1, 1, 2]


def test_characteristic_points_find_corners_edges_and_planes():
    rng = np.random.default_rng(1)
    cube = rng.uniform(0, 1, (3000, 3))
    face = rng.integers(0, 3, 3000)
    cube[np.arange(3000), face] = rng.integers(0, 2, 3000)  # points on the faces of a unit cube
    picks = visualize_model.characteristic_points(cube, 6, radius=0.2)
    assert [kind for _, kind in picks] == ["corner", "edge", "plane"] * 2
    faces_near = {kind: [] for kind in ("corner", "edge", "plane")}
    for index, kind in picks:
        faces_near[kind].append(int(np.sum(np.minimum(cube[index], 1 - cube[index]) < 0.1)))
    assert faces_near == {"corner": [3, 3], "edge": [2, 2], "plane": [1, 1]}
    indices = [i for i, _ in picks]
    distances = np.linalg.norm(cube[indices][:, None] - cube[indices][None], axis=-1)
    assert np.min(distances[~np.eye(6, dtype=bool)]) >= 0.2  # spread out
    assert len(visualize_model.characteristic_points(cube[:5], 9, radius=0.2)) == 5


# ----------------------------------------------------------------------------------------------
# drawing


DRAW_BIG = """
import resource, sys, time
import numpy as np
from utils import visualize
rng = np.random.default_rng(0)
points = rng.normal(size=(2_000_000, 3)).astype(np.float32)
points[:, 2] *= 0.2
labels = (points[:, 0] > 0).astype(np.int32) + 2 * (points[:, 1] > 0)
predictions = labels.copy()
predictions[:100_000] = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
visualize.plot_segmentation(points, predictions, labels, ["a", "b", "c", "d"], sys.argv[1], "2M points",
                            panel_px=200)
print(time.perf_counter() - start, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_two_million_point_cloud_draws_in_bounded_time_and_memory(tmp_path):
    # A fresh interpreter (no TensorFlow) so that its peak memory is the drawing's.
    path = tmp_path / "big.png"
    result = subprocess.run(
        [sys.executable, "-c", DRAW_BIG, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, before_kb, peak_kb = (float(v) for v in result.stdout.split())
    assert seconds < 30, seconds
    # The cloud and its labels take 32 MB; drawing adds a bounded subset, not copies of the cloud.
    assert (peak_kb - before_kb) / 1024 < 200, (before_kb, peak_kb)
    assert_picture(path, 3 * 260, 200 + render.HEADER_PX + render.LEGEND_PX)


def test_views_fill_the_frame(tmp_path):
    rng = np.random.default_rng(2)
    # A small, far-away, elongated cloud must still fill its panel.
    points = 1000 + 0.01 * rng.normal(size=(3000, 3)) * np.array([4.0, 1.0, 1.0])
    for view in render.VIEWS:
        figure, axes = render.grid_figure(1, 1, 300, "frame")
        render.draw_cloud(axes[0][0], points, np.tile([0.2, 0.2, 0.8], (len(points), 1)), view)
        path = render.save_png(figure, tmp_path / f"{view}.png")
        image = assert_picture(path, 300, 300 + render.HEADER_PX)
        body = image[render.HEADER_PX + render.TITLE_PX :, :, :3]
        ink = np.argwhere(np.any(body < 0.9, axis=-1))
        extent = (ink.max(0) - ink.min(0) + 1) / np.array(body.shape[:2])
        assert extent.max() > 0.8, (view, extent)


def test_drawing_subset_is_bounded_seeded_and_complete_for_small_clouds():
    assert render.drawing_subset(10, 100).tolist() == list(range(10))
    subset = render.drawing_subset(1_000_000, 500, seed=4)
    assert len(subset) == 500 and len(np.unique(subset)) == 500
    assert np.array_equal(subset, render.drawing_subset(1_000_000, 500, seed=4))
    with pytest.raises(ValueError, match="max_points"):
        render.drawing_subset(10, 0)


def test_kernel_dispositions_for_any_k_and_fixed_mode(tmp_path, module_cache):
    written = run_cli(
        "kernels", "--k", 4, 12, "--fixed", "center", "none", "--out", tmp_path, "--panel-size", PANEL
    )
    assert_picture(pngs(written)[0], *grid_size(4, 3))
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    assert sorted(arrays.files) == ["k12_center", "k12_none", "k4_center", "k4_none"]
    centre = arrays["k12_center"]
    assert centre.shape == (12, 3) and np.allclose(centre[0], 0, atol=1e-9)
    assert np.mean(np.linalg.norm(centre[1:], axis=1)) == pytest.approx(1.5, rel=1e-6)
    ply = read_ply(next(p for p in written if p.suffix == ".ply"))
    assert len(ply) == 32 and {"red", "green", "blue", "disposition"} <= set(ply.dtype.names)


# ----------------------------------------------------------------------------------------------
# the subcommands on trained runs


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_kernels_of_a_trained_run(rigid_run):
    written = run_cli("kernels", rigid_run, "--panel-size", PANEL)
    assert all(Path(p).parent == rigid_run / "visualizations" for p in written)
    run = visualize_model.load_visual_run(rigid_run)
    convs = visualize._conv_layers(run.network)
    assert_picture(pngs(written)[0], *grid_size(len(convs), 3))
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    for key, conv in convs:
        assert np.allclose(arrays[key] * arrays[f"{key}_extent"], conv.kernel_points.numpy(), atol=1e-6)


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_deformations_of_a_deformable_run(deformable_run):
    written = run_cli("deformations", deformable_run, "--auto", 2, "--stat-clouds", 2, "--panel-size", PANEL)
    from kpconv_tf.models import deformable_keys

    run = visualize_model.load_visual_run(deformable_run)
    deformable = deformable_keys(run.network)
    assert deformable == ["l3_0", "l3_1", "l4_0"]  # the deformable blocks of the embedded_lidar architecture
    figure, chart = pngs(written)
    assert_picture(figure, *grid_size(2, 1 + 2 * len(deformable)))
    imread(chart)
    rows = list(csv.DictReader(next(p for p in written if p.suffix == ".csv").read_text().splitlines()))
    deformed_rows = [r for r in rows if r["deformed_lost_share"] != ""]
    assert [r["layer"] for r in deformed_rows] == deformable
    for r in rows:
        assert 0.0 <= float(r["rigid_lost_share"]) <= 1.0
    # The table's lost share of one cloud is what training logs for that forward pass.
    cloud = visualize_model.sample(run, "test", 0)
    table = visualize.lost_share_table(run, [cloud])
    inputs, _ = visualize_model.make_inputs(run, [cloud])
    run.network(inputs, training=False)
    for key, (norm, share) in run.network.deformation_statistics().items():
        assert table[key][0] == pytest.approx(float(share), abs=1e-6)
        assert table[key][2] == pytest.approx(float(norm), rel=1e-4, abs=1e-7)
    ply = read_ply(next(p for p in written if p.suffix == ".ply"))
    assert set(np.unique(ply["kind"])) == {0, 1, 2}
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    assert len(arrays["chosen"]) == 2


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_deformations_of_a_rigid_run_show_its_rigid_kernels(rigid_run):
    written = run_cli("deformations", rigid_run, "--points", "0,5", "--stat-clouds", 1, "--panel-size", PANEL)
    figure = pngs(written)[0]
    image = imread(figure)
    assert image.shape[0] == 2 * PANEL + render.HEADER_PX and image.shape[1] % PANEL == 0
    assert float(np.var(image[..., :3])) > 1e-3
    rows = list(csv.DictReader(next(p for p in written if p.suffix == ".csv").read_text().splitlines()))
    assert rows and all(r["deformed_lost_share"] == "" for r in rows)


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_erf_rigid_beside_deformable(rigid_run, deformable_run):
    written = run_cli(
        "erf", rigid_run, "--compare", deformable_run, "--layer", "l3_0", "--panel-size", PANEL, "--cloud", 1
    )
    width = int(PANEL * 1.2)
    assert_picture(pngs(written)[0], *grid_size(2, 2, footer=render.LEGEND_PX, width=width))
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    for column in (0, 1):
        erf = arrays[f"{column}_erf"]
        assert erf.shape == (len(arrays[f"{column}_points"]),) and erf.max() > 0
    # The saved field is the summed |gradient| at the block's row nearest the chosen point.
    run = visualize_model.load_visual_run(rigid_run)
    cloud = visualize_model.sample(run, "test", 1)
    inputs, _ = visualize_model.make_inputs(run, [cloud])
    level = visualize_model.find_block(run.network, "l3_0").level
    point = cloud.points[int(arrays["0_point"])]
    row = int(np.argmin(np.sum(np.square(np.asarray(inputs[f"points_{level}"]) - point), axis=1)))
    gradient, _ = visualize_model.erf_gradient(run.network, inputs, "l3_0", row)
    np.testing.assert_allclose(arrays["0_erf"], np.abs(gradient).sum(1), rtol=1e-5, atol=1e-7)
    ply = read_ply(next(p for p in written if p.suffix == ".ply"))
    assert "erf" in ply.dtype.names


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_features_top_clouds(deformable_run):
    written = run_cli(
        "features",
        deformable_run,
        "--layer",
        "l1_1",
        "--channel",
        2,
        "--top",
        3,
        "--search-clouds",
        6,
        "--panel-size",
        PANEL,
    )
    assert_picture(pngs(written)[0], *grid_size(1, 3, footer=render.LEGEND_PX))
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    maxima = arrays["max_activation_per_cloud"][:, 2]
    top = np.argsort(-maxima, kind="stable")[:3]
    shown = sorted(
        int(k[len("cloud") : -len("_activation")]) for k in arrays.files if k.endswith("_activation")
    )
    assert shown == sorted(arrays["cloud_indices"][top].tolist())
    for index in shown:
        assert arrays[f"cloud{index}_activation"].max() == pytest.approx(
            maxima[list(arrays["cloud_indices"]).index(index)]
        )


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_features_of_chosen_clouds_default_channel(rigid_run):
    written = run_cli("features", rigid_run, "--cloud", "0,1", "--panel-size", PANEL)
    assert_picture(pngs(written)[0], *grid_size(1, 2, footer=render.LEGEND_PX))


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_predictions_gallery_of_a_classification_run(deformable_run):
    written = run_cli("predictions", deformable_run, "--count", 6, "--panel-size", PANEL)
    assert_picture(pngs(written)[0], *grid_size(2, 4))
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    assert len(arrays["predicted"]) == 6
    assert len(set(arrays["true"].tolist())) == 6  # round robin over the 6 classes


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_predictions_of_a_scene_predicted_here_and_from_test_output(rooms_run):
    written = run_cli("predictions", rooms_run, "--panel-size", PANEL, "--view", "top")
    size = (3 * int(PANEL * 1.3), PANEL + render.HEADER_PX + render.LEGEND_PX)
    assert_picture(pngs(written)[0], *size)
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    run = visualize_model.load_visual_run(rooms_run)
    scene = run.dataset.scenes("test")[0]
    assert len(arrays["predictions"]) == len(scene.points)
    # training.test's full-resolution output is used when present.
    out = rooms_run / "test" / "predictions" / "predictions"
    out.mkdir(parents=True)
    n = 5000
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 3, (n, 3)).astype(np.float32)
    write_ply(
        out / f"{scene.name}.ply",
        {
            "x": pts[:, 0],
            "y": pts[:, 1],
            "z": pts[:, 2],
            "preds": np.full(n, 1, np.int32),
            "labels": np.full(n, 2, np.int32),
        },
    )
    written = run_cli("predictions", rooms_run, "--panel-size", PANEL, "--tensorboard")
    arrays = np.load(next(p for p in written if p.suffix == ".npz"))
    assert len(arrays["predictions"]) == n and set(arrays["labels"].tolist()) == {2}
    assert_picture(pngs(written)[0], *size)
    tags = set()
    for event_file in (rooms_run / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags |= {value.tag for value in event.summary.value}
    assert f"visualizations/{pngs(written)[0].stem}" in tags


# ----------------------------------------------------------------------------------------------
# errors


def error_of(capsys, *argv):
    code = visualize.main([str(a) for a in argv])
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.slow  # trains tiny runs (module fixtures)
def test_bad_arguments_give_clear_errors(tmp_path, capsys, rigid_run, rooms_run):
    assert "RUN_DIR" in error_of(capsys, "erf", tmp_path / "missing")
    assert "RUN_DIR or --out" in error_of(capsys, "kernels", "--k", 5)
    assert "--k" in error_of(capsys, "kernels", "--k", 0, "--out", tmp_path)
    assert "--fixed needs --k" in error_of(capsys, "kernels", "--fixed", "none", "--out", tmp_path)
    message = error_of(capsys, "erf", rigid_run, "--layer", "l9_9")
    assert "--layer 'l9_9'" in message and "l0_0" in message
    assert "--point" in error_of(capsys, "erf", rigid_run, "--point", 10**6)
    assert "--channel" in error_of(capsys, "features", rigid_run, "--channel", 10**4)
    assert "--cloud" in error_of(capsys, "features", rigid_run, "--cloud", 999)
    assert "--cloud must be >= 0" in error_of(capsys, "predictions", rigid_run, "--cloud", -1)
    assert "--points" in error_of(capsys, "deformations", rigid_run, "--points", "0,x")
    assert "--points [100000]" in error_of(capsys, "deformations", rigid_run, "--points", "100000")
    assert "--auto" in error_of(capsys, "deformations", rigid_run, "--auto", 0)
    assert "--compare" in error_of(capsys, "erf", rigid_run, "--compare", rooms_run)
    assert "--split 'nope'" in error_of(capsys, "features", rigid_run, "--split", "nope")
    assert "--panel-size" in error_of(capsys, "kernels", "--k", 5, "--out", tmp_path, "--panel-size", 3)
    with pytest.raises(SystemExit):
        visualize.run(["kernels", "--k", "5", "--fixed", "sideways"])
    assert "--fixed" in capsys.readouterr().err
