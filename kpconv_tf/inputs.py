"""The one definition of the stacked-batch input dict a KPConv network reads.

N_l points in layer l (all clouds of the batch stacked), B clouds, K_l neighbour slots (padded
with the index N_l, the shadow point), F = in_features_dim.
"""

from typing import NamedTuple

import tensorflow as tf

from kpconv_tf.architecture import layer_specs, needs_upsamples
from kpconv_tf.config import Config

FEATURES = "features"  # [N_0, F] float32
BATCH_INDEX = "batch_index"  # [N_0] int32, the cloud of each point


class LayerKeys(NamedTuple):
    """Key names of layer l's tensors."""

    points: str  # [N_l, 3] float32
    lengths: str  # [B] int32, points per cloud
    neighbors: str  # [N_l, K_l] int32, into points_l
    pools: str  # [N_{l+1}, K] int32, into points_l (not for the last layer)
    upsamples: str  # [N_l, K] int32, into points_{l+1} (decoders only, not for the last layer)


def layer_keys(l: int) -> LayerKeys:
    return LayerKeys(f"points_{l}", f"lengths_{l}", f"neighbors_{l}", f"pools_{l}", f"upsamples_{l}")


def input_spec(config: Config) -> dict[str, tf.TensorSpec]:
    """Ordered specs of every input key the architecture of ``config`` reads: pools between
    layers, upsamples only when a decoder reads them (as the original's pipelines do)."""
    num_layers = len(layer_specs(config.model))
    upsamples = needs_upsamples(config.model)
    spec = {
        FEATURES: tf.TensorSpec([None, config.dataset.in_features_dim], tf.float32),
        BATCH_INDEX: tf.TensorSpec([None], tf.int32),
    }
    for l in range(num_layers):
        keys = layer_keys(l)
        spec[keys.points] = tf.TensorSpec([None, 3], tf.float32)
        spec[keys.lengths] = tf.TensorSpec([None], tf.int32)
        spec[keys.neighbors] = tf.TensorSpec([None, None], tf.int32)
        if l < num_layers - 1:
            spec[keys.pools] = tf.TensorSpec([None, None], tf.int32)
            if upsamples:
                spec[keys.upsamples] = tf.TensorSpec([None, None], tf.int32)
    return spec
