"""Offset regularisation of deformable KPConv (paper eq. 6-8, as the original computes it).

The normaliser differs between the original networks (fixture README section 7):

* KP-CNN: fitting term only, normalised by the layer's conv radius
  ``first_subsampling_dl * density_parameter * 2**layer``.
* KP-FCNN: fitting + repulsive terms, normalised by the layer's extent
  ``first_subsampling_dl * KP_extent * 2**layer``.
* 'permissive' (both): mean distance of the deformed kernel points outside the conv radius.

The model-level loss is ``offsets_decay * sum`` of these terms over the deformable layers.
"""

from __future__ import annotations

import tensorflow as tf

from kpconv_tf.ops import _DEFORM_SHADOW, _as_tensors, centred_neighbors, squared_distances


def offset_fitting_loss(deformed_kernel_points, query_points, support_points, neighbors, normalizer):
    """Mean over queries and kernel points of (min_h |y_h - k'|^2) / normalizer^2.

    The minimum runs over every column of ``neighbors`` (shadows included, at the deformable
    op's shadow position), as the original does. Shapes: deformed [Nq, K, 3], queries [Nq, 3],
    supports [Ns, 3], neighbors int32 [Nq, H]. Returns a scalar.
    """
    deformed_kernel_points, query_points, support_points = _as_tensors(
        deformed_kernel_points, query_points, support_points)
    neighbors = tf.convert_to_tensor(neighbors, tf.int32)
    centred = centred_neighbors(query_points, support_points, neighbors, _DEFORM_SHADOW)
    d2 = squared_distances(centred, deformed_kernel_points)  # [Nq, H, K]
    return tf.reduce_mean(tf.reduce_min(d2, axis=1)) / (normalizer ** 2)


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


def deformable_layer_offsets_loss(kind, network, deformed_kernel_points, query_points,
                                  support_points, neighbors, layer, first_subsampling_dl,
                                  density_parameter, kp_extent):
    """One deformable layer's term for ``network`` 'kpcnn' or 'kpfcnn' and ``kind``
    'fitting' or 'permissive' (before ``offsets_decay``)."""
    conv_radius = first_subsampling_dl * density_parameter * 2 ** layer
    if kind == "permissive":
        return offset_permissive_loss(deformed_kernel_points, conv_radius)
    if kind != "fitting":
        raise ValueError(f"kind must be 'fitting' or 'permissive', got {kind!r}")
    if network == "kpcnn":
        return offset_fitting_loss(deformed_kernel_points, query_points, support_points, neighbors,
                                   conv_radius)
    if network != "kpfcnn":
        raise ValueError(f"network must be 'kpcnn' or 'kpfcnn', got {network!r}")
    extent = first_subsampling_dl * kp_extent * 2 ** layer
    return (offset_fitting_loss(deformed_kernel_points, query_points, support_points, neighbors, extent)
            + offset_repulsive_loss(deformed_kernel_points, extent))
