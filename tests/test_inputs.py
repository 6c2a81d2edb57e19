"""kpconv_tf.inputs is the one definition of the input dict (the exports use input_spec as their
signature): the pyramid and the dummy inputs follow it."""

import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.inputs import input_spec
from kpconv_tf.models import dummy_inputs
from kpconv_tf.pyramid import build_pyramid

ENCODER = ["simple", "resnetb_strided", "resnetb", "global_average"]
DECODER = ["simple", "resnetb_strided", "resnetb", "nearest_upsample", "unary"]


def _config(architecture):
    model = dict(
        architecture=architecture, first_features_dim=8, first_subsampling_dl=0.05, density_parameter=5.0
    )
    return Config.from_dict({"dataset": {"num_classes": 3, "in_features_dim": 2}, "model": model})


@pytest.mark.parametrize("architecture", [ENCODER, DECODER], ids=["encoder", "decoder"])
def test_spec_keys_are_the_pyramid_keys(architecture):
    config = _config(architecture)
    points = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32) * 0.3
    inputs = build_pyramid(points, np.array([120, 80], np.int32), np.ones((200, 2), np.float32), config.model)
    spec = input_spec(config)
    assert list(inputs) == list(spec)
    for key, value in inputs.items():
        assert spec[key].is_compatible_with(value), key
    assert ("upsamples_0" in spec) == (architecture is DECODER)


@pytest.mark.parametrize("architecture", [ENCODER, DECODER], ids=["encoder", "decoder"])
def test_dummy_inputs_follow_the_spec(architecture):
    config = _config(architecture)
    spec = input_spec(config)
    dummy = dummy_inputs(config)
    # object_labels is the extra input of multi-head networks.
    assert set(dummy) - {"object_labels"} == set(spec)
    for key, s in spec.items():
        assert dummy[key].dtype == s.dtype and dummy[key].shape.rank == s.shape.rank, key
        assert s.is_compatible_with(tf.convert_to_tensor(dummy[key])), key
