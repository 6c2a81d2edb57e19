"""One training step of KP-CNN / KP-FCNN, with the original trainer's or the paper's semantics.

``train.semantics`` selects how the gradients reach the weights (fixture README section 10):

* ``original`` reproduces ``utils/trainer.py`` of the TF1 release step for step: TF1 Momentum
  (``accum = m * accum + g; var -= lr * accum``), every update entry clipped by norm on its own,
  and every offset-convolution variable updated twice per step, once with ``0.1 * g`` and once
  with ``g``, both through the same momentum slot. The order of the two updates is not defined by
  the original program; we use the order its runs showed most of the time (README 10.4): weights
  take ``g`` first, biases take ``0.1 * g`` first.
* ``paper`` applies the paper's intent: offset-convolution gradients scaled by 0.1, once.

Both use the same loss: ``total = ((offsets + gaussian) + l2) + output`` in float32, the grouping
of the original graph, where ``l2 = weights_decay * sum(l2_loss(v))`` over the variables whose name
contains ``weights``. Batch-norm moving statistics are updated by the forward pass (Keras does it in
training mode) from the batch statistics, hence before any weight update, as in the original.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kpconv_tf.metrics import ConfusionMeanIoU
from kpconv_tf.models import deformable_keys

OFFSET_GRADIENT_SCALE = 0.1
SEMANTICS = ("original", "paper")


def is_offset_variable(variable):
    """True for the offset variables of deformable KPConvs (scaled gradients): the offset
    convolution (``offset_conv_*``) and the MLP offsets of the inception blocks (``offset_mlp_*``)."""
    path = _variable_path(variable)
    return "offset_conv" in path or "offset_mlp" in path


def _variable_path(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.split(":")[0]  # tf.Variable names end with ":0"


def update_entries(
    gradients, variables, semantics="original", clip_norm=100.0, offset_scale=OFFSET_GRADIENT_SCALE
):
    """Turns raw gradients into the ordered list of momentum updates of one step.

    Args:
        gradients: list of float32 tensors (``None`` for variables without gradient), one per
            variable.
        variables: the matching variables (only their names are read).
        semantics: ``"original"`` or ``"paper"`` (module docstring).
        clip_norm: per-entry clipping norm; ``<= 0`` disables clipping. As in the original
            trainer, ``original`` semantics without clipping apply the raw gradients once.
        offset_scale: the factor of the offset variables' scaled entries (``train.offset_lr_factor``).

    Returns:
        list of ``(variable_index, update)`` in application order, each update clipped on its own
        with ``tf.clip_by_norm`` (``t * c / max(|t|, c)``).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if len(gradients) != len(variables):
        raise ValueError(f"gradients and variables differ in length: {len(gradients)} != {len(variables)}")
    clip = clip_norm is not None and clip_norm > 0
    scale = tf.constant(offset_scale, tf.float32)
    entries = []
    for index, (grad, variable) in enumerate(zip(gradients, variables)):
        if grad is None:
            continue
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
        if not is_offset_variable(variable):
            parts = [grad]
        elif semantics == "paper":
            parts = [scale * grad]
        elif not clip:
            parts = [grad]  # the original only duplicates offset entries in its clipping branch
        elif "offset_mlp" in _variable_path(variable):
            parts = [scale * grad]  # its if-chain gives MLP offsets the scaled entry only
        elif _variable_path(variable).endswith("bias"):
            parts = [scale * grad, grad]
        else:
            parts = [grad, scale * grad]
        for part in parts:
            entries.append((index, tf.clip_by_norm(part, clip_norm) if clip else part))
    return entries


class OriginalMomentum(tf.Module):
    """TF1 ``MomentumOptimizer`` state and update, trackable by ``tf.train.Checkpoint``.

    ``learning_rate`` is a float32 variable (callbacks decay it per epoch); ``slots[i]`` is the
    accumulator of ``variables[i]``; ``iterations`` counts applied steps. Updates use the
    ``ResourceApplyMomentum`` kernel, the op the original trainer ran (``use_nesterov=False``), so
    ``accum = m * accum + g; var -= lr * accum`` holds in float32 exactly, also after the learning
    rate changes (unlike Keras SGD, whose slot stores ``-lr * g`` sums).
    """

    def __init__(self, variables, learning_rate, momentum, name="original_momentum"):
        super().__init__(name=name)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if float(learning_rate) <= 0.0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.momentum = float(momentum)
        self.learning_rate = tf.Variable(np.float32(learning_rate), trainable=False, name="learning_rate")
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self.slots = [
            tf.Variable(
                tf.zeros(v.shape, tf.float32),
                trainable=False,
                name=_variable_path(v).replace("/", "_") + "_momentum",
            )
            for v in variables
        ]
        self._num_variables = len(self.slots)

    def apply(self, entries, variables):
        """Applies ``(variable_index, update)`` entries in order; a variable may appear twice."""
        if len(variables) != self._num_variables:
            raise ValueError(f"variables: expected {self._num_variables}, got {len(variables)}")
        momentum = tf.constant(self.momentum, tf.float32)
        learning_rate = self.learning_rate.read_value()
        for index, update in entries:
            tf.raw_ops.ResourceApplyMomentum(
                var=variables[index].handle,
                accum=self.slots[index].handle,
                lr=learning_rate,
                grad=tf.cast(update, tf.float32),
                momentum=momentum,
                use_locking=False,
                use_nesterov=False,
            )
        self.iterations.assign_add(1)

    def reset(self):
        """Sets every slot to zero (the state of a fresh original trainer)."""
        for slot in self.slots:
            slot.assign(tf.zeros_like(slot))


