"""Splits an architecture (list of block names) into layers and derives each layer's radii.

The radii follow the original input pipeline (``tf_classification_inputs`` /
``tf_segmentation_inputs``), including its quirk: a layer's convolution neighbours use the
deformable radius only when a deformable block appears among the layer's blocks *before the
last one*, and a strided deformable block ending the layer uses it for the pooling neighbours.
The pipeline and the networks both read these numbers from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from kpconv_tf.config import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of one encoder layer; lengths in the units of the points (metres)."""

    index: int
    blocks: tuple[str, ...]  # blocks working at this layer, the strided/pool block ending it included
    dl: float  # grid size of points_l (first_subsampling_dl * 2**l)
    r_normal: float  # rigid convolution radius, 2.5 * kp_extent * dl
    conv_radius: float  # radius of neighbors_l as the original pipeline computes it
    pool_radius: float | None  # radius of pools_l (points_{l+1} in points_l); None for the last layer
    upsample_radius: float | None  # radius of upsamples_l (points_l in points_{l+1}), 2 * pool_radius
    next_dl: float | None  # grid size used to subsample points_{l+1}

    @property
    def has_pool(self) -> bool:
        return self.pool_radius is not None


def is_pooling_block(name: str) -> bool:
    return "pool" in name or "strided" in name


def split_layers(architecture: list[str]) -> tuple[list[list[str]], list[str]]:
    """Returns (encoder blocks per layer, decoder/head blocks from the first global/upsample on)."""
    layers: list[list[str]] = [[]]
    for i, name in enumerate(architecture):
        if "global" in name or "upsample" in name:
            return [l for l in layers if l or len(layers) == 1], list(architecture[i:])
        layers[-1].append(name)
        if is_pooling_block(name):
            layers.append([])
    if not layers[-1] and len(layers) > 1:
        layers.pop()
    return layers, []


def needs_upsamples(model: ModelConfig) -> bool:
    """True when a decoder block reads ``upsamples_l`` (segmentation networks). Classification
    inputs skip them, as the original's classification pipeline does: they are the widest search."""
    return any("upsample" in name for name in split_layers(model.architecture)[1])


def layer_specs(model: ModelConfig) -> list[LayerSpec]:
    """Per-layer radii exactly as the original input pipeline derives them."""
    encoder, _ = split_layers(model.architecture)
    num_layers = model.num_layers
    # A trailing layer may have no block (e.g. an architecture ending with a strided block): it still
    # has points, as in the original, which appends the pooled points as the last layer.
    while len(encoder) < num_layers:
        encoder.append([])
    deform_scale = model.density_parameter / (model.kp_extent * 2.5)
    specs = []
    for l, blocks in enumerate(encoder[:num_layers]):
        dl = model.first_subsampling_dl * 2**l
        r_normal = model.first_subsampling_dl * model.kp_extent * 2.5 * 2**l
        convs = [b for b in blocks if not is_pooling_block(b)]
        conv_radius = r_normal * deform_scale if any("deformable" in b for b in convs[:-1]) else r_normal
        pool_radius = up_radius = next_dl = None
        if blocks and is_pooling_block(blocks[-1]) and l < num_layers - 1:
            pool_radius = r_normal * deform_scale if "deformable" in blocks[-1] else r_normal
            up_radius = 2 * pool_radius
            next_dl = 2 * r_normal / (model.kp_extent * 2.5)
        specs.append(LayerSpec(l, tuple(blocks), dl, r_normal, conv_radius, pool_radius, up_radius, next_dl))
    return specs
