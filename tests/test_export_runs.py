"""training.export: SavedModels of our own runs (tiny KP-FCNN on the embedded rooms, tiny KP-CNN on the
embedded shapes) and of original runs; the portable graph holds no Kpconv* op and loads in a process
that cannot import tf_custom_ops; raw-point serving equals the run directory; training.predict driven
by the SavedModel equals training.predict driven by the run directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn.neighbors import KDTree
from test_predict import ROOMS_TINY, SHAPES, SHAPES_TINY, synthetic_room, write_room
from tiny_runs import train_tiny

from training import export, predict
from utils.point_files import read_point_file

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT / "tests" / "fixtures" / "original_tf" / "train_public" / "kpcnn"


@pytest.fixture(scope="module")
def rooms_run(module_cache, tmp_path_factory):
    return train_tiny(tmp_path_factory, "embedded_rooms", ROOMS_TINY)


@pytest.fixture(scope="module")
def rooms_saved(rooms_run, tmp_path_factory):
    return export.export_run(rooms_run, tmp_path_factory.mktemp("export") / "rooms", "last")


def graph_ops(saved_model_dir) -> set:
    """Op names of every node of the SavedModel's graphs, functions of the library included."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(Path(saved_model_dir, "saved_model.pb").read_bytes())
    names = set()
    for meta_graph in proto.meta_graphs:
        names.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            names.update(node.op for node in function.node_def)
    return names


def sphere_inputs(config, n=4000, seed=0):
    """Raw points of one sphere (any density) and their features as the rooms config builds them
    (ones, rgb, absolute z): float32 [N, 3], float32 [N, 5]."""
    points, rgb = synthetic_room(n, seed)
    keep = np.linalg.norm(points - [2.0, 1.5, 1.0], axis=1) < config.dataset.in_radius
    points, rgb = points[keep].astype(np.float32), rgb[keep].astype(np.float32) / 255
    assert config.dataset.in_features_dim == 5
    features = np.concatenate([np.ones((len(points), 1), np.float32), rgb, points[:, 2:]], 1)
    return points, features


def run_directory_probabilities(model, points, features):
    """What the run directory predicts for every raw point: compiled subsampling, network, nearest."""
    lengths = np.array([len(points)], np.int32)
    dl = model.config.model.first_subsampling_dl
    sub_points, _, sub_features = export.grid_subsampling(points, lengths, dl, features, "compiled")
    probs = model.probabilities(sub_points.numpy(), sub_features.numpy(), [len(sub_points)])
    nearest = KDTree(sub_points.numpy()).query(points, k=1, return_distance=False)[:, 0]
    return probs[nearest]


def test_portable_graph_holds_no_kpconv_op_and_fast_cpu_keeps_them(rooms_run, rooms_saved, tmp_path):
    ops = graph_ops(rooms_saved)
    assert "BatchMatMulV2" in ops or "MatMul" in ops  # the network is in the graph
    assert not [op for op in ops if op.startswith("Kpconv")]
    assert not (rooms_saved / "README.txt").exists()
    fast = export.export_run(rooms_run, tmp_path / "fast", "last", portable=False)
    assert {"KpconvBatchNeighbors", "KpconvBatchGridSubsampling"} <= graph_ops(fast)
    assert "import tf_custom_ops" in (fast / "README.txt").read_text()


