"""Per-layer radii must be those of the original input pipeline (fixture README section 7)."""

import pytest

from kpconv_tf.architecture import layer_specs, split_layers
from kpconv_tf.config import ModelConfig

MODELNET40 = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb_deformable",
    "resnetb_deformable_strided",
    "resnetb_deformable",
    "global_average",
]
S3DIS = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "nearest_upsample",
    "unary",
    "nearest_upsample",
    "unary",
    "nearest_upsample",
    "unary",
    "nearest_upsample",
    "unary",
]


def _model(arch, dl=0.02, density=5.0, extent=1.0):
    return ModelConfig(
        architecture=arch, first_subsampling_dl=dl, density_parameter=density, kp_extent=extent
    )


def test_split_layers_modelnet40():
    layers, head = split_layers(MODELNET40)
    assert [len(l) for l in layers] == [3, 2, 2, 2, 1]
    assert head == ["global_average"]
    assert _model(MODELNET40).num_layers == 5


def test_modelnet40_radii_follow_the_original_quirk():
    specs = layer_specs(_model(MODELNET40))
    assert len(specs) == 5
    for l, s in enumerate(specs):
        r_normal = 0.02 * 2.5 * 2**l
        assert s.dl == pytest.approx(0.02 * 2**l)
        assert s.r_normal == pytest.approx(r_normal)
        # The deformable convolutions of layers 3 and 4 still get rigid-radius neighbours.
        assert s.conv_radius == pytest.approx(r_normal)
    for l in range(4):
        assert specs[l].next_dl == pytest.approx(0.02 * 2 ** (l + 1))
    # Only the strided deformable block ending layer 3 uses density_parameter * dl.
    assert [s.pool_radius for s in specs[:3]] == pytest.approx([0.05, 0.1, 0.2])
    assert specs[3].pool_radius == pytest.approx(5.0 * 0.02 * 2**3)
    assert specs[3].upsample_radius == pytest.approx(2 * 5.0 * 0.02 * 2**3)
    assert specs[4].pool_radius is None and not specs[4].has_pool


def test_deformable_before_last_block_uses_deformable_conv_radius():
    arch = ["simple", "resnetb_deformable", "resnetb", "resnetb_strided", "resnetb", "global_average"]
    specs = layer_specs(_model(arch, dl=0.04, density=4.0, extent=1.2))
    r_normal = 0.04 * 1.2 * 2.5
    assert specs[0].conv_radius == pytest.approx(r_normal * 4.0 / (1.2 * 2.5))
    assert specs[0].pool_radius == pytest.approx(r_normal)
    assert specs[0].next_dl == pytest.approx(0.08)
    assert specs[1].conv_radius == pytest.approx(2 * r_normal)


def test_segmentation_architecture_stops_at_decoder():
    layers, head = split_layers(S3DIS)
    assert len(layers) == 5 and head[0] == "nearest_upsample" and len(head) == 8
    specs = layer_specs(_model(S3DIS, dl=0.04))
    assert [s.upsample_radius for s in specs[:4]] == pytest.approx([0.2, 0.4, 0.8, 1.6])
