"""KP-CNN and KP-FCNN (paper section 3.4, supplementary Figure 9).

Both consume one stacked-batch input dict (ARCHITECTURE.md). The encoder follows
``config.model.architecture`` block by block exactly as the original assembles it (radius and
feature dimension double after every strided / pooling block).

* ``KPCNN(config)`` -> logits ``[B, num_classes]``: encoder, global average, fc 1024 -> BN -> leaky
  ReLU -> dropout -> linear classifier with bias.
* ``KPFCNN(config)`` -> logits ``[N_0, num_classes]``: encoder, decoder from the first
  ``*_upsample`` block on (each upsampling halves radius and width and concatenates the encoder's
  features of that layer, taken before its pooling block), unary to ``first_features_dim`` -> BN ->
  leaky ReLU -> linear with bias.

Both build their blocks from ``kpconv_tf.architecture.block_specs`` (``build_network(config)``
picks the network by ``model.network_model``). Training protocol used by ``training.trainer``:
``model(inputs, training, dropout_uniform=None)``, ``model.output_loss(labels, logits, inputs)``
and ``model.losses`` (the offset regularisation of the last forward pass, one term per deformable
KPConv, already multiplied by ``offsets_decay``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kpconv_tf.architecture import LAYER_ENDING_KINDS, block_specs, layer_specs
from kpconv_tf.batch_norm import BatchNorm
from kpconv_tf.blocks import UnaryConv, leaky_relu, make_block, normalization, unit_variables
from kpconv_tf.config import NETWORK_MODELS, Config
from kpconv_tf.initializers import OriginalTruncatedNormal
from kpconv_tf.inputs import BATCH_INDEX, FEATURES, input_spec, layer_keys


class _ConfiguredNetwork(keras.Model):
    """Serialisation shared by the networks: the config tree is the whole constructor state, and
    building runs the network once on a tiny dummy batch so every block creates its variables."""

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(Config.from_dict(config["config"]), name=config.get("name"))

    def output_loss(self, labels, logits, inputs=None):
        """Mean softmax cross-entropy over the rows of ``logits`` (clouds or points); rows labelled
        < 0 (ignored classes, as the original drops them) are left out."""
        labels = tf.cast(labels, tf.int32)
        valid = labels >= 0
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=logits)
        return tf.math.divide_no_nan(
            tf.reduce_sum(tf.where(valid, losses, 0.0)), tf.reduce_sum(tf.cast(valid, tf.float32))
        )

    def _build_blocks(self, network):
        """``self.encoder`` and ``self.decoder`` (lists of blocks) from the architecture parse."""
        specs = block_specs(self.config)
        self.encoder = [make_block(s, self.config, network) for s in specs if not s.decoder]
        self.decoder = [make_block(s, self.config, network) for s in specs if s.decoder]

    def use_standard_ops(self):
        """Runs every block and norm on standard TF ops only (no ``Kpconv*`` op in the graph)."""
        for _, block in self.blocks_with_specs():
            block.use_standard_ops()
        for layer in vars(self).values():
            if isinstance(layer, BatchNorm):
                layer.implementation = "standard"

    def blocks_with_specs(self):
        """[(BlockSpec, block)] of every block in call order, the encoder's first."""
        return list(zip(block_specs(self.config), self.encoder + self.decoder))

    def run_blocks(self, inputs, training=False):
        """(features entering the head, [each block's output] in call order).

        After each upsample block the decoder concatenates the features that entered the encoder
        block ending the layer it reaches (the original's skip list ``F``)."""
        features = inputs[FEATURES]
        outputs, skips = [], []
        for spec, block in self.blocks_with_specs():
            if not spec.decoder and spec.kind in LAYER_ENDING_KINDS:
                skips.append(features)
            features = block(features, inputs, training=training)
            outputs.append(features)
            if spec.concat_skip is not None:
                features = tf.concat([features, skips[spec.concat_skip]], axis=1)
        return features, outputs

    def deformation_statistics(self):
        """{block key: (mean offset norm in extents, share of lost kernel points)} of the last
        forward pass, one entry per block with a deformable KPConv (keys: ``deformable_keys``);
        {} before any call."""
        return {
            spec.key: conv.deformation_statistics
            for spec, block in self.blocks_with_specs()
            for conv in block.kpconvs()
            if conv.deformation_statistics is not None
        }

    def _encoder_decoder_variables(self):
        return {
            f"KernelPointNetwork/{spec.scope}/{name}": variable
            for spec, block in self.blocks_with_specs()
            for name, variable in block.original_variables().items()
        }

    def get_build_config(self):
        return {"built": True}

    def build_from_config(self, build_config):
        self(dummy_inputs(self.config), training=False)

    @property
    def _default_save_signature(self):
        # Keras would trace call() with float32 specs for every input, but the input dict mixes
        # float32 points and int32 indices: exports declare their signatures (kpconv_tf.export).
        return None


