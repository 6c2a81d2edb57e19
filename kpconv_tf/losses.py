"""Offset regularisation of deformable KPConv (paper eq. 6-8, as the original computes it).

The normaliser differs between the original networks (fixture README section 7):

* KP-CNN ('fitting'): fitting term only, normalised by the layer's conv radius
  ``first_subsampling_dl * density_parameter * 2**layer``.
* KP-FCNN ('fitting', variant 'fitting_repulsive'): fitting + repulsive terms, normalised by the
  layer's extent ``first_subsampling_dl * KP_extent * 2**layer``.
* 'permissive' (both): mean distance of the deformed kernel points outside the conv radius.
* 'point2point' (both networks; the later definition of KPConv-PyTorch, our stable default): twice
  the fitting term plus the repulsive term with threshold ``repulse_extent`` averaged over the K
  kernel points, both normalised by the layer's extent.

Each deformable ``KPConv`` of a network adds ``offsets_decay * term`` with ``add_loss``, so the
model-level loss is ``sum(model.losses)``.
``deformation_statistics`` gives what a user watches while training: the mean offset norm in extent
units and the share of "lost" kernel points (no input point within the extent).
"""

from __future__ import annotations

import tensorflow as tf

from kpconv_tf.config import OFFSETS_LOSSES
from kpconv_tf.ops import _DEFORM_SHADOW, _as_tensors, centred_neighbors, squared_distances

# The per-layer terms a deformable KPConv can add (its ``offset_loss``): the config's kinds, with the
# original's KP-FCNN 'fitting' (normalised by the extent, plus the repulsive term) told apart.
OFFSET_LOSS_VARIANTS = ("permissive", "fitting", "fitting_repulsive", "point2point")


def nearest_squared_distances(deformed_kernel_points, query_points, support_points, neighbors):
    """min_h |y_h - k'|^2 per query and deformed kernel point: [Nq, K].

    The minimum runs over every column of ``neighbors`` (shadows included, at the deformable
    op's shadow position), as the original does. Shapes: deformed [Nq, K, 3], queries [Nq, 3],
    supports [Ns, 3], neighbors int32 [Nq, H].
    """
    deformed_kernel_points, query_points, support_points = _as_tensors(
        deformed_kernel_points, query_points, support_points
    )
    neighbors = tf.convert_to_tensor(neighbors, tf.int32)
    centred = centred_neighbors(query_points, support_points, neighbors, _DEFORM_SHADOW)
    return tf.reduce_min(squared_distances(centred, deformed_kernel_points), axis=1)


def offset_fitting_loss(
    deformed_kernel_points, query_points, support_points, neighbors, normalizer, nearest_d2=None
):
    """Mean over queries and kernel points of (min_h |y_h - k'|^2) / normalizer^2 (a scalar).

    Shapes as in ``nearest_squared_distances``; pass its result as ``nearest_d2`` to reuse it.
    """
    if nearest_d2 is None:
        nearest_d2 = nearest_squared_distances(
            deformed_kernel_points, query_points, support_points, neighbors
        )
    return tf.reduce_mean(nearest_d2) / (normalizer**2)


def deformation_statistics(deformed_kernel_points, kernel_points, nearest_d2, extent):
    """(mean |offset| / extent, share of lost kernel points), float32 scalars.

    ``deformed_kernel_points`` [Nq, K, 3], the rigid ``kernel_points`` [K, 3], ``nearest_d2`` [Nq, K]
    from ``nearest_squared_distances``. A deformed kernel point is lost when no input point lies
    within ``extent`` of it: it then sees nothing and gets no gradient from the task loss.
    """
    offsets = tf.convert_to_tensor(deformed_kernel_points) - tf.cast(
        kernel_points, deformed_kernel_points.dtype
    )
    offset_norm = tf.reduce_mean(tf.norm(offsets, axis=-1)) / extent
    lost = tf.reduce_mean(tf.cast(nearest_d2 >= extent**2, tf.float32))
    return tf.cast(offset_norm, tf.float32), lost


def offset_repulsive_loss(deformed_kernel_points, normalizer, threshold=1.5):
    """sum_k mean_q sum_{l != k} max(0, threshold - |p_k - p_l|)^2 with p = deformed / normalizer.

    For each k the other points are constants (stop_gradient), as in the original KP-FCNN.
    """
    p = tf.convert_to_tensor(deformed_kernel_points) / normalizer  # [Nq, K, 3]
    others = tf.stop_gradient(p)
    diff = others[:, None, :, :] - p[:, :, None, :]  # [Nq, K(this), K(other), 3]
    dist = tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(diff), axis=-1), 1e-30))
    k = tf.shape(p)[1]
    not_self = 1.0 - tf.eye(k, dtype=p.dtype)
    per_point = tf.reduce_sum(tf.square(tf.maximum(0.0, threshold - dist)) * not_self, axis=2)
    return tf.reduce_sum(tf.reduce_mean(per_point, axis=0))


def offset_permissive_loss(deformed_kernel_points, conv_radius):
    """mean over queries and kernel points of max(0, |k'| / conv_radius - 1)."""
    norms = tf.norm(tf.convert_to_tensor(deformed_kernel_points) / conv_radius, axis=-1)
    return tf.reduce_mean(tf.maximum(0.0, norms - 1.0))


def offset_loss_variant(kind, network):
    """The per-layer term (``OFFSET_LOSS_VARIANTS``) of config ``train.offsets_loss`` ``kind`` in
    ``network`` 'kpcnn' or 'kpfcnn': the original's 'fitting' normalises differently in each."""
    if kind not in OFFSETS_LOSSES:
        raise ValueError(f"kind must be one of {OFFSETS_LOSSES}, got {kind!r}")
    if network not in ("kpcnn", "kpfcnn"):
        raise ValueError(f"network must be 'kpcnn' or 'kpfcnn', got {network!r}")
    return "fitting_repulsive" if (kind, network) == ("fitting", "kpfcnn") else kind


def deformable_offsets_loss(
    variant,
    deformed_kernel_points,
    query_points,
    support_points,
    neighbors,
    conv_radius,
    extent,
    repulse_extent=1.2,
    nearest_d2=None,
):
    """One deformable layer's term (before ``offsets_decay``), a float32 scalar.

    ``variant`` one of ``OFFSET_LOSS_VARIANTS``; ``conv_radius`` and ``extent`` are the layer's
    ``first_subsampling_dl * density_parameter * 2**l`` and ``first_subsampling_dl * kp_extent *
    2**l`` (the KPConv's radius and extent); ``nearest_d2`` as in ``offset_fitting_loss``.
    """
    if variant not in OFFSET_LOSS_VARIANTS:
        raise ValueError(f"variant must be one of {OFFSET_LOSS_VARIANTS}, got {variant!r}")
    if variant == "permissive":
        return offset_permissive_loss(deformed_kernel_points, conv_radius)
    fitting_args = (deformed_kernel_points, query_points, support_points, neighbors)
    if variant == "point2point":
        repulsive = offset_repulsive_loss(deformed_kernel_points, extent, repulse_extent)
        k = tf.cast(tf.shape(deformed_kernel_points)[1], repulsive.dtype)
        return 2.0 * offset_fitting_loss(*fitting_args, extent, nearest_d2) + repulsive / k
    if variant == "fitting":
        return offset_fitting_loss(*fitting_args, conv_radius, nearest_d2)
    return offset_fitting_loss(*fitting_args, extent, nearest_d2) + offset_repulsive_loss(
        deformed_kernel_points, extent
    )
