"""The architecture parse: a list of block names -> blocks with their kind, geometry and widths.

``BLOCK_TYPES`` is the one table of the original block names (supplementary Figure 8) and what each
is; nothing outside this module looks inside a block name. ``block_specs(config)`` lists a
network's blocks in call order with their layer, radius, extent and widths (the networks build
themselves from it); ``layer_specs(model)`` gives each layer's neighbourhood radii (the input
pipeline builds the pyramid from it), so the pipeline and the networks cannot disagree.

Radii follow the original input pipeline (``tf_classification_inputs`` /
``tf_segmentation_inputs``), including its quirk: a layer's convolution neighbours use the
deformable radius only when a deformable block appears among the layer's blocks *before the
last one*, and a strided deformable block ending the layer uses it for the pooling neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kpconv_tf.config import Config, ModelConfig

# conv: works within its layer; strided / pool: ends an encoder layer (queries are the next layer's
# points); global: per-cloud pooling, ends the encoder; upsample: moves to the finer layer.
BLOCK_KINDS = ("conv", "strided", "pool", "global", "upsample")
LAYER_ENDING_KINDS = ("strided", "pool")
HEAD_KINDS = ("global", "upsample")  # the first such block ends the encoder's layer structure


@dataclass(frozen=True)
class BlockType:
    """What an original block name means.

    ``family`` names the class (``kpconv_tf.blocks.BLOCK_FAMILIES``); ``width`` is the output
    width in units of the layer's feature dimension D (None: the input width is kept).
    """

    family: str
    kind: str
    width: int | None
    deformable: bool = False
    light: bool = False
    residual: bool = False


BLOCK_TYPES = {
    "unary": BlockType("unary", "conv", 1),
    "simple": BlockType("simple", "conv", 1),
    "simple_strided": BlockType("simple", "strided", 1),
    "simple_upsample": BlockType("simple", "upsample", 1),
    "resnet": BlockType("double_conv", "conv", 1, residual=True),
    "vgg": BlockType("double_conv", "conv", 1),
    "resnetb": BlockType("bottleneck", "conv", 2),
    "resnetb_light": BlockType("bottleneck", "conv", 2, light=True),
    "resnetb_strided": BlockType("bottleneck", "strided", 2),
    "resnetb_light_strided": BlockType("bottleneck", "strided", 2, light=True),
    "resnetb_deformable": BlockType("bottleneck", "conv", 2, deformable=True),
    "resnetb_deformable_strided": BlockType("bottleneck", "strided", 2, deformable=True),
    "resnetb_upsample": BlockType("bottleneck", "upsample", 2),
    "inception_deformable": BlockType("inception", "conv", 2, deformable=True),
    "inception_deformable_strided": BlockType("inception", "strided", 2, deformable=True),
    "max_pool": BlockType("max_pool", "pool", None),
    "max_pool_wide": BlockType("max_pool", "pool", None),
    "global_average": BlockType("global_average", "global", None),
    "nearest_upsample": BlockType("nearest_upsample", "upsample", None),
}


def block_type(name: str) -> BlockType:
    if name not in BLOCK_TYPES:
        raise ValueError(f"unknown block name {name!r} in the architecture; known: {sorted(BLOCK_TYPES)}")
    return BLOCK_TYPES[name]


def ends_layer(name: str) -> bool:
    """True for the strided / pooling blocks that end an encoder layer."""
    return block_type(name).kind in LAYER_ENDING_KINDS


def split_layers(architecture: list[str]) -> tuple[list[list[str]], list[str]]:
    """Returns (encoder blocks per layer, decoder/head blocks from the first global/upsample on)."""
    layers: list[list[str]] = [[]]
    for i, name in enumerate(architecture):
        if block_type(name).kind in HEAD_KINDS:
            return [l for l in layers if l or len(layers) == 1], list(architecture[i:])
        layers[-1].append(name)
        if ends_layer(name):
            layers.append([])
    if not layers[-1] and len(layers) > 1:
        layers.pop()
    return layers, []


def num_layers(architecture: list[str]) -> int:
    """Point layers of the pyramid: one more than the layer-ending blocks."""
    return sum(1 for name in architecture if ends_layer(name)) + 1


def needs_upsamples(model: ModelConfig) -> bool:
    """True when a decoder block reads ``upsamples_l`` (segmentation networks). Classification
    inputs skip them, as the original's classification pipeline does: they are the widest search."""
    return any(block_type(name).kind == "upsample" for name in model.architecture)


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


