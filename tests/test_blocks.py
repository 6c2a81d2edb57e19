"""Every block family (and the small layers the blocks use) round-trips through get_config."""

import numpy as np
import pytest
import tensorflow as tf
from layer_harness import run_layer_test

from kpconv_tf import blocks
from kpconv_tf.architecture import BLOCK_TYPES, block_specs
from kpconv_tf.config import Config
from kpconv_tf.inputs import layer_keys
from kpconv_tf.layers import KPConv
from kpconv_tf.pyramid import build_pyramid

# A three-layer KP-FCNN whose input dict has every kind of key (neighbours, pools, upsamples).
ARCHITECTURE = ["simple", "resnetb_strided", "resnetb", "resnetb_strided", "resnetb"]
ARCHITECTURE += ["nearest_upsample", "unary", "nearest_upsample", "unary"]
FDIM, IN_WIDTH, LAYER = 8, 16, 1

# block name -> (trainable, non-trainable) weights with batch norm, input width 16 = 2 * fdim.
WEIGHTS = {
    "unary": (3, 2),  # matmul, BN gamma/beta | BN moving mean/variance
    "simple": (3, 3),  # KPConv weights, BN | kernel points, BN
    "simple_strided": (3, 3),
    "simple_upsample": (3, 3),
    "resnet": (9, 8),  # two KPConv units and a unary shortcut (16 -> 8)
    "vgg": (6, 6),
    "resnetb": (9, 7),  # unary, KPConv, unary; no shortcut (16 = 2 * 8)
    "resnetb_light": (9, 7),
    "resnetb_strided": (9, 7),
    "resnetb_light_strided": (9, 7),
    "resnetb_deformable": (11, 7),  # + offset convolution weights and bias
    "resnetb_deformable_strided": (11, 7),
    "resnetb_upsample": (9, 7),
    "inception_deformable": (16, 11),  # 3 KPConvs (one with an offset MLP), 2 unary + BN, concat BN
    "inception_deformable_strided": (16, 11),
    "max_pool": (0, 0),
    "max_pool_wide": (0, 0),
    "global_average": (0, 0),
    "nearest_upsample": (0, 0),
}


def _config(offsets_loss="point2point"):
    return Config.from_dict(
        {
            "dataset": {"num_classes": 3, "in_features_dim": 1},
            "model": {
                "network_model": "segmentation",
                "architecture": ARCHITECTURE,
                "first_features_dim": FDIM // 2,
                "first_subsampling_dl": 0.05,
                "density_parameter": 5.0,
                "kp_influence": "linear",
                "convolution_mode": "sum",
                "kernel_seed": 0,
            },
            "train": {"offsets_loss": offsets_loss},
        }
    )


@pytest.fixture(scope="module")
def stacked_batch():
    """Two clouds of different sizes stacked, pyramid of ``ARCHITECTURE``."""
    rng = np.random.default_rng(0)
    clouds = [rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32) for n in (300, 180)]
    points = np.concatenate(clouds)
    lengths = np.array([len(c) for c in clouds], np.int32)
    return build_pyramid(points, lengths, np.ones((len(points), 1), np.float32), _config().model)


def _spec(name):
    """The spec of ``name`` at layer 1 (D = 8), as the architecture parse would give it."""
    config = _config()
    config.model.architecture = ["simple", "simple_strided", name] + (
        [] if BLOCK_TYPES[name].kind == "upsample" else ["nearest_upsample"]
    )
    config.model.first_features_dim = FDIM // 2
    spec = block_specs(config)[2]
    assert spec.layer == LAYER and spec.fdim == FDIM and spec.name == name
    return spec


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_block_round_trip(name, stacked_batch):
    spec = _spec(name)
    block = blocks.make_block(spec, _config(), "kpfcnn")
    n = int(stacked_batch[layer_keys(LAYER).points].shape[0])
    features = tf.random.stateless_normal([n, IN_WIDTH], seed=[1, 2])
    trainable, non_trainable = WEIGHTS[name]
    out = run_layer_test(block, (features, stacked_batch), {"training": False}, trainable, non_trainable)
    rows = {
        "conv": n,
        "strided": stacked_batch[layer_keys(LAYER + 1).points].shape[0],
        "pool": stacked_batch[layer_keys(LAYER + 1).points].shape[0],
        "global": 2,
        "upsample": stacked_batch[layer_keys(LAYER - 1).points].shape[0],
    }[spec.kind]
    width = IN_WIDTH if BLOCK_TYPES[name].width is None else BLOCK_TYPES[name].width * FDIM
    assert tuple(out.shape) == (rows, width)
    # A deformable block's KPConv adds its offset term, and only that.
    deformable = [conv for conv in block.kpconvs() if conv.deformable]
    assert len(block.losses) == len(deformable) == int(BLOCK_TYPES[name].deformable)


def test_blocks_without_batch_norm_round_trip(stacked_batch):
    config = _config()
    config.model.use_batch_norm = False
    block = blocks.make_block(_spec("resnetb"), config, "kpfcnn")
    features = tf.ones([int(stacked_batch[layer_keys(LAYER).points].shape[0]), IN_WIDTH])
    run_layer_test(block, (features, stacked_batch), {"training": True}, 6, 1)  # offsets, no BN statistics


def test_small_layers_round_trip(stacked_batch):
    keys = layer_keys(0)
    features = tf.random.stateless_normal([int(stacked_batch[keys.points].shape[0]), 4], seed=[3, 4])
    run_layer_test(blocks.UnaryConv(5), (features,), trainable_weights=1)
    run_layer_test(blocks.BiasOffset(), (features,), trainable_weights=1)
    geometry = (stacked_batch[keys.points], stacked_batch[keys.points], stacked_batch[keys.neighbors])
    conv = KPConv(6, extent=0.05, radius=0.25, deformable=True, offset_loss="permissive", kernel_seed=1)
    run_layer_test(conv, (*geometry, features), trainable_weights=3, non_trainable_weights=1)
    assert len(conv.losses) == 1
