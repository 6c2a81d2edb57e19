"""Network blocks, one registered Keras layer per block family (supplementary Figure 8).

``make_block(spec, config, network)`` builds the block of a ``kpconv_tf.architecture.BlockSpec``;
the blocks themselves take plain arguments (widths, radius, extent, KPConv and batch-norm
settings, family flags) and round-trip through ``get_config``. A block is called as
``block(features, inputs, training=...)`` with ``features`` [N_l, Din] of its input layer and
``inputs`` the stacked-batch dict of ``kpconv_tf.inputs``. Every KPConv of a block gets the block's
``extent`` and kernel points at 1.5 x extent, rigid or deformable alike; ``fdim`` is the layer's
feature dimension D of Figure 8 (bottleneck and inception blocks output 2 D). Deformable KPConvs add
their offset regularisation with ``add_loss`` (``model.losses``).

Each block lists its variables under their original names (``original_variables``), relative to
its scope ``layer_{l}/{name}_{i}``, which is how checkpoints of the original release are mapped.
"""

from __future__ import annotations

import zlib

import keras
import tensorflow as tf

from kpconv_tf.architecture import BlockSpec
from kpconv_tf.batch_norm import BatchNorm
from kpconv_tf.config import Config
from kpconv_tf.initializers import OriginalTruncatedNormal
from kpconv_tf.inputs import layer_keys
from kpconv_tf.layers import KPConv
from kpconv_tf.losses import offset_loss_variant
from kpconv_tf.pooling import closest_pool, max_pool


def leaky_relu(x):
    return tf.nn.leaky_relu(x, alpha=0.2)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class UnaryConv(keras.layers.Layer):
    """Pointwise linear map (1x1 convolution) without bias: [N, Din] -> [N, filters]."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)

    def build(self, features_shape):
        self.kernel = self.add_weight(
            name="weights", shape=(features_shape[-1], self.filters), initializer=OriginalTruncatedNormal()
        )

    def call(self, features):
        return tf.matmul(features, self.kernel)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kpconv_tf")
class BiasOffset(keras.layers.Layer):
    """The original's replacement for batch norm when ``use_batch_norm`` is off: x + offset."""

    def build(self, features_shape):
        self.offset = self.add_weight(name="offset", shape=(features_shape[-1],), initializer="zeros")

    def call(self, features, training=None):
        return features + self.offset


def normalization(use_batch_norm, momentum, name, synchronized=False, implementation="auto"):
    """Batch norm (``kpconv_tf.batch_norm.BatchNorm``, epsilon 1e-6; ``synchronized``: statistics
    over every replica of a ``tf.distribute`` strategy), or ``BiasOffset`` when ``use_batch_norm``
    is off."""
    if use_batch_norm:
        return BatchNorm(
            implementation=implementation,
            momentum=momentum,
            epsilon=1e-6,
            synchronized=synchronized,
            name=name,
        )
    return BiasOffset(name=name)


def norm_variables(norm, prefix):
    if isinstance(norm, BiasOffset):
        return {prefix + "offset": norm.offset}
    return {
        prefix + "batch_normalization/gamma": norm.gamma,
        prefix + "batch_normalization/beta": norm.beta,
        prefix + "batch_normalization/moving_mean": norm.moving_mean,
        prefix + "batch_normalization/moving_variance": norm.moving_variance,
    }


def conv_variables(conv, prefix):
    out = {prefix + "weights": conv.kernel}
    if isinstance(conv, KPConv):
        out[prefix + "kernel_points"] = conv.kernel_points
        if conv.deformable and conv.offset_mode == "mlp":
            out[prefix + "offset_mlp_weights"] = conv.offset_mlp_weights
            out[prefix + "offset_mlp_bias"] = conv.offset_mlp_bias
        elif conv.deformable:
            out[prefix + "offset_conv_weights"] = conv.offset_conv_weights
            out[prefix + "offset_conv_bias"] = conv.offset_conv_bias
    return out


def unit_variables(prefix, conv, norm=None):
    """Original names of one conv (+ normalisation) unit under ``prefix``."""
    out = conv_variables(conv, prefix)
    if norm is not None:
        out.update(norm_variables(norm, prefix))
    return out


