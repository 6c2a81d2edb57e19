"""Functional KPConv against the original's outputs and an independent float64 reference."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from kpconv_reference import kpconv_reference, random_problem

from kpconv_tf import ops

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "original_tf", "public")
MODES = [(i, a) for i in ops.INFLUENCES for a in ops.AGGREGATIONS]
IMPLEMENTATIONS = ["standard", "fused"]


def rel_err(a, b):
    """max |a - b| / max |b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(FIXTURES, "kpconv_rigid_*.npz"))), ids=os.path.basename
)
def test_rigid_matches_original(path, implementation):
    d = np.load(path)
    x, kp, kv = (tf.constant(d[k]) for k in ("features", "K_points", "K_values"))
    with tf.GradientTape() as tape:
        tape.watch([x, kp, kv])
        out = ops.kpconv(
            d["query_points"],
            d["support_points"],
            d["neighbors"],
            x,
            kp,
            kv,
            float(d["KP_extent"]),
            str(d["influence"]),
            str(d["aggregation"]),
            implementation=implementation,
        )
        loss = tf.reduce_sum(out * d["R"])
    gx, gkp, gkv = tape.gradient(loss, [x, kp, kv])
    assert rel_err(out, d["output"]) < 1e-5
    assert rel_err(tf.convert_to_tensor(gx), d["grad_features"]) < 1e-5
    assert rel_err(gkv, d["grad_K_values"]) < 1e-5
    if "grad_K_points" in d:
        assert rel_err(gkp, d["grad_K_points"]) < 1e-5
    else:  # constant influence: the weights do not depend on the kernel points
        assert gkp is None or np.all(tf.convert_to_tensor(gkp).numpy() == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("influence,aggregation", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rigid_matches_float64_reference(influence, aggregation, seed, implementation):
    rng = np.random.default_rng(seed)
    q, s, n, f, kp, w = random_problem(rng)
    out = ops.kpconv(q, s, n, f, kp, w, 0.3, influence, aggregation, implementation).numpy()
    ref = kpconv_reference(q, s, n, f, kp, w, 0.3, influence, aggregation)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # Queries without neighbours (the last rows) output exactly zero.
    assert np.all(out[-3:] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("influence,aggregation", MODES)
@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_matches_float64_reference(influence, aggregation, modulated, implementation):
    rng = np.random.default_rng(7)
    q, s, n, f, kp, w = random_problem(rng)
    offsets = (rng.normal(size=(q.shape[0], kp.shape[0], 3)) * 0.1).astype(np.float32)
    mods = rng.uniform(0, 2, (q.shape[0], kp.shape[0])).astype(np.float32) if modulated else None
    out = ops.kpconv_deformable(
        q, s, n, f, kp, offsets, w, 0.3, influence, aggregation, mods, implementation
    ).numpy()
    ref = kpconv_reference(q, s, n, f, kp, w, 0.3, influence, aggregation, offsets, mods)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sum_is_invariant_to_neighbor_order(implementation):
    rng = np.random.default_rng(3)
    q, s, n, f, kp, w = random_problem(rng)
    perm = np.stack([rng.permutation(n.shape[1]) for _ in range(n.shape[0])])
    shuffled = np.take_along_axis(n, perm, 1)
    offsets = np.zeros((q.shape[0], 15, 3), np.float32)
    for fn in (
        lambda nn: ops.kpconv(q, s, nn, f, kp, w, 0.3, implementation=implementation),
        lambda nn: ops.kpconv_deformable(q, s, nn, f, kp, offsets, w, 0.3, implementation=implementation),
    ):
        np.testing.assert_allclose(fn(n).numpy(), fn(shuffled).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("influence", ["linear", "gaussian"])
def test_gradients_match_finite_differences(influence):
    rng = np.random.default_rng(11)
    q, s, n, f, kp, w = random_problem(rng, nq=8, ns=20, h=6, d_in=2, d_out=3, k=5, empty_rows=1)
    q, s, f, kp, w = (a.astype(np.float64) for a in (q, s, f, kp, w))
    offsets = rng.normal(size=(8, 5, 3)) * 0.05

    def rigid(f_, w_, kp_):
        return ops.kpconv(q, s, n, f_, kp_, w_, 0.3, influence)

    def deform(f_, w_, off_):
        return ops.kpconv_deformable(q, s, n, f_, kp, off_, w_, 0.3, influence)

    for fn, args in ((rigid, [f, w, kp]), (deform, [f, w, offsets])):
        theoretical, numerical = tf.test.compute_gradient(fn, args, delta=1e-6)
        for t, nmr in zip(theoretical, numerical):
            np.testing.assert_allclose(t, nmr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_geometry_gradients_off_keeps_feature_and_weight_gradients(implementation):
    rng = np.random.default_rng(12)
    q, s, n, f, kp, w = (tf.constant(a) for a in random_problem(rng))
    results = []
    for geometry in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([q, s, f, kp, w])
            out = ops.kpconv(
                q, s, n, f, kp, w, 0.3, implementation=implementation, geometry_gradients=geometry
            )
            loss = tf.reduce_sum(tf.square(out))
        results.append(tape.gradient(loss, [q, s, kp, f, w]))
    with_geometry, without = results
    assert all(g is not None for g in with_geometry)
    assert without[:3] == [None, None, None]
    for a, b in zip(with_geometry[3:], without[3:]):
        np.testing.assert_allclose(tf.convert_to_tensor(b), tf.convert_to_tensor(a), rtol=1e-5, atol=1e-6)


def test_dynamic_shapes_and_xla():
    rng = np.random.default_rng(5)
    spec = [
        tf.TensorSpec([None, 3], tf.float32),
        tf.TensorSpec([None, 3], tf.float32),
        tf.TensorSpec([None, None], tf.int32),
        tf.TensorSpec([None, 4], tf.float32),
        tf.TensorSpec([15, 3], tf.float32),
        tf.TensorSpec([15, 4, 5], tf.float32),
    ]

    @tf.function(input_signature=spec)
    def dynamic(q, s, n, f, kp, w):
        return ops.kpconv(q, s, n, f, kp, w, 0.3)

    @tf.function(jit_compile=True)
    def compiled(q, s, n, f, kp, w, offsets):
        return ops.kpconv_deformable(q, s, n, f, kp, offsets, w, 0.3)

    for nq, ns, h in ((30, 50, 7), (11, 64, 13)):
        q, s, n, f, kp, w = random_problem(rng, nq=nq, ns=ns, h=h)
        np.testing.assert_allclose(
            dynamic(q, s, n, f, kp, w).numpy(),
            kpconv_reference(q, s, n, f, kp, w, 0.3, "linear", "sum"),
            rtol=1e-4,
            atol=1e-4,
        )
        offsets = np.zeros((nq, 15, 3), np.float32)
        np.testing.assert_allclose(
            compiled(q, s, n, f, kp, w, offsets).numpy(),
            ops.kpconv_deformable(q, s, n, f, kp, offsets, w, 0.3).numpy(),
            rtol=1e-5,
            atol=1e-5,
        )


def test_in_range_compaction_matches_original():
    d = np.load(os.path.join(FIXTURES, "kpconv_deform_linear_sum_mod0.npz"))
    new_max, cols = ops.in_range_compaction(
        d["query_points"], d["support_points"], d["neighbors"], d["deformed_K_points"], float(d["KP_extent"])
    )
    assert int(new_max) == int(d["new_max_neighb"])
    np.testing.assert_array_equal(cols.numpy(), d["topk_indices"])


def test_bad_modes_raise():
    with pytest.raises(ValueError, match="influence"):
        ops.kpconv(
            np.zeros((1, 3)),
            np.zeros((1, 3)),
            [[0]],
            np.zeros((1, 1)),
            np.zeros((1, 3)),
            np.zeros((1, 1, 1)),
            1.0,
            influence="cubic",
        )
    with pytest.raises(ValueError, match="aggregation"):
        ops.kpconv(
            np.zeros((1, 3)),
            np.zeros((1, 3)),
            [[0]],
            np.zeros((1, 1)),
            np.zeros((1, 3)),
            np.zeros((1, 1, 1)),
            1.0,
            aggregation="max",
        )
    with pytest.raises(ValueError, match="implementation"):
        ops.kpconv(
            np.zeros((1, 3)),
            np.zeros((1, 3)),
            [[0]],
            np.zeros((1, 1)),
            np.zeros((1, 3)),
            np.zeros((1, 1, 1)),
            1.0,
            implementation="cuda",
        )
    with pytest.raises(TypeError, match="float32"):
        ops.kpconv(
            np.zeros((1, 3)),
            np.zeros((1, 3)),
            [[0]],
            np.zeros((1, 1)),
            np.zeros((1, 3)),
            np.zeros((1, 1, 1)),
            1.0,
            implementation="fused",
        )  # float64 features


def test_implementation_resolution(monkeypatch):
    assert ops.resolve_implementation("standard") == "standard"
    assert ops.resolve_implementation("fused") == "fused"
    assert ops.resolve_implementation("auto", tf.float64) == "standard"
    expected = "standard" if tf.config.list_logical_devices("GPU") else "fused"
    assert ops.resolve_implementation("auto", tf.float32) == expected
    # With a GPU visible, "auto" keeps the network on standard ops (the fused op is CPU-only).
    monkeypatch.setattr(
        tf.config, "list_logical_devices", lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else []
    )
    assert ops.resolve_implementation("auto", tf.float32) == "standard"


def test_auto_falls_back_when_the_compiled_ops_are_missing(monkeypatch):
    import sys

    monkeypatch.setattr(ops, "_FUSED_UNAVAILABLE", [])
    monkeypatch.setitem(sys.modules, "tf_custom_ops", None)  # makes `import tf_custom_ops` fail
    with pytest.warns(UserWarning, match="fused KPConv op is unavailable"):
        assert ops.resolve_implementation("auto", tf.float32) == "standard"
    with pytest.raises(RuntimeError, match="compiled ops"):
        ops.resolve_implementation("fused", tf.float32)
    rng = np.random.default_rng(12)
    q, s, n, f, kp, w = random_problem(rng)
    np.testing.assert_allclose(
        ops.kpconv(q, s, n, f, kp, w, 0.3, implementation="auto").numpy(),
        kpconv_reference(q, s, n, f, kp, w, 0.3, "linear", "sum"),
        rtol=1e-4,
        atol=1e-4,
    )
