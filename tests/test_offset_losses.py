"""Offset regularisation terms against the original's values and a float64 reference."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from test_kpconv_layers import _deformable_layer_from_fixture
from test_kpconv_ops import FIXTURES, rel_err

from kpconv_tf import losses
from kpconv_tf.layers import KPConv

DEFORM = sorted(glob.glob(os.path.join(FIXTURES, "kpconv_deform_*.npz")))


def _loss(d, network, layer, rows=None):
    q, n = d["query_points"], d["neighbors"]
    if rows is not None:
        q, n = q[rows], n[rows]
    _, deformed = layer(q, d["support_points"], n, d["features"], return_deformed=True)
    term = losses.deformable_offsets_loss(
        losses.offset_loss_variant("fitting", network),
        deformed,
        q,
        d["support_points"],
        n,
        *_normalizers(d),
    )
    return float(d["offsets_decay"]) * term


def _normalizers(d):
    """(conv radius, extent) of the fixture's layer, as the original derives them."""
    scale = float(d["first_subsampling_dl"]) * 2 ** int(d["layer"])
    return scale * float(d["density_parameter"]), scale * float(d["config_KP_extent"])


@pytest.mark.parametrize("path", DEFORM, ids=os.path.basename)
def test_losses_and_gradients_match_original(path):
    d = np.load(path)
    layer = _deformable_layer_from_fixture(d)
    nonempty = d["nonempty_query_mask"].astype(bool)
    for network in ("kpcnn", "kpfcnn"):
        assert rel_err(_loss(d, network, layer), d[f"loss_{network}_offsets"]) < 1e-5
        with tf.GradientTape() as tape:
            value = _loss(d, network, layer, nonempty)
        assert rel_err(value, d[f"nonempty_loss_{network}_offsets"]) < 1e-5
        grad = tape.gradient(value, layer.offset_conv_weights)
        assert rel_err(grad, d[f"nonempty_grad_{network}_offsets_loss_offset_weights"]) < 1e-5
    # The KP-FCNN total is fitting + repulsive.
    for key in ("fitting", "repulsive"):
        assert f"nonempty_loss_kpfcnn_{key}" in d
    total = d["nonempty_loss_kpfcnn_fitting"] + d["nonempty_loss_kpfcnn_repulsive"]
    assert rel_err(total, d["nonempty_loss_kpfcnn_offsets"]) < 1e-5


@pytest.mark.parametrize("path", DEFORM[:1], ids=os.path.basename)
def test_kpconv_adds_its_term_through_add_loss(path):
    d = np.load(path)
    rigid = _deformable_layer_from_fixture(d)
    radius, extent = _normalizers(d)
    for network in ("kpcnn", "kpfcnn"):
        layer = KPConv.from_config(
            {
                **rigid.get_config(),
                "radius": radius,
                "extent": extent,
                "offset_loss": losses.offset_loss_variant("fitting", network),
                "offset_loss_weight": float(d["offsets_decay"]),
            }
        )
        args = (d["query_points"], d["support_points"], d["neighbors"], d["features"])
        layer(*args)
        layer.set_weights(rigid.get_weights())
        layer(*args)
        assert len(layer.losses) == 1  # the last call's term only
        assert rel_err(layer.losses[0], d[f"loss_{network}_offsets"]) < 1e-5
        norm, lost = layer.deformation_statistics
        assert 0 <= float(lost) <= 1 and float(norm) > 0
    with pytest.raises(ValueError, match="offset_loss"):
        KPConv(8, offset_loss="fitting_repulsive")  # rigid
    with pytest.raises(ValueError, match="radius"):
        KPConv(8, deformable=True, offset_loss="permissive")


def _repulsive_reference(deformed, norm, threshold):
    """float64 sum_k mean_q sum_{l != k} max(0, threshold - |p_k - p_l|)^2, p = deformed / norm."""
    p = deformed / norm
    k = p.shape[1]
    rep = np.maximum(0, threshold - np.linalg.norm(p[:, :, None] - p[:, None], axis=-1)) ** 2
    rep[:, np.arange(k), np.arange(k)] = 0
    return np.sum(np.mean(np.sum(rep, axis=2), axis=0))


def _fitting_reference(deformed, q, s, n, norm):
    """float64 mean over queries and kernel points of min_h |y_h - k'|^2 / norm^2 (shadows at 1000)."""
    pad = np.concatenate([s, np.full((1, 3), 1000.0)])
    y = pad[n] - q[:, None]
    return np.mean(np.sum((y[:, :, None] - deformed[:, None]) ** 2, -1).min(axis=1)) / norm**2