class Block(keras.layers.Layer):
    """What every block takes: its place and geometry (``layer_index``, ``radius``, ``extent``, ``fdim``
    of ``kpconv_tf.architecture.BlockSpec``) and the KPConv and normalisation settings; subclasses
    add their flags and define ``call(features, inputs, training)``.

    Args:
      fdim: the layer's feature dimension D.
      layer_index: pyramid layer the block reads (``inputs`` keys of ``kpconv_tf.inputs``).
      radius, extent: the block radius and the KPConv influence distance (points' units).
      block_type: the original block name (``kpconv_tf.architecture.BLOCK_TYPES``).
      num_kernel_points, influence, aggregation, fixed_kernel_points, modulated, offset_bound: as
        ``KPConv``'s kernel_size, influence, aggregation, fixed, modulated, offset_bound.
      kernel_seed: the model's seed; each KPConv's is derived from it and the layer names.
      use_batch_norm, batch_norm_momentum: batch norm (epsilon 1e-6), or a learned offset when off.
      sync_batch_norm: batch statistics over all replicas of a ``tf.distribute`` strategy.
      offset_loss, offset_loss_weight, repulse_extent: passed to the deformable KPConvs.
      implementation: how KPConvs, max pooling and batch norm run (``kpconv_tf.ops``: 'auto',
        'fused' or 'standard'); ``use_standard_ops`` switches a built block to 'standard'.
    """

    def __init__(
        self,
        fdim,
        layer_index=0,
        radius=1.0,
        extent=1.0,
        block_type="",
        num_kernel_points=15,
        influence="linear",
        aggregation="sum",
        fixed_kernel_points="center",
        modulated=False,
        offset_bound=0.0,
        kernel_seed=None,
        use_batch_norm=True,
        batch_norm_momentum=0.99,
        sync_batch_norm=False,
        offset_loss=None,
        offset_loss_weight=1.0,
        repulse_extent=1.2,
        implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fdim = int(fdim)
        self.layer_index = int(layer_index)
        self.radius = float(radius)
        self.extent = float(extent)
        self.block_type = block_type
        self.num_kernel_points = int(num_kernel_points)
        self.influence = influence
        self.aggregation = aggregation
        self.fixed_kernel_points = fixed_kernel_points
        self.modulated = bool(modulated)
        self.offset_bound = float(offset_bound)
        self.kernel_seed = kernel_seed
        self.use_batch_norm = bool(use_batch_norm)
        self.batch_norm_momentum = float(batch_norm_momentum)
        self.sync_batch_norm = bool(sync_batch_norm)
        self.offset_loss = offset_loss
        self.offset_loss_weight = float(offset_loss_weight)
        self.repulse_extent = float(repulse_extent)
        self.implementation = implementation

    def get_config(self):
        return {
            **super().get_config(),
            "fdim": self.fdim,
            "layer_index": self.layer_index,
            "radius": self.radius,
            "extent": self.extent,
            "block_type": self.block_type,
            "num_kernel_points": self.num_kernel_points,
            "influence": self.influence,
            "aggregation": self.aggregation,
            "fixed_kernel_points": self.fixed_kernel_points,
            "modulated": self.modulated,
            "offset_bound": self.offset_bound,
            "kernel_seed": self.kernel_seed,
            "use_batch_norm": self.use_batch_norm,
            "batch_norm_momentum": self.batch_norm_momentum,
            "sync_batch_norm": self.sync_batch_norm,
            "offset_loss": self.offset_loss,
            "offset_loss_weight": self.offset_loss_weight,
            "repulse_extent": self.repulse_extent,
            "implementation": self.implementation,
        }

    def norm(self, name):
        return normalization(
            self.use_batch_norm, self.batch_norm_momentum, name, self.sync_batch_norm, self.implementation
        )

    def use_standard_ops(self):
        """Runs the block, its KPConvs and its batch norms on standard TF ops only."""
        self.implementation = "standard"
        for layer in vars(self).values():
            if isinstance(layer, KPConv | BatchNorm):
                layer.implementation = "standard"

    def kpconv(self, filters, deformable=False, name="conv", offset_mode="kpconv"):
        seed = (
            None
            if self.kernel_seed is None
            else self.kernel_seed * 1000 + zlib.crc32((self.name + name).encode()) % 1000
        )
        return KPConv(
            filters,
            self.num_kernel_points,
            extent=self.extent,
            radius=self.radius,
            influence=self.influence,
            aggregation=self.aggregation,
            fixed=self.fixed_kernel_points,
            deformable=deformable,
            modulated=self.modulated and deformable,
            kernel_seed=seed,
            offset_mode=offset_mode,
            offset_bound=self.offset_bound if deformable else 0.0,
            offset_loss=self.offset_loss if deformable else None,
            offset_loss_weight=self.offset_loss_weight,
            repulse_extent=self.repulse_extent,
            implementation=self.implementation,
            name=name,
        )

    def kpconvs(self):
        """The block's KPConv layers, in call order."""
        return [value for value in vars(self).values() if isinstance(value, KPConv)]

    def conv_geometry(self, inputs, strided=False, upsample=False, layer=None):
        """(queries, supports, neighbours) of a KPConv of this block: within ``layer`` (default the
        block's), from it to the next layer (strided) or to the previous one (upsample)."""
        l = self.layer_index if layer is None else layer
        keys = layer_keys(l)
        if strided:
            return inputs[layer_keys(l + 1).points], inputs[keys.points], inputs[keys.pools]
        if upsample:
            below = layer_keys(l - 1)
            return inputs[below.points], inputs[keys.points], inputs[below.upsamples]
        return inputs[keys.points], inputs[keys.points], inputs[keys.neighbors]

    def run_kpconv(self, conv, features, inputs, strided=False, upsample=False, layer=None):
        query, support, neighbors = self.conv_geometry(inputs, strided, upsample, layer)
        return conv(query, support, neighbors, features)

    def original_variables(self):
        return {}


@keras.saving.register_keras_serializable(package="kpconv_tf")
class UnaryBlock(Block):
    """'unary': matmul -> BN -> leaky ReLU (fdim outputs)."""

    def build(self, features_shape, *args, **kwargs):
        self.conv = UnaryConv(self.fdim, name="conv")
        self.norm = self.norm("norm")

    def call(self, features, inputs, training=False):
        return leaky_relu(self.norm(self.conv(features), training=training))

    def original_variables(self):
        return unit_variables("", self.conv, self.norm)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class SimpleBlock(Block):
    """'simple' / 'simple_strided' / 'simple_upsample': KPConv -> BN -> leaky ReLU (fdim outputs)."""

    def __init__(self, *args, strided=False, upsample=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.strided, self.upsample = bool(strided), bool(upsample)

    def get_config(self):
        return {**super().get_config(), "strided": self.strided, "upsample": self.upsample}

    def build(self, features_shape, *args, **kwargs):
        self.conv = self.kpconv(self.fdim)
        self.norm = self.norm("norm")

    def call(self, features, inputs, training=False):
        x = self.run_kpconv(self.conv, features, inputs, self.strided, self.upsample)
        return leaky_relu(self.norm(x, training=training))

    def original_variables(self):
        return unit_variables("", self.conv, self.norm)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class DoubleConvBlock(Block):
    """'vgg': KPConv -> BN -> leaky, twice (fdim outputs). 'resnet': the same plus a shortcut
    (unary + BN when the width differs from fdim), summed before the last leaky ReLU."""

    def __init__(self, *args, residual=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual = bool(residual)

    def get_config(self):
        return {**super().get_config(), "residual": self.residual}

    def build(self, features_shape, *args, **kwargs):
        self.conv1, self.norm1 = (
            self.kpconv(self.fdim, name="conv1"),
            self.norm("norm1"),
        )
        self.conv2, self.norm2 = (
            self.kpconv(self.fdim, name="conv2"),
            self.norm("norm2"),
        )
        self.shortcut = None
        if self.residual and features_shape[-1] != self.fdim:
            self.shortcut = UnaryConv(self.fdim, name="shortcut")
            self.shortcut_norm = self.norm("shortcut_norm")

    def call(self, features, inputs, training=False):
        x = leaky_relu(self.norm1(self.run_kpconv(self.conv1, features, inputs), training=training))
        x = self.norm2(self.run_kpconv(self.conv2, x, inputs), training=training)
        if not self.residual:
            return leaky_relu(x)
        shortcut = features
        if self.shortcut is not None:
            shortcut = self.shortcut_norm(self.shortcut(features), training=training)
        return leaky_relu(x + shortcut)

    def original_variables(self):
        out = {
            **unit_variables("conv1/", self.conv1, self.norm1),
            **unit_variables("conv2/", self.conv2, self.norm2),
        }
        if self.shortcut is not None:
            out.update(unit_variables("shortcut/", self.shortcut, self.shortcut_norm))
        return out


@keras.saving.register_keras_serializable(package="kpconv_tf")
class ResnetBottleneckBlock(Block):
    """'resnetb' family (Figure 8): unary D/2 -> KPConv D/2 -> unary 2D, plus shortcut.

    ``light``: conv1 maps to D without activation (identity when the width already is D) and the
    KPConv keeps D. Strided: the KPConv goes from points_l to points_{l+1} and the shortcut is a
    max-pool over pools_l. Upsample: KPConv from points_l to points_{l-1}, nearest shortcut.
    """

    def __init__(self, *args, strided=False, deformable=False, light=False, upsample=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.strided, self.deformable = bool(strided), bool(deformable)
        self.light, self.upsample = bool(light), bool(upsample)

    def get_config(self):
        flags = {"strided": self.strided, "deformable": self.deformable, "light": self.light}
        return {**super().get_config(), **flags, "upsample": self.upsample}

    def build(self, features_shape, *args, **kwargs):
        d_in = features_shape[-1]
        mid = self.fdim if self.light else self.fdim // 2
        self.conv1 = None if (self.light and d_in == mid) else UnaryConv(mid, name="conv1")
        self.norm1 = None if self.conv1 is None else self.norm("norm1")
        self.conv2 = self.kpconv(mid, self.deformable, name="conv2")
        self.norm2 = self.norm("norm2")
        self.conv3 = UnaryConv(2 * self.fdim, name="conv3")
        self.norm3 = self.norm("norm3")
        self.shortcut = None
        if d_in != 2 * self.fdim:
            self.shortcut = UnaryConv(2 * self.fdim, name="shortcut")
            self.shortcut_norm = self.norm("shortcut_norm")

    def call(self, features, inputs, training=False):
        x = features
        if self.conv1 is not None:
            x = self.norm1(self.conv1(x), training=training)
            if not self.light:
                x = leaky_relu(x)
        x = self.run_kpconv(self.conv2, x, inputs, self.strided, self.upsample)
        x = leaky_relu(self.norm2(x, training=training))
        x = self.norm3(self.conv3(x), training=training)
        shortcut = features
        if self.strided:
            shortcut = max_pool(features, inputs[layer_keys(self.layer_index).pools], self.implementation)
        elif self.upsample:
            shortcut = closest_pool(features, inputs[layer_keys(self.layer_index - 1).upsamples])
        if self.shortcut is not None:
            shortcut = self.shortcut_norm(self.shortcut(shortcut), training=training)
        return leaky_relu(x + shortcut)

    def original_variables(self):
        units = [("conv2/", self.conv2, self.norm2), ("conv3/", self.conv3, self.norm3)]
        if self.conv1 is not None:
            units.insert(0, ("conv1/", self.conv1, self.norm1))
        if self.shortcut is not None:
            units.append(("shortcut/", self.shortcut, self.shortcut_norm))
        return {name: v for unit in units for name, v in unit_variables(*unit).items()}


@keras.saving.register_keras_serializable(package="kpconv_tf")
class InceptionDeformableBlock(Block):
    """'inception_deformable' (+ '_strided'): two paths concatenated, then unary 2D + shortcut.

    path1: unary D/2 (BN, leaky) -> rigid KPConv D/2; path2: unary D/2 (BN, leaky) -> rigid KPConv
    D/2 -> deformable KPConv D/2 with MLP offsets (the original's ``KPConv_deformable_v2``);
    concat -> BN -> leaky -> unary 2D -> BN, plus shortcut (max-pool if strided, unary + BN if the
    width differs) -> leaky. Strided: the first KPConvs go from points_l to points_{l+1}; the
    original then feeds path2's (already pooled) features to the deformable KPConv with pools_l,
    which cannot index them, so here that KPConv works within points_{l+1} (neighbors_{l+1}).
    """

    def __init__(self, *args, strided=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.strided = bool(strided)

    def get_config(self):
        return {**super().get_config(), "strided": self.strided}

    def build(self, features_shape, *args, **kwargs):
        half = self.fdim // 2
        self.unary1, self.unary1_norm = (
            UnaryConv(half, name="path1_unary"),
            self.norm("path1_unary_norm"),
        )
        self.conv1 = self.kpconv(half, name="path1_conv")
        self.unary2, self.unary2_norm = (
            UnaryConv(half, name="path2_unary"),
            self.norm("path2_unary_norm"),
        )
        self.conv2 = self.kpconv(half, name="path2_conv")
        self.deform = self.kpconv(half, deformable=True, name="path2_conv2_deform", offset_mode="mlp")
        self.concat_norm = self.norm("concat_norm")
        self.unary, self.unary_norm = UnaryConv(2 * self.fdim, name="unary"), self.norm("unary_norm")
        self.shortcut = None
        if features_shape[-1] != 2 * self.fdim:
            self.shortcut = UnaryConv(2 * self.fdim, name="shortcut")
            self.shortcut_norm = self.norm("shortcut_norm")

    def call(self, features, inputs, training=False):
        x1 = leaky_relu(self.unary1_norm(self.unary1(features), training=training))
        x1 = self.run_kpconv(self.conv1, x1, inputs, self.strided)
        x2 = leaky_relu(self.unary2_norm(self.unary2(features), training=training))
        x2 = self.run_kpconv(self.conv2, x2, inputs, self.strided)
        x2 = self.run_kpconv(
            self.deform, x2, inputs, layer=self.layer_index + 1 if self.strided else self.layer_index
        )
        x = leaky_relu(self.concat_norm(tf.concat([x1, x2], axis=1), training=training))
        x = self.unary_norm(self.unary(x), training=training)
        shortcut = (
            max_pool(features, inputs[layer_keys(self.layer_index).pools], self.implementation)
            if self.strided
            else features
        )
        if self.shortcut is not None:
            shortcut = self.shortcut_norm(self.shortcut(shortcut), training=training)
        return leaky_relu(x + shortcut)

    def original_variables(self):
        units = [
            ("path1/unary/", self.unary1, self.unary1_norm),
            ("path1/conv/", self.conv1),
            ("path2/unary/", self.unary2, self.unary2_norm),
            ("path2/conv/", self.conv2),
            ("path2/conv2_deform/", self.deform),
            ("unary/", self.unary, self.unary_norm),
        ]
        if self.shortcut is not None:
            units.append(("shortcut/", self.shortcut, self.shortcut_norm))
        out = {name: v for unit in units for name, v in unit_variables(*unit).items()}
        out.update(norm_variables(self.concat_norm, "concat/"))
        return out


@keras.saving.register_keras_serializable(package="kpconv_tf")
class MaxPoolBlock(Block):
    """'max_pool' / 'max_pool_wide': max over pools_l (features of points_{l+1})."""

    def call(self, features, inputs, training=False):
        return max_pool(features, inputs[layer_keys(self.layer_index).pools], self.implementation)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class GlobalAverageBlock(Block):
    """'global_average': per-cloud mean of the last layer's features -> [B, D]."""

    def call(self, features, inputs, training=False):
        lengths = inputs[layer_keys(self.layer_index).lengths]
        segments = tf.repeat(tf.range(tf.shape(lengths)[0]), lengths)
        sums = tf.math.unsorted_segment_sum(features, segments, tf.shape(lengths)[0])
        return sums / tf.cast(tf.maximum(lengths, 1), features.dtype)[:, None]


@keras.saving.register_keras_serializable(package="kpconv_tf")
class NearestUpsampleBlock(Block):
    """'nearest_upsample': features of points_l copied to points_{l-1} by nearest neighbour."""

    def call(self, features, inputs, training=False):
        return closest_pool(features, inputs[layer_keys(self.layer_index - 1).upsamples])


# The class of each ``kpconv_tf.architecture.BlockType.family``.
BLOCK_FAMILIES = {
    "unary": UnaryBlock,
    "simple": SimpleBlock,
    "double_conv": DoubleConvBlock,
    "bottleneck": ResnetBottleneckBlock,
    "inception": InceptionDeformableBlock,
    "max_pool": MaxPoolBlock,
    "global_average": GlobalAverageBlock,
    "nearest_upsample": NearestUpsampleBlock,
}


def make_block(spec: BlockSpec, config: Config, network: str):
    """The block of ``spec`` in a ``network`` ('kpcnn' | 'kpfcnn', which fixes the offset-loss
    normalisation), named ``{layer|uplayer}_{l}_{name}_{index}``, with ``config``'s settings."""
    m, t, kind = config.model, config.train, spec.type
    flags = {
        "unary": {},
        "simple": {"strided": kind.kind == "strided", "upsample": kind.kind == "upsample"},
        "double_conv": {"residual": kind.residual},
        "bottleneck": {
            "strided": kind.kind == "strided",
            "upsample": kind.kind == "upsample",
            "deformable": kind.deformable,
            "light": kind.light,
        },
        "inception": {"strided": kind.kind == "strided"},
    }.get(kind.family, {})
    return BLOCK_FAMILIES[kind.family](
        spec.fdim,
        layer_index=spec.layer,
        radius=spec.radius,
        extent=spec.extent,
        block_type=spec.name,
        num_kernel_points=m.num_kernel_points,
        influence=m.kp_influence,
        aggregation=m.convolution_mode,
        fixed_kernel_points=m.fixed_kernel_points,
        modulated=m.modulated,
        offset_bound=m.offset_bound,
        kernel_seed=m.kernel_seed,
        use_batch_norm=m.use_batch_norm,
        batch_norm_momentum=m.batch_norm_momentum,
        sync_batch_norm=m.sync_batch_norm,
        offset_loss=offset_loss_variant(t.offsets_loss, network),
        offset_loss_weight=t.offsets_decay,
        repulse_extent=t.repulse_extent,
        name=spec.scope.replace("/", "_"),
        **flags,
    )