@pytest.mark.slow
def test_portable_savedmodel_loads_without_the_ops_and_matches_the_run(rooms_run, rooms_saved, tmp_path):
    model = predict.open_model(rooms_run, "last", implementation="standard")
    points, features = sphere_inputs(model.config)
    expected = run_directory_probabilities(model, points, features)
    # The compiled kernel_aggregate sums in another order: a tiny, barely trained network amplifies
    # the float32 differences (batch norm of near-constant features), hence the looser bound.
    fused = run_directory_probabilities(predict.open_model(rooms_run, "last"), points, features)
    np.savez(tmp_path / "sphere.npz", points=points, features=features)
    code = f"""
import json, sys
sys.modules["tf_custom_ops"] = None  # any import of the compiled ops fails
import numpy as np, tensorflow as tf
d = np.load({str(tmp_path / "sphere.npz")!r})
m = tf.saved_model.load({str(rooms_saved)!r})
out = m.signatures["serving_default"](points=tf.constant(d["points"]), features=tf.constant(d["features"]),
                                      lengths=tf.constant([len(d["points"])], tf.int32))
np.save({str(tmp_path / "probs.npy")!r}, out["probabilities"].numpy())
print(json.dumps({{"task": m.task.numpy().decode(), "classes": [c.decode() for c in m.class_names.numpy()],
                  "portable": bool(m.portable.numpy()), "yaml": len(m.config_yaml.numpy())}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["task"] == "scene" and info["classes"] == model.class_names and info["portable"]
    assert info["yaml"] > 100
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(points), len(model.class_names))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs, fused, atol=1e-3)


def test_subsampled_signature_matches_the_run(rooms_run, rooms_saved):
    model = predict.open_model(rooms_run, "last", implementation="standard")
    saved = predict.open_model(rooms_saved)
    assert saved.task == "scene" and saved.class_names == model.class_names
    assert saved.config.to_dict() == model.config.to_dict()
    points, features = sphere_inputs(model.config, seed=4)
    sub_points, sub_lengths, sub_features = export.grid_subsampling(
        points, [len(points)], model.config.model.first_subsampling_dl, features, "standard"
    )
    args = sub_points.numpy(), sub_features.numpy(), sub_lengths.numpy()
    np.testing.assert_allclose(saved.probabilities(*args), model.probabilities(*args), atol=1e-5)


def test_standard_subsampling_averages_features_as_the_compiled_op():
    rng = np.random.default_rng(0)
    points = (rng.random((3000, 3)) * 2).astype(np.float32)
    points[:200] = np.round(points[:200] / 0.1) * 0.1  # points on cell faces
    lengths = np.array([1000, 0, 1, 1999], np.int32)
    features = rng.random((3000, 4)).astype(np.float32)
    compiled = export.grid_subsampling(points, lengths, 0.1, features, "compiled")
    standard = tf.function(lambda p, l, f: export.grid_subsampling(p, l, 0.1, f, "standard"))(
        points, lengths, features
    )
    for a, b in zip(compiled, standard):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_predict_driven_by_the_savedmodel_equals_the_run_directory(rooms_run, rooms_saved, tmp_path):
    write_room(tmp_path / "tile.las", n=5000, seed=2, offset=(1000.0, 2000.0, 0.0))
    outputs = {}
    for name, model in (("run", rooms_run), ("saved", rooms_saved)):
        out = tmp_path / name
        assert (
            predict.main(
                [
                    str(model),
                    str(tmp_path / "tile.las"),
                    "--out",
                    str(out),
                    "--votes",
                    "1.5",
                    "--probabilities",
                    "--checkpoint",
                    "last",
                    "--implementation",
                    "standard",
                ]
            )
            == 0
        )
        outputs[name] = read_point_file(out / "tile.ply").fields
    from training.datasets.embedded_rooms import CLASSES

    probs = {k: np.stack([np.asarray(v[c], np.float64) for c in CLASSES], 1) for k, v in outputs.items()}
    np.testing.assert_allclose(probs["saved"], probs["run"], atol=1e-5)
    top2 = np.sort(probs["run"], 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    np.testing.assert_array_equal(
        np.asarray(outputs["saved"]["pred"])[clear], np.asarray(outputs["run"]["pred"])[clear]
    )


@pytest.mark.slow
def test_classification_export_serves_batched_raw_clouds(module_cache, tmp_path_factory, tmp_path):
    from training.datasets.embedded_shapes import EmbeddedShapes

    run_dir = train_tiny(tmp_path_factory, "embedded_shapes", SHAPES_TINY)
    assert export.main([str(run_dir), str(tmp_path / "saved"), "--checkpoint", "last"]) == 0
    model = predict.open_model(run_dir, "last")
    clouds = EmbeddedShapes(0.04, (1, 1), seed=6, classes=SHAPES).clouds("test")[:2]
    points = np.concatenate([c.points for c in clouds]).astype(np.float32)
    features = np.concatenate(
        [
            np.ones((len(points), 1), np.float32),
            np.concatenate([c.normals for c in clouds]).astype(np.float32),
        ],
        1,
    )
    lengths = np.array([len(c.points) for c in clouds], np.int32)
    sub = export.grid_subsampling(
        points, lengths, model.config.model.first_subsampling_dl, features[:, 1:], "compiled"
    )
    sub_features = np.concatenate([np.ones((len(sub[0]), 1), np.float32), sub[2].numpy()], 1)
    expected = model.probabilities(sub[0].numpy(), sub_features, sub[1].numpy())
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    got = loaded.signatures["serving_default"](
        points=tf.constant(points), features=tf.constant(features), lengths=tf.constant(lengths)
    )["probabilities"].numpy()
    assert got.shape == (2, len(SHAPES)) and loaded.task.numpy() == b"classification"
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_an_original_run_exports_as_kpconv_tf_export_reads_it(tmp_path):
    from kpconv_tf import convert
    from kpconv_tf.pyramid import build_pyramid

    run = tmp_path / "original"
    (run / "snapshots").mkdir(parents=True)
    shutil.copy(ORIGINAL / "parameters.txt", run / "parameters.txt")
    config = convert.config_from_original(run / "parameters.txt")
    network = convert.load_original_checkpoint(str(ORIGINAL / "init_ckpt" / "model.ckpt"), config)
    convert.save_original_checkpoint(network, run / "snapshots" / "snap-7")
    assert export.is_original_run(run)
    saved = export.export_run(run, tmp_path / "saved")
    assert not [op for op in graph_ops(saved) if op.startswith("Kpconv")]
    loaded = tf.saved_model.load(str(saved))
    assert loaded.task.numpy() == b"classification"
    assert len(loaded.class_names.numpy()) == config.dataset.num_classes
    points = np.random.default_rng(3).normal(size=(400, 3)).astype(np.float32) * 0.3
    features = np.ones((400, config.dataset.in_features_dim), np.float32)
    inputs = build_pyramid(points, [400], features, config.model)
    got = loaded.subsampled(tf.constant(points), tf.constant(features), tf.constant([400]))["probabilities"]
    np.testing.assert_allclose(got, tf.nn.softmax(network(inputs, training=False)), atol=1e-5)
