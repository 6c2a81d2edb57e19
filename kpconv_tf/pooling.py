"""Pooling between pyramid layers, as the original: max over pooling neighbours (strided blocks'
shortcuts and ``max_pool`` blocks) and nearest upsampling (decoder).

Features are float32 ``[N_l, C]``; ``pools_l`` and ``upsamples_l`` are the stacked-batch index rows
of ``kpconv_tf.inputs`` whose shadow index is the number of rows of ``features``.
"""

from __future__ import annotations

import tensorflow as tf

from kpconv_tf.ops import _fused_ops, resolve_implementation


def max_pool(features, pools, implementation="auto"):
    """Max over pooling neighbours: [N_l, C], int32 [N_{l+1}, H] -> [N_{l+1}, C].

    The shadow row is the per-channel minimum (as the original). ``implementation`` as in
    ``kpconv_tf.ops``: "fused" runs ``tf_custom_ops.max_pool`` (no [N_{l+1}, H, C] gather, same
    values and gradients), "standard" gathers with standard TF ops.
    """
    shadow = tf.reduce_min(features, axis=0)
    if resolve_implementation(implementation, features.dtype) == "fused":
        return _fused_ops().max_pool(features, shadow, pools)
    padded = tf.concat([features, shadow[None]], axis=0)
    return tf.reduce_max(tf.gather(padded, pools), axis=1)


def closest_pool(features, upsamples):
    """Features of each row's first neighbour; a shadow gives a zero row."""
    padded = tf.concat([features, tf.zeros_like(features[:1])], axis=0)
    return tf.gather(padded, upsamples[:, 0])
