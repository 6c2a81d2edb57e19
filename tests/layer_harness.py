"""A shared round-trip check for our Keras layers, in the manner of keras-hub's ``run_layer_test``."""

import json

import keras
import numpy as np


def run_layer_test(layer, call_args, call_kwargs=None, trainable_weights=None, non_trainable_weights=None):
    """Builds and calls ``layer``, checks its weight counts, serialises it to JSON and back, and
    checks that the copy (same config, weights copied) computes the same output. Returns the output.

    ``call_args`` / ``call_kwargs`` are the call's arguments (tensors, dicts of tensors).
    """
    call_kwargs = call_kwargs or {}
    output = layer(*call_args, **call_kwargs)
    if trainable_weights is not None:
        assert len(layer.trainable_weights) == trainable_weights, [w.path for w in layer.trainable_weights]
    if non_trainable_weights is not None:
        names = [w.path for w in layer.non_trainable_weights]
        assert len(layer.non_trainable_weights) == non_trainable_weights, names
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
    clone(*call_args, **call_kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        np.asarray(clone(*call_args, **call_kwargs)), np.asarray(output), rtol=1e-6, atol=1e-6
    )
    return output
