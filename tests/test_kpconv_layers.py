"""The KPConv Keras layer: parity through the layer, serialisation, dynamic shapes."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from kpconv_reference import kpconv_reference, random_problem
from test_kpconv_ops import FIXTURES, rel_err

from kpconv_tf.layers import KPConv


def _deformable_layer_from_fixture(d, implementation="auto"):
    layer = KPConv(
        int(d["K_values"].shape[2]),
        15,
        extent=float(d["KP_extent"]),
        influence=str(d["influence"]),
        aggregation=str(d["aggregation"]),
        deformable=True,
        modulated=bool(d["modulated"]),
        kernel_seed=0,
        implementation=implementation,
    )
    layer(d["query_points"], d["support_points"], d["neighbors"], d["features"])
    layer.kernel_points.assign(d["K_points"])
    layer.kernel.assign(d["K_values"])
    layer.offset_conv_weights.assign(d["offset_weights"])
    layer.offset_conv_bias.assign(d["offset_bias"])
    return layer


@pytest.mark.parametrize("implementation", ["standard", "fused"])
@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(FIXTURES, "kpconv_deform_*.npz"))), ids=os.path.basename
)
def test_deformable_layer_matches_original(path, implementation):
    d = np.load(path)
    layer = _deformable_layer_from_fixture(d, implementation)
    x = tf.constant(d["features"])
    args = (d["query_points"], d["support_points"], d["neighbors"])
    with tf.GradientTape() as tape:
        tape.watch(x)
        out, deformed = layer(*args, x, return_deformed=True)
        loss = tf.reduce_sum(out * d["R"])
    raw, offsets, modulations = layer.offsets(*args, x)
    grads = tape.gradient(loss, [x, layer.kernel, layer.offset_conv_weights, layer.offset_conv_bias])
    assert rel_err(out, d["output"]) < 1e-5
    assert rel_err(raw, d["offset_features"]) < 1e-5
    assert rel_err(offsets, d["offsets"]) < 1e-5
    assert rel_err(deformed, d["deformed_K_points"]) < 1e-5
    if "modulations" in d:
        assert rel_err(modulations, d["modulations"]) < 1e-5
    assert rel_err(tf.convert_to_tensor(grads[0]), d["grad_features"]) < 1e-5
    assert rel_err(grads[1], d["grad_K_values"]) < 1e-5
    if "grad_offset_weights" in d:
        assert rel_err(grads[2], d["grad_offset_weights"]) < 1e-5
        assert rel_err(grads[3], d["grad_offset_bias"]) < 1e-5
    else:  # constant influence / closest: the task loss gives the offsets no gradient
        assert grads[2] is None or not np.any(tf.convert_to_tensor(grads[2]).numpy())


def test_rigid_layer_variables_and_reference():
    rng = np.random.default_rng(0)
    q, s, n, f, _, _ = random_problem(rng, d_in=4)
    layer = KPConv(6, 15, extent=0.3, radius=0.75, kernel_seed=3)
    out = layer(q, s, n, f)
    assert out.shape == (q.shape[0], 6)
    names = sorted(v.path.split("/")[-1] for v in layer.weights)
    assert names == ["kernel_points", "weights"]
    assert not layer.kernel_points.trainable and layer.offset_variables == []
    radii = np.linalg.norm(layer.kernel_points.numpy(), axis=1)
    assert np.mean(radii[radii > 0.1]) == pytest.approx(1.5 * 0.3, rel=0.05)
    ref = kpconv_reference(
        q, s, n, f, layer.kernel_points.numpy(), layer.kernel.numpy(), 0.3, "linear", "sum"
    )
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    # Original initialisation: truncated normal rounded to 1e-3, std sqrt(2 / Dout).
    w = layer.kernel.numpy()
    np.testing.assert_allclose(w * 1000, np.round(w * 1000), atol=1e-3)
    assert np.abs(w).max() <= 2 * np.sqrt(2 / 6) + 1e-3


def test_deformable_layer_variables():
    rng = np.random.default_rng(1)
    q, s, n, f, _, _ = random_problem(rng, d_in=4)
    layer = KPConv(5, 15, extent=0.3, deformable=True, modulated=True, kernel_seed=1)
    layer(q, s, n, f)
    assert layer.offset_conv_weights.shape == (15, 4, 60)
    assert layer.offset_conv_bias.shape == (60,)
    assert all("offset_conv" in v.path for v in layer.offset_variables)
    assert not np.any(layer.offset_conv_weights.numpy())
    # Zero offsets and modulations 2*sigmoid(0) = 1: the deformable layer equals the rigid form
    # restricted to in-range neighbours.
    out = layer(q, s, n, f).numpy()
    ref = kpconv_reference(
        q,
        s,
        n,
        f,
        layer.kernel_points.numpy(),
        layer.kernel.numpy(),
        0.3,
        "linear",
        "sum",
        np.zeros((q.shape[0], 15, 3)),
    )
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deformable", [False, True])
def test_serialisation_round_trip(tmp_path, deformable):
    rng = np.random.default_rng(2)
    q, s, n, f, _, _ = random_problem(rng, d_in=4)
    layer = KPConv(
        3,
        7,
        extent=0.3,
        influence="gaussian",
        aggregation="closest",
        deformable=deformable,
        kernel_seed=5,
        name="conv",
    )
    out = layer(q, s, n, f)
    clone = KPConv.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = [keras.Input((3,)), keras.Input((3,)), keras.Input((None,), dtype="int32"), keras.Input((4,))]
    model = keras.Model(inputs, layer(*inputs))
    path = tmp_path / "kpconv.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded([q, s, n, f]).numpy(), out.numpy(), rtol=1e-6, atol=1e-6)
    restored = [v for v in loaded.weights if "kernel_points" in v.path][0]
    np.testing.assert_array_equal(restored.numpy(), layer.kernel_points.numpy())


def test_dynamic_shapes_in_tf_function():
    rng = np.random.default_rng(4)
    layer = KPConv(4, 15, extent=0.3, deformable=True, kernel_seed=0)
    spec = [
        tf.TensorSpec([None, 3]),
        tf.TensorSpec([None, 3]),
        tf.TensorSpec([None, None], tf.int32),
        tf.TensorSpec([None, 4]),
    ]
    fn = tf.function(layer.__call__, input_signature=spec)
    for nq, ns, h in ((20, 40, 5), (33, 70, 9)):
        q, s, n, f, _, _ = random_problem(rng, nq=nq, ns=ns, h=h)
        np.testing.assert_allclose(fn(q, s, n, f).numpy(), layer(q, s, n, f).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="influence"):
        KPConv(4, influence="box")
    with pytest.raises(ValueError, match="modulated"):
        KPConv(4, modulated=True)
    with pytest.raises(ValueError, match="extent"):
        KPConv(4, extent=0.0)
    with pytest.raises(ValueError, match="fixed"):
        KPConv(4, fixed="corners")
    with pytest.raises(ValueError, match="implementation"):
        KPConv(4, implementation="gpu")


@pytest.mark.parametrize("deformable", [False, True])
def test_fused_and_standard_layers_agree(deformable):
    rng = np.random.default_rng(8)
    q, s, n, f, _, _ = random_problem(rng, d_in=4)
    standard, fused = (
        KPConv(
            5, 15, extent=0.3, deformable=deformable, modulated=deformable, kernel_seed=1, implementation=impl
        )
        for impl in ("standard", "fused")
    )
    x = tf.constant(f)
    standard(q, s, n, x)
    fused(q, s, n, x)
    if deformable:  # non-zero offsets, so the offset gradients are exercised
        standard.offset_conv_weights.assign(rng.normal(size=standard.offset_conv_weights.shape) * 0.05)
    fused.set_weights(standard.get_weights())
    results = []
    for layer in (standard, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(q, s, n, x)))
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        results.append([loss] + [tf.convert_to_tensor(g) for g in grads])
    assert fused.get_config()["implementation"] == "fused"
    assert len(results[1]) == (5 if deformable else 3)  # loss, x, kernel (+ offset weights, bias)
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


def test_offset_bound_squashes_offsets_and_round_trips():
    rng = np.random.default_rng(5)
    q, s, n, f, _, _ = random_problem(rng, d_in=4)
    free = KPConv(6, 15, extent=0.3, deformable=True, kernel_seed=1)
    bounded = KPConv(6, 15, extent=0.3, deformable=True, kernel_seed=1, offset_bound=1.0)
    for layer in (free, bounded):
        layer(q, s, n, f)
    bounded.set_weights(free.get_weights())
    for scale in (1e-4, 30.0):
        weights = rng.normal(size=free.offset_conv_weights.shape) * scale
        free.offset_conv_weights.assign(weights)
        bounded.offset_conv_weights.assign(weights)
        _, free_offsets, _ = free.offsets(q, s, n, f)
        _, bounded_offsets, _ = bounded.offsets(q, s, n, f)
        assert np.abs(bounded_offsets.numpy()).max() <= 0.3 * 1.0 + 1e-7  # one extent per coordinate
        if scale < 1:  # tanh has slope 1 at 0: small offsets are unchanged
            np.testing.assert_allclose(bounded_offsets, free_offsets, rtol=1e-5, atol=1e-12)
        else:
            assert np.abs(free_offsets.numpy()).max() > 10 * 0.3
    clone = KPConv.from_config(bounded.get_config())
    assert clone.offset_bound == 1.0
    with pytest.raises(ValueError, match="offset_bound"):
        KPConv(6, deformable=True, offset_bound=-1.0)