@keras.saving.register_keras_serializable(package="kpconv_tf")
class KPCNN(_ConfiguredNetwork):
    """KP-CNN classifier. Call with the input dict; returns float32 logits [B, num_classes]."""

    def __init__(self, config: Config, **kwargs):
        super().__init__(**kwargs)
        if not config.model.architecture or "global_average" not in config.model.architecture:
            raise ValueError("config.model.architecture must end its encoder with 'global_average'")
        num_classes = config.dataset.num_classes
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"config.dataset.num_classes must be an integer >= 2, got {num_classes!r}")
        self.config = config
        self._build_blocks("kpcnn")
        m = config.model
        self.fc = UnaryConv(1024, name="fc")
        self.fc_norm = normalization(m.use_batch_norm, m.batch_norm_momentum, "fc_norm", m.sync_batch_norm)
        self.dropout_rate = config.model.dropout
        self.classifier = UnaryConv(num_classes, name="softmax")
        self.classifier_bias = None

    def build(self, inputs_shape=None):
        if self.classifier_bias is None:
            self.classifier_bias = self.add_weight(
                name="bias", shape=(self.classifier.filters,), initializer="zeros"
            )

    def encode(self, inputs, training=False):
        """Per-block outputs of the encoder; the last is the [B, D] global average."""
        return self.run_blocks(inputs, training)[1]

    def call(self, inputs, training=False, dropout_uniform=None):
        if self.classifier_bias is None:
            self.build()
        outputs = self.encode(inputs, training=training)
        x = leaky_relu(self.fc_norm(self.fc(outputs[-1]), training=training))
        rate = self.dropout_rate
        if training and rate > 0:
            if dropout_uniform is None:
                dropout_uniform = tf.random.uniform(tf.shape(x), dtype=x.dtype)
            # The original's tf.nn.dropout: keep where U >= rate, divide the kept units by (1 - rate).
            x = tf.where(dropout_uniform >= rate, x / (1.0 - rate), tf.zeros_like(x))
        return self.classifier(x) + self.classifier_bias

    def original_variables(self):
        """{original variable name: variable}, e.g. ``KernelPointNetwork/layer_0/simple_0/weights``."""
        out = self._encoder_decoder_variables()
        out.update(unit_variables("KernelPointNetwork/fc/", self.fc, self.fc_norm))
        out["KernelPointNetwork/softmax/weights"] = self.classifier.kernel
        out["KernelPointNetwork/softmax/bias"] = self.classifier_bias
        return out


def deformable_keys(network):
    """The keys of ``network.deformation_statistics()`` of a built network, in call order ([] for a
    network without KPConv blocks: the statistics are an optional part of the training protocol)."""
    if not hasattr(network, "blocks_with_specs"):
        return []
    return [
        spec.key
        for spec, block in network.blocks_with_specs()
        if any(conv.deformable for conv in block.kpconvs())
    ]


