"""Batch normalisation of [N, C] point features (epsilon, momentum and variables as Keras's).

In training, with ``implementation`` resolving to "fused" (``kpconv_tf.ops``: float32 on a machine
without a visible GPU and the compiled ops built), the statistics, the normalisation and their
gradient are one ``tf_custom_ops.batch_norm`` op each way instead of Keras's chain of reductions
and element-wise ops over [N, C]: the same formulas (batch mean, biased batch variance, Keras's
moving averages) with float64 statistics. Synchronized statistics, masks and inference take
Keras's path.
"""

from __future__ import annotations

import keras

from kpconv_tf.ops import IMPLEMENTATIONS, _fused_ops, resolve_implementation


@keras.saving.register_keras_serializable(package="kpconv_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` over the last axis with a fused CPU training path."""

    def __init__(self, implementation="auto", **kwargs):
        super().__init__(**kwargs)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation

    def _fused_training(self, inputs, training, mask):
        return (
            training
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and self.center
            and self.scale
            and inputs.shape.rank == 2
            and self.axis in (1, -1)
            and resolve_implementation(self.implementation, inputs.dtype) == "fused"
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused_training(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance = _fused_ops().batch_norm(inputs, self.gamma, self.beta, self.epsilon)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}
