"""The original release's weight initialisation."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="kpconv_tf")
class OriginalTruncatedNormal(keras.initializers.Initializer):
    """Truncated normal (2 std) with std sqrt(2 / fan_out), rounded to multiples of 1e-3.

    fan_out is the last dimension of the variable, as in the original ``weight_variable``.
    """

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        std = float(np.sqrt(2.0 / shape[-1]))
        values = keras.random.truncated_normal(shape, stddev=std, dtype=dtype or "float32", seed=self.seed)
        return keras.ops.round(values * 1000.0) / 1000.0

    def get_config(self):
        return {"seed": self.seed}
