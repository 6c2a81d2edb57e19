"""Builds the stacked-batch input dict (ARCHITECTURE.md) from raw stacked points, in TF.

``build_pyramid(points, lengths, features, model_config, neighbor_limits=None)`` computes, for each
layer l, the convolution neighbours, the subsampled points of layer l+1 and the pooling and
upsampling neighbours between them (upsampling only for networks with a decoder), with the radii
of ``kpconv_tf.architecture.layer_specs`` (the original pipeline's rules). ``neighbor_limits[l]``
> 0 crops the neighbour matrices of layer l to their nearest entries, as the original's calibrated
limits do. Runs eagerly, in ``tf.function`` and in ``tf.data`` maps.

``implementation`` (one of ``PYRAMID_IMPLEMENTATIONS``): ``"compiled"`` uses the CPU ops of
``tf_custom_ops`` (imported on first use only), ``"standard"`` the same computations in standard TF
ops (``kpconv_tf.standard_ops``: any device, and graphs that load without the custom op library).
"""

from __future__ import annotations

import tensorflow as tf

from kpconv_tf.architecture import layer_specs, needs_upsamples
from kpconv_tf.config import PYRAMID_IMPLEMENTATIONS, ModelConfig
from kpconv_tf.inputs import BATCH_INDEX, FEATURES, layer_keys


def pyramid_ops(implementation: str):
    """The module with ``batch_grid_subsampling`` / ``batch_neighbors`` of ``implementation``
    (``PYRAMID_IMPLEMENTATIONS``): ``tf_custom_ops`` or ``kpconv_tf.standard_ops``."""
    if implementation not in PYRAMID_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {list(PYRAMID_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    if implementation == "compiled":
        # Imported here so that the standard pyramid never loads the custom op library.
        import tf_custom_ops

        return tf_custom_ops
    from kpconv_tf import standard_ops

    return standard_ops


def build_pyramid(
    points, lengths, features, model_config: ModelConfig, neighbor_limits=None, implementation="compiled"
):
    """Returns the input dict for stacked float32 points [N, 3], int32 lengths [B], features [N, D]."""
    ops = pyramid_ops(implementation)
    specs = layer_specs(model_config)
    with_upsamples = needs_upsamples(model_config)
    if neighbor_limits is not None and len(neighbor_limits) < len(specs):
        raise ValueError(f"neighbor_limits needs {len(specs)} entries, got {len(neighbor_limits)}")
    points = tf.convert_to_tensor(points, tf.float32)
    lengths = tf.convert_to_tensor(lengths, tf.int32)
    inputs = {
        FEATURES: tf.convert_to_tensor(features, tf.float32),
        BATCH_INDEX: tf.repeat(tf.range(tf.shape(lengths)[0]), lengths),
    }
    for spec in specs:
        l = spec.index
        keys = layer_keys(l)
        limit = 0 if neighbor_limits is None else int(neighbor_limits[l])
        inputs[keys.points] = points
        inputs[keys.lengths] = lengths
        inputs[keys.neighbors] = ops.batch_neighbors(
            points, points, lengths, lengths, spec.conv_radius, limit
        )
        if spec.next_dl is None:
            break
        sub_points, sub_lengths = ops.batch_grid_subsampling(points, lengths, spec.next_dl)
        inputs[keys.pools] = ops.batch_neighbors(
            sub_points, points, sub_lengths, lengths, spec.pool_radius, limit
        )
        if with_upsamples:
            inputs[keys.upsamples] = ops.batch_neighbors(
                points, sub_points, lengths, sub_lengths, spec.upsample_radius, limit
            )
        points, lengths = sub_points, sub_lengths
    return inputs