def layer_specs(model: ModelConfig) -> list[LayerSpec]:
    """Per-layer radii exactly as the original input pipeline derives them."""
    encoder, _ = split_layers(model.architecture)
    layers = num_layers(model.architecture)
    # A trailing layer may have no block (e.g. an architecture ending with a strided block): it still
    # has points, as in the original, which appends the pooled points as the last layer.
    while len(encoder) < layers:
        encoder.append([])
    deform_scale = model.density_parameter / (model.kp_extent * 2.5)
    specs = []
    for l, blocks in enumerate(encoder[:layers]):
        dl = model.first_subsampling_dl * 2**l
        r_normal = model.first_subsampling_dl * model.kp_extent * 2.5 * 2**l
        convs = [b for b in blocks if not ends_layer(b)]
        deformable_conv = any(block_type(b).deformable for b in convs[:-1])
        conv_radius = r_normal * deform_scale if deformable_conv else r_normal
        pool_radius = up_radius = next_dl = None
        if blocks and ends_layer(blocks[-1]) and l < layers - 1:
            pool_radius = r_normal * deform_scale if block_type(blocks[-1]).deformable else r_normal
            up_radius = 2 * pool_radius
            next_dl = 2 * r_normal / (model.kp_extent * 2.5)
        specs.append(LayerSpec(l, tuple(blocks), dl, r_normal, conv_radius, pool_radius, up_radius, next_dl))
    return specs


@dataclass(frozen=True)
class BlockSpec:
    """One block of a network, in call order.

    ``layer`` is the pyramid layer whose points the block starts from (a strided block reads
    layer l and writes l + 1, an upsample block reads l and writes l - 1); ``index`` counts the
    blocks of that layer from 0 (the original's scope ``layer_{l}/{name}_{index}``). ``radius`` is
    the original's block radius ``first_subsampling_dl * density_parameter * 2**layer`` and
    ``extent = kp_extent * radius / density_parameter`` (points' units); ``fdim`` is the layer's D.
    ``concat_skip``: a decoder block after which the encoder features of that layer are concatenated.
    """

    name: str
    type: BlockType
    decoder: bool
    layer: int
    index: int
    radius: float
    extent: float
    fdim: int
    in_width: int
    out_width: int
    concat_skip: int | None = None

    @property
    def kind(self) -> str:
        return self.type.kind

    @property
    def scope(self) -> str:
        """The original's variable scope, e.g. ``layer_2/resnetb_strided_1``."""
        return f"{'uplayer' if self.decoder else 'layer'}_{self.layer}/{self.name}_{self.index}"

    @property
    def key(self) -> str:
        """Short key of logs and diagnostics: ``l3_0`` (encoder layer 3, block 0), ``u2_0`` (decoder)."""
        return f"{'u' if self.decoder else 'l'}{self.layer}_{self.index}"


def block_specs(config: Config) -> list[BlockSpec]:
    """Every block of ``config.model.architecture`` in call order: the encoder up to the first
    upsample block (a final global_average included), then the decoder.

    Widths follow the blocks' outputs from ``dataset.in_features_dim`` on; after an upsample block
    the decoder concatenates the encoder features of the layer it reaches, those that entered the
    block ending that layer (the original's skip list).
    """
    m = config.model
    names = list(m.architecture)
    first_up = next((i for i, n in enumerate(names) if block_type(n).kind == "upsample"), len(names))
    specs: list[BlockSpec] = []
    width = config.dataset.in_features_dim
    skips: list[int] = []

    def add(name, decoder, layer, index, concat_skip=None):
        nonlocal width
        kind = block_type(name)
        radius = m.first_subsampling_dl * m.density_parameter * 2**layer
        fdim = m.first_features_dim * 2**layer
        out = width if kind.width is None else kind.width * fdim
        extent = m.kp_extent * radius / m.density_parameter
        specs.append(
            BlockSpec(name, kind, decoder, layer, index, radius, extent, fdim, width, out, concat_skip)
        )
        width = out

    layer = index = 0
    for name in names[:first_up]:
        if ends_layer(name):
            skips.append(width)
        add(name, False, layer, index)
        index += 1
        if ends_layer(name):
            layer, index = layer + 1, 0
    layer, index = num_layers(names) - 1, 0
    for name in names[first_up:]:
        upsample = block_type(name).kind == "upsample"
        add(name, True, layer, index, concat_skip=layer - 1 if upsample else None)
        index += 1
        if upsample:
            layer, index = layer - 1, 0
            width += skips[layer]
    return specs