def l2_regularization(variables, weights_decay):
    """``weights_decay * sum(l2_loss(v))`` over the variables whose name contains ``weights``.

    This is the original's L2 term (``tf.nn.l2_loss = sum(x**2) / 2``); it includes the
    offset-convolution weights and the softmax weights, never biases or batch-norm variables.
    """
    terms = [tf.nn.l2_loss(v) for v in variables if "weights" in _variable_path(v).split("/")[-1]]
    if not terms:
        return tf.constant(0.0, tf.float32)
    return tf.constant(weights_decay, tf.float32) * tf.add_n(terms)


def _input_spec(value):
    """Batch-size-free TensorSpec: the leading (and neighbour-width) dims vary between batches."""
    value = tf.convert_to_tensor(value)
    if value.dtype.is_floating and value.shape.rank == 2:
        shape = [None, value.shape[1]]  # point / feature widths are static, as the layers need
    else:
        shape = [None] * value.shape.rank
    return tf.TensorSpec(shape, value.dtype)


class TrainStep:
    """One training step of ``network`` under ``config`` (see ``make_train_step``).

    Attributes:
        network: the Keras network (KPCNN / KPFCNN).
        variables: ``network.trainable_variables`` in creation order.
        optimizer: ``OriginalMomentum`` (learning-rate variable, slots, iteration counter).
    """

    def __init__(self, network, config, optimizer=None):
        semantics = config.train.semantics
        if semantics not in SEMANTICS:
            raise ValueError(f"config.train.semantics must be one of {SEMANTICS}, got {semantics!r}")
        if not network.built:
            raise ValueError("network: build it first (call it once on a batch in inference mode)")
        self.network = network
        self.config = config
        self.semantics = semantics
        self.variables = list(network.trainable_variables)
        self.optimizer = optimizer or OriginalMomentum(
            self.variables, config.train.learning_rate, config.train.momentum
        )
        self._compiled = {}

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    def losses(self, inputs, labels, logits):
        """Loss terms of one forward pass, ``total_loss`` in the original's float32 grouping."""
        train = self.config.train
        output_loss = self.network.output_loss(labels, logits, inputs)
        regularization_loss = l2_regularization(self.network.variables, train.weights_decay)
        offsets_loss = tf.add_n(self.network.losses) if self.network.losses else tf.constant(0.0)
        gaussian_loss = tf.constant(0.0, tf.float32)  # the original has no 'kernel_extents' variables
        total_loss = ((offsets_loss + gaussian_loss) + regularization_loss) + output_loss
        result = {
            "output_loss": output_loss,
            "regularization_loss": regularization_loss,
            "offsets_loss": offsets_loss,
            "gaussian_loss": gaussian_loss,
            "total_loss": total_loss,
        }
        statistics = getattr(self.network, "deformation_statistics", dict)()  # optional in the protocol
        for key, (offset_norm, lost_share) in statistics.items():
            result[f"offset_norm_{key}"] = offset_norm
            result[f"lost_share_{key}"] = lost_share
        return result

    def forward(self, inputs, training, dropout_uniform=None):
        if dropout_uniform is None:
            return self.network(inputs, training=training)
        return self.network(inputs, training=training, dropout_uniform=dropout_uniform)

    def run(self, inputs, labels, dropout_uniform=None):
        """The step as plain TF code (trace it, or call it eagerly); returns the result dict."""
        with tf.GradientTape() as tape:
            logits = self.forward(inputs, True, dropout_uniform)
            result = self.losses(inputs, labels, logits)
        gradients = tape.gradient(result["total_loss"], self.variables)
        entries = update_entries(
            gradients,
            self.variables,
            self.semantics,
            self.config.train.grad_clip_norm,
            self.config.train.offset_lr_factor,
        )
        result["learning_rate"] = self.optimizer.learning_rate.read_value()
        self.optimizer.apply(entries, self.variables)
        result["accuracy"] = accuracy(labels, logits)
        result["grad_norms"] = tf.stack(
            [tf.norm(g) if g is not None else tf.constant(0.0) for g in gradients]
        )
        result["logits"] = logits
        return result

    def __call__(self, inputs, labels, dropout_uniform=None):
        """Runs one step (compiled once per input structure); returns a dict of tensors."""
        key = (tuple(sorted(inputs)), dropout_uniform is None)
        if key not in self._compiled:
            specs = ({k: _input_spec(v) for k, v in inputs.items()}, _input_spec(labels))
            if dropout_uniform is None:
                self._compiled[key] = tf.function(lambda x, y: self.run(x, y), input_signature=specs)
            else:
                specs += (tf.TensorSpec([None, None], tf.float32),)
                self._compiled[key] = tf.function(self.run, input_signature=specs)
        args = (inputs, labels) if dropout_uniform is None else (inputs, labels, dropout_uniform)
        return self._compiled[key](*args)


