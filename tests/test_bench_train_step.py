"""The FLOP count of benchmarks/bench_train_step.py on a tiny network, by hand from the shapes."""

import numpy as np
import pytest

from benchmarks.bench_train_step import step_flops, variant_architecture
from kpconv_tf.config import Config
from kpconv_tf.models import KPCNN
from kpconv_tf.pyramid import build_pyramid


def test_step_flops_of_a_tiny_kpcnn_follow_the_layer_shapes():
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 5},
            "model": {
                "architecture": ["simple", "global_average"],
                "first_features_dim": 8,
                "kernel_seed": 0,
            },
        }
    )
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (300, 3)).astype(np.float32)
    lengths = np.array([120, 180], np.int32)
    inputs = build_pyramid(points, lengths, np.ones((300, 1), np.float32), config.model)
    network = KPCNN(config)
    network(inputs, training=False)
    (kernel,) = [v for v in network.trainable_variables if len(v.shape) == 3]  # the one KPConv's weights
    k, d_in, d_out = kernel.shape
    n, h = inputs["neighbors_0"].shape
    kpconv = 10 * n * h * k + 2 * n * h * k * d_in + 2 * n * k * d_in * d_out
    # The KP-CNN head: global average [2, d_out] -> fc 1024 -> 5 classes.
    unary = 2 * 2 * d_out * 1024 + 2 * 2 * 1024 * 5
    flops = step_flops(network, inputs)
    assert flops == {"kpconv": kpconv, "unary": unary, "step": 3 * (kpconv + unary)}
    # The recording is undone: a second count is the same, and plain calls are not recorded.
    network(inputs, training=True)
    assert step_flops(network, inputs) == flops


@pytest.mark.parametrize(
    "deformable,expected",
    [
        (False, ["simple", "resnetb_strided", "resnetb", "resnetb_strided", "resnetb", "global_average"]),
        (
            True,
            [
                "simple",
                "resnetb_strided",
                "resnetb",
                "resnetb_strided",
                "resnetb_deformable",
                "global_average",
            ],
        ),
    ],
)
def test_variant_architectures(deformable, expected):
    architecture = [
        "simple",
        "resnetb_strided",
        "resnetb",
        "resnetb_strided",
        "resnetb_deformable",
        "global_average",
    ]
    assert variant_architecture(architecture, deformable) == expected