def test_repulsive_and_fitting_against_float64():
    rng = np.random.default_rng(0)
    deformed = rng.normal(size=(7, 5, 3)) * 0.4
    q = rng.normal(size=(7, 3)) * 0.1
    s = rng.normal(size=(12, 3)) * 0.5
    n = np.concatenate([rng.integers(0, 12, (7, 4)), np.full((7, 2), 12)], axis=1).astype(np.int32)
    norm = 0.3
    expected_rep = _repulsive_reference(deformed, norm, 1.5)
    assert float(losses.offset_repulsive_loss(deformed, norm)) == pytest.approx(expected_rep, rel=1e-9)
    expected_fit = _fitting_reference(deformed, q, s, n, norm)
    assert float(losses.offset_fitting_loss(deformed, q, s, n, norm)) == pytest.approx(expected_fit, rel=1e-9)
    radius = 0.5
    expected_perm = np.mean(np.maximum(0, np.linalg.norm(deformed / radius, axis=-1) - 1))
    assert float(losses.offset_permissive_loss(deformed, radius)) == pytest.approx(expected_perm, rel=1e-9)


def test_repulsive_gradient_treats_other_points_as_constants():
    deformed = tf.Variable([[[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]]], dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = losses.offset_repulsive_loss(deformed, 1.0)
    g = tape.gradient(value, deformed).numpy()
    # Only the term of each point itself is differentiated: d/dp0 (1.5 - |p0 - p1|)^2 with p1 fixed
    # = -2 * 1.4 * (p0 - p1) / 0.1 = (2.8, 0, 0), so descent pushes the points apart (not 5.6).
    np.testing.assert_allclose(g[0, 0], [2.8, 0, 0], rtol=1e-9)
    np.testing.assert_allclose(g[0, 1], [-2.8, 0, 0], rtol=1e-9)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        losses.offset_loss_variant("elastic", "kpcnn")
    with pytest.raises(ValueError, match="network"):
        losses.offset_loss_variant("fitting", "pointnet")
    with pytest.raises(ValueError, match="variant"):
        losses.deformable_offsets_loss("elastic", None, None, None, None, 1, 1)


def test_point2point_against_float64():
    rng = np.random.default_rng(3)
    deformed = rng.normal(size=(6, 4, 3)) * 0.3
    q = rng.normal(size=(6, 3)) * 0.1
    s = rng.normal(size=(10, 3)) * 0.5
    n = np.concatenate([rng.integers(0, 10, (6, 5)), np.full((6, 1), 10)], axis=1).astype(np.int32)
    dl, kp_extent, layer = 0.05, 1.2, 2
    extent = dl * kp_extent * 2**layer
    expected = (
        2 * _fitting_reference(deformed, q, s, n, extent) + _repulsive_reference(deformed, extent, 1.2) / 4
    )
    for network in ("kpcnn", "kpfcnn"):  # the same definition for both networks
        variant = losses.offset_loss_variant("point2point", network)
        value = losses.deformable_offsets_loss(variant, deformed, q, s, n, dl * 5.0 * 2**layer, extent, 1.2)
        assert float(value) == pytest.approx(expected, rel=1e-9)


def test_deformation_statistics_lost_share_and_offset_norm():
    rng = np.random.default_rng(4)
    extent = 0.1
    support = rng.uniform(
        -0.3, 0.3, (4000, 3)
    )  # dense: every rigid kernel point has a point within the extent
    query = np.zeros((5, 3))
    neighbors = np.tile(np.arange(4000, dtype=np.int32), (5, 1))
    kernel = rng.normal(size=(15, 3))
    kernel = 1.5 * extent * kernel / np.linalg.norm(kernel, axis=1, keepdims=True)
    rigid = np.tile(kernel[None], (5, 1, 1))
    d2 = losses.nearest_squared_distances(rigid, query, support, neighbors)
    norm, lost = losses.deformation_statistics(rigid, kernel, d2, extent)
    assert float(norm) == 0.0 and float(lost) == 0.0
    pushed = rigid + np.array([10.0, 0.0, 0.0]) * extent  # 10 extents: far outside the cloud
    d2 = losses.nearest_squared_distances(pushed, query, support, neighbors)
    norm, lost = losses.deformation_statistics(pushed, kernel, d2, extent)
    assert float(norm) == pytest.approx(10.0, rel=1e-6) and float(lost) == 1.0
    half = np.concatenate([rigid[:, :7], pushed[:, 7:]], axis=1)
    d2 = losses.nearest_squared_distances(half, query, support, neighbors)
    assert float(losses.deformation_statistics(half, kernel, d2, extent)[1]) == pytest.approx(8 / 15)