def accuracy(labels, logits):
    """Fraction of labels equal to ``argmax(logits)`` (float32); labels < 0 (ignored) are left out."""
    labels = tf.cast(labels, tf.int32)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    valid = labels >= 0
    correct = tf.logical_and(valid, tf.equal(predictions, labels))
    return tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(correct, tf.float32)), tf.reduce_sum(tf.cast(valid, tf.float32))
    )


def deformation_metric_names(network):
    """Per deformable KPConv: ``offset_norm_<key>`` (mean offset norm in extents) and
    ``lost_share_<key>`` (share of kernel points with no input point within the extent)."""
    return [f"{kind}_{key}" for key in deformable_keys(network) for kind in ("offset_norm", "lost_share")]


def make_train_step(network, config, optimizer=None):
    """Returns ``step(inputs, labels, dropout_uniform=None) -> dict`` for one training step.

    The dict holds ``output_loss``, ``regularization_loss``, ``offsets_loss``, ``gaussian_loss``,
    ``total_loss``, ``accuracy`` (of this step's forward pass, before the update), ``learning_rate``,
    ``grad_norms`` [V] (raw gradient norms per trainable variable) and ``logits``.
    ``dropout_uniform`` [B, 1024] float32 replaces the head's random dropout draw (replay).
    ``step.optimizer`` holds the learning-rate variable and the momentum slots.
    """
    return TrainStep(network, config, optimizer)


class TrainingModel(keras.Model):
    """Wraps a network so that ``fit`` / ``evaluate`` run ``TrainStep`` and the original losses.

    ``fit`` data: ``(inputs, labels)`` tuples (extra tuple elements are ignored). ``train_step``
    runs ``TrainStep.run`` (weights updated by ``OriginalMomentum``, not by a Keras optimizer);
    ``test_step`` computes the same losses in inference mode and the accuracy. Logged metrics are
    epoch means: ``loss`` (total), ``output_loss``, ``regularization_loss``, ``offsets_loss``,
    ``accuracy``, the deformation diagnostics (``deformation_metric_names``), plus
    ``learning_rate`` (last value). Compile with ``compile()`` (no arguments).
    ``training_model.learning_rate`` is the variable callbacks decay; ``training.train.checkpoint_for``
    saves the network variables, the slots, the learning rate and the iteration count (exact resume).
    """

    def __init__(self, network, config, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.config = config
        self.step = make_train_step(network, config)
        self.momentum_optimizer = self.step.optimizer
        names = ["loss", "output_loss", "regularization_loss", "offsets_loss", "accuracy"]
        names += deformation_metric_names(network)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in names}
        num_classes = config.dataset.num_classes
        # Validation mIoU of single-head segmentation (multi-head logits differ in width per object).
        self._miou = (
            ConfusionMeanIoU(num_classes)
            if config.model.network_model == "segmentation" and isinstance(num_classes, int)
            else None
        )

    @property
    def learning_rate(self):
        return self.step.optimizer.learning_rate

    @property
    def metrics(self):
        return list(self._trackers.values()) + ([self._miou] if self._miou is not None else [])

    def compile(self, **kwargs):
        kwargs.setdefault("optimizer", None)
        kwargs.setdefault("jit_compile", False)  # the custom ops and raw momentum ops have no XLA kernels
        super().compile(**kwargs)

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _log(self, result):
        for name, tracker in self._trackers.items():
            tracker.update_state(result["total_loss" if name == "loss" else name])
        logs = {name: tracker.result() for name, tracker in self._trackers.items()}
        logs["learning_rate"] = self.learning_rate.read_value()
        return logs

    def _dropout_uniform(self, labels):
        """Seeded head-dropout draw of this step (``(train.seed, iteration)``), so that a resumed run
        repeats the draws of an uninterrupted one; None for networks without a dropout head."""
        fc = getattr(self.network, "fc", None)
        if fc is None or not getattr(self.network, "dropout_rate", 0):
            return None
        seed = tf.stack([tf.constant(self.config.train.seed, tf.int64), self.step.optimizer.iterations])
        return tf.random.stateless_uniform([tf.shape(labels)[0], fc.filters], seed)

    def train_step(self, data):
        inputs, labels = data[0], data[1]
        return self._log(self.step.run(inputs, labels, self._dropout_uniform(labels)))

    def test_step(self, data):
        inputs, labels = data[0], data[1]
        logits = self.network(inputs, training=False)
        result = self.step.losses(inputs, labels, logits)
        result["accuracy"] = accuracy(labels, logits)
        logs = self._log(result)
        if self._miou is not None:
            self._miou.update_state(labels, logits)
            logs["mean_iou"] = self._miou.result()
        return logs