@keras.saving.register_keras_serializable(package="kpconv_tf")
class KPFCNN(_ConfiguredNetwork):
    """KP-FCNN segmentation network: per-point logits float32 [N_0, num_classes]."""

    def __init__(self, config: Config, **kwargs):
        super().__init__(**kwargs)
        if not any(spec.decoder for spec in block_specs(config)):
            raise ValueError("config.model.architecture needs a decoder (blocks from '*_upsample' on)")
        num_classes = config.dataset.num_classes
        self.multi_head = config.model.network_model == "multi_segmentation"
        if self.multi_head:
            if not isinstance(num_classes, list) or not num_classes or min(num_classes) < 1:
                raise ValueError(
                    "multi_segmentation needs config.dataset.num_classes = list of part counts "
                    f"per object category, got {num_classes!r}"
                )
        elif not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"config.dataset.num_classes must be an integer >= 2, got {num_classes!r}")
        self.config = config
        m = config.model
        self._build_blocks("kpfcnn")
        # Multi-head (ShapeNetPart): one head per object category, as the original's
        # multi_segmentation_head: a shared unary to n_categories * first_features_dim, then per
        # category a linear map to max(num_classes) part logits; each point uses its cloud's head.
        heads = len(num_classes) if self.multi_head else 1
        self.head = UnaryConv(heads * m.first_features_dim, name="head_unary_conv")
        self.head_norm = normalization(
            m.use_batch_norm, m.batch_norm_momentum, "head_norm", m.sync_batch_norm
        )
        self.classifier = None if self.multi_head else UnaryConv(num_classes, name="softmax")
        self.num_outputs = max(num_classes) if self.multi_head else num_classes
        self.classifier_bias = None

    def build(self, inputs_shape=None):
        if self.classifier_bias is None:
            if self.multi_head:
                self.multi_weights = self.add_weight(
                    name="weights",
                    initializer=OriginalTruncatedNormal(),
                    shape=(
                        len(self.config.dataset.num_classes),
                        self.config.model.first_features_dim,
                        self.num_outputs,
                    ),
                )
            self.classifier_bias = self.add_weight(
                name="bias", shape=(self.num_outputs,), initializer="zeros"
            )

    def _multi_head_logits(self, x, inputs):
        heads = len(self.config.dataset.num_classes)
        x = tf.transpose(tf.reshape(x, [-1, heads, self.config.model.first_features_dim]), [1, 0, 2])
        all_logits = tf.matmul(x, self.multi_weights) + self.classifier_bias  # [heads, N, C]
        point_category = tf.gather(inputs["object_labels"], inputs[BATCH_INDEX])
        return tf.gather_nd(all_logits, tf.stack([point_category, tf.range(tf.shape(point_category)[0])], 1))

    def call(self, inputs, training=False):
        if self.classifier_bias is None:
            self.build()
        features, _ = self.run_blocks(inputs, training)
        x = leaky_relu(self.head_norm(self.head(features), training=training))
        if self.multi_head:
            return self._multi_head_logits(x, inputs)
        return self.classifier(x) + self.classifier_bias

    def original_variables(self):
        """{original variable name: variable}, e.g. ``KernelPointNetwork/uplayer_1/unary_0/weights``."""
        out = self._encoder_decoder_variables()
        out.update(unit_variables("KernelPointNetwork/head_unary_conv/", self.head, self.head_norm))
        out["KernelPointNetwork/softmax/weights"] = (
            self.multi_weights if self.multi_head else self.classifier.kernel
        )
        out["KernelPointNetwork/softmax/bias"] = self.classifier_bias
        return out


def dummy_inputs(config: Config, points_per_layer=4):
    """A tiny valid input dict (one cloud of n points in every layer, the keys of input_spec, plus
    object_labels [1] for multi-head networks) that builds all variables of a model."""
    n = points_per_layer
    inputs = {FEATURES: tf.ones([n, config.dataset.in_features_dim]), BATCH_INDEX: tf.zeros([n], tf.int32)}
    for l in range(len(layer_specs(config.model))):
        keys = layer_keys(l)
        inputs[keys.points] = tf.random.stateless_uniform([n, 3], seed=[l, 0]) * 0.01
        inputs[keys.lengths] = tf.constant([n], tf.int32)
    # The remaining keys are neighbour indices: every point neighbours every point.
    for key in input_spec(config):
        inputs.setdefault(key, tf.tile(tf.range(n)[None], [n, 1]))
    inputs["object_labels"] = tf.zeros([1], tf.int32)
    return inputs


def build_network(config: Config):
    """KPCNN for ``model.network_model`` 'classification' (or unset), KPFCNN for the segmentation
    models (``kpconv_tf.config.NETWORK_MODELS``); its variables created on dummy inputs."""
    kind = config.model.network_model
    if kind in ("classification", ""):
        network = KPCNN(config)
    elif kind in NETWORK_MODELS:
        network = KPFCNN(config)
    else:
        raise ValueError(f"model.network_model must be one of {list(NETWORK_MODELS)}, got {kind!r}")
    network(dummy_inputs(config), training=False)
    return network
