"""One training step of KP-CNN / KP-FCNN, with the original trainer's or the paper's semantics.

``train.semantics`` selects how the gradients reach the weights (fixture README section 10):

* ``original`` reproduces ``utils/trainer.py`` of the TF1 release step for step: TF1 Momentum
  (``accum = m * accum + g; var -= lr * accum``), every update entry clipped by norm on its own,
  and every offset-convolution variable updated twice per step, once with ``0.1 * g`` and once
  with ``g``, both through the same momentum slot. The order of the two updates is not defined by
  the original program; we use the order its runs showed most of the time (README 10.4): weights
  take ``g`` first, biases take ``0.1 * g`` first.
  The update is ``OriginalMomentum``, a Keras optimizer (``train.optimizer: original_momentum``).
* ``paper`` applies the paper's intent: offset-convolution gradients scaled by 0.1, once, and each
  gradient clipped by norm on its own (``train.grad_clip_norm``, unless the optimizer has its own
  ``clipnorm`` / ``global_clipnorm`` / ``clipvalue``), with any Keras optimizer.

Both use the same loss: ``total = ((offsets + gaussian) + l2) + output`` in float32, the grouping
of the original graph, where ``l2 = weights_decay * sum(l2_loss(v))`` over the variables whose name
contains ``weights``. Batch-norm moving statistics are updated by the forward pass (Keras does it in
training mode) from the batch statistics, hence before any weight update, as in the original.

Under a ``tf.distribute`` strategy with R > 1 replicas (``training.distribute``) each replica holds
whole stacked batches of its own and the step is the one of the global batch (their union):

* the output loss is the mean over all labelled rows of all replicas (clouds for classification,
  points for segmentation): replica r contributes ``mean_r * n_r / sum(n)`` (its row count n_r,
  all-reduced), so replicas of very different sizes weigh as their rows;
* the L2 term is the same on every replica and each contributes ``l2 / R``: it counts once;
* the offsets loss (a mean over each deformable layer's queries) contributes ``offsets_r / R``: the
  mean of the replicas' terms, equal to the one of the union when the replicas hold equally many
  queries per layer, else weighted by replica rather than by query;
* the gradients are summed over the replicas (all-reduce), then scaled and clipped as on one device
  (``original``: per entry, by ``OriginalMomentum``; ``paper``: ``paper_gradients``), so clipping
  sees the global gradient. Batch statistics are per replica unless ``model.sync_batch_norm``.

Every replica logs the values of the global batch (all-reduced in the step: the offsets loss and
the deformation diagnostics as means over replicas), and Keras reports those of the first replica.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kpconv_tf.config import ORIGINAL_OPTIMIZER, SEMANTICS
from kpconv_tf.metrics import ConfusionMeanIoU
from kpconv_tf.models import deformable_keys
from training.distribute import num_workers

OFFSET_GRADIENT_SCALE = 0.1


def is_offset_variable(variable):
    """True for the offset variables of deformable KPConvs (scaled gradients): the offset
    convolution (``offset_conv_*``) and the MLP offsets of the inception blocks (``offset_mlp_*``)."""
    return _is_offset_path(_variable_path(variable))


def _is_offset_path(path):
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
    entries = []
    for index, (grad, variable) in enumerate(zip(gradients, variables)):
        if grad is not None:
            parts = entry_parts(grad, _variable_path(variable), semantics, clip_norm, offset_scale)
            entries.extend((index, part) for part in parts)
    return entries


def entry_parts(grad, path, semantics, clip_norm, offset_scale=OFFSET_GRADIENT_SCALE):
    """The update entries of one variable (path ``path``), in order (``update_entries``)."""
    clip = clip_norm is not None and clip_norm > 0
    scale = tf.constant(offset_scale, tf.float32)
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    if not _is_offset_path(path):
        parts = [grad]
    elif semantics == "paper":
        parts = [scale * grad]
    elif not clip:
        parts = [grad]  # the original only duplicates offset entries in its clipping branch
    elif "offset_mlp" in path:
        parts = [scale * grad]  # its if-chain gives MLP offsets the scaled entry only
    elif path.endswith("bias"):
        parts = [scale * grad, grad]
    else:
        parts = [grad, scale * grad]
    return [tf.clip_by_norm(part, clip_norm) if clip else part for part in parts]


def paper_gradients(gradients, variables, clip_norm, offset_scale=OFFSET_GRADIENT_SCALE):
    """``paper`` semantics as a gradient transform for any optimizer: the offset variables'
    gradients x ``offset_scale``, then each clipped by norm on its own (``clip_norm <= 0``: not)."""
    return [
        None if g is None else entry_parts(g, _variable_path(v), "paper", clip_norm, offset_scale)[0]
        for g, v in zip(gradients, variables)
    ]


class OriginalMomentum(keras.optimizers.Optimizer):
    """The original trainer's update as a Keras optimizer (TensorFlow backend).

    TF1 ``MomentumOptimizer``: the ``ResourceApplyMomentum`` kernel the original ran
    (``use_nesterov=False``), so ``accum = m * accum + g; var -= lr * accum`` holds in float32
    exactly, also after the learning rate changes (unlike Keras SGD, whose slot stores ``-lr * g``
    sums). With ``clip_norm > 0`` each update entry is clipped by norm on its own and every offset
    variable is updated twice through its slot (``update_entries``, ``original`` semantics); with
    ``clip_norm <= 0`` the raw gradients are applied once, as the original without clipping (the
    ``paper`` step passes gradients it scaled and clipped itself).

    ``learning_rate``: a float (a variable, assignable) or a ``LearningRateSchedule``;
    ``slots[i]`` is the accumulator of the i-th variable of ``build``; ``iterations`` counts steps.
    """

    def __init__(
        self,
        learning_rate=1e-4,
        momentum=0.9,
        clip_norm=0.0,
        offset_scale=OFFSET_GRADIENT_SCALE,
        name=ORIGINAL_OPTIMIZER,
        **kwargs,
    ):
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not callable(learning_rate):
            if float(learning_rate) <= 0.0:
                raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
            learning_rate = float(learning_rate)  # Keras takes Python floats only (not np.float32)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.clip_norm = float(clip_norm)
        self.offset_scale = float(offset_scale)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.slots = [self.add_variable_from_reference(v, "momentum") for v in variables]
        # update_step sees the backend tf.Variables, whose names lack the layer path
        self._paths = [_variable_path(v) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        slot = self.slots[index].value
        learning_rate = tf.cast(learning_rate, tf.float32)
        momentum = tf.constant(self.momentum, tf.float32)
        for part in entry_parts(gradient, self._paths[index], "original", self.clip_norm, self.offset_scale):
            tf.raw_ops.ResourceApplyMomentum(
                var=variable.handle,
                accum=slot.handle,
                lr=learning_rate,
                grad=tf.cast(part, tf.float32),
                momentum=momentum,
                use_locking=False,
                use_nesterov=False,
            )

    def reset(self):
        """Sets every slot to zero (the state of a fresh original trainer)."""
        for slot in self.slots:
            slot.assign(tf.zeros_like(slot))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, clip_norm=self.clip_norm, offset_scale=self.offset_scale)
        return config


class EpochDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The original's per-epoch learning rate as a function of the step.

    ``decays`` ``{epoch: factor}``: ``lr *= factor`` at the end of epoch ``epoch`` counted from 0
    (the original's ``lr_decays``); the rate of step s is that of epoch ``s // steps_per_epoch``,
    the products taken in float32 in epoch order (TF1's ``assign(lr * factor)``, bitwise).
    """

    def __init__(self, initial_learning_rate, steps_per_epoch, decays):
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decays = {int(k): float(v) for k, v in decays.items()}
        rates = [np.float32(self.initial_learning_rate)]
        for epoch in range(max(self.decays, default=-1) + 1):
            rates.append(np.float32(rates[-1] * np.float32(self.decays.get(epoch, 1.0))))
        self._rates = np.array(rates, np.float32)  # rate of epoch e; the last holds for every later one

    def __call__(self, step):
        epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
        return tf.gather(tf.constant(self._rates), tf.minimum(epoch, len(self._rates) - 1))

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "decays": self.decays,
        }


def make_optimizer(config, steps_per_epoch=None):
    """The optimizer of ``config.train.optimizer``: ``OriginalMomentum`` or any Keras optimizer.

    Its learning rate is ``train.learning_rate`` decayed per epoch (``EpochDecay`` of
    ``train.decays()``) when ``steps_per_epoch`` is given and a decay is configured, else a constant
    (an assignable variable). ``original_momentum`` clips per entry by ``train.grad_clip_norm`` under
    ``original`` semantics; under ``paper`` the train step scales and clips (``paper_gradients``).
    """
    train = config.train
    options = {} if isinstance(train.optimizer, str) else dict(train.optimizer)
    name = options.pop("name", train.optimizer if isinstance(train.optimizer, str) else None)
    decays = train.decays()
    learning_rate = (
        EpochDecay(train.learning_rate, steps_per_epoch, decays)
        if steps_per_epoch and decays
        else float(train.learning_rate)
    )
    options.setdefault("learning_rate", learning_rate)
    if name == ORIGINAL_OPTIMIZER:
        options.setdefault("momentum", train.momentum)
        options.setdefault("offset_scale", train.offset_lr_factor)
        options.setdefault("clip_norm", train.grad_clip_norm if train.semantics == "original" else 0.0)
        return OriginalMomentum(**options)
    if name.lower() == "sgd":
        options.setdefault("momentum", train.momentum)
    return keras.optimizers.get({"class_name": name, "config": options})


def _offsets_loss(network):
    """The offsets loss of the network's last forward pass: the sum of the terms its deformable
    KPConvs added (``network.losses``, each already x ``offsets_decay``); 0 for a rigid network."""
    return tf.add_n(network.losses) if network.losses else tf.constant(0.0)


def l2_regularization(variables, weights_decay):
    """``weights_decay * sum(l2_loss(v))`` over the variables whose name contains ``weights``.

    This is the original's L2 term (``tf.nn.l2_loss = sum(x**2) / 2``); it includes the
    offset-convolution weights and the softmax weights, never biases or batch-norm variables.
    """
    terms = [tf.nn.l2_loss(v) for v in variables if "weights" in _variable_path(v).split("/")[-1]]
    if not terms:
        return tf.constant(0.0, tf.float32)
    return tf.constant(weights_decay, tf.float32) * tf.add_n(terms)


def batch_free_spec(value):
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
        optimizer: a built Keras optimizer (default ``make_optimizer(config)``: constant learning rate).
    """

    def __init__(self, network, config, optimizer=None):
        semantics = config.train.semantics
        if semantics not in SEMANTICS:
            raise ValueError(f"config.train.semantics must be one of {SEMANTICS}, got {semantics!r}")
        if not network.built:
            raise ValueError("network: build it first (call it once on a batch in inference mode)")
        optimizer = optimizer or make_optimizer(config)
        if semantics == "original" and not isinstance(optimizer, OriginalMomentum):
            raise ValueError(
                f"train.semantics 'original' needs OriginalMomentum (its offset double update is a "
                f"momentum update), got {type(optimizer).__name__}: use semantics 'paper'"
            )
        self.network = network
        self.config = config
        self.semantics = semantics
        self.variables = list(network.trainable_variables)
        self.optimizer = optimizer
        self.optimizer.build(self.variables)
        # paper: per-variable clipping by train.grad_clip_norm unless the optimizer clips itself
        own_clip = any(getattr(optimizer, k, None) for k in ("clipnorm", "global_clipnorm", "clipvalue"))
        self._paper_clip = 0.0 if own_clip else config.train.grad_clip_norm
        self._compiled = {}

    @property
    def learning_rate(self):
        """The optimizer's learning rate: its variable, or the schedule's value at this step."""
        return self.optimizer.learning_rate

    def losses(self, inputs, labels, logits):
        """Loss terms of one forward pass, ``total_loss`` in the original's float32 grouping.

        Under R > 1 replicas (module docstring) ``replica_loss`` is this replica's share of the
        global loss (its gradients summed over replicas are the global loss's) and the other terms
        are the global batch's, the same on every replica.
        """
        train = self.config.train
        output_loss = self.network.output_loss(labels, logits, inputs)
        regularization_loss = l2_regularization(self.network.variables, train.weights_decay)
        offsets_loss = _offsets_loss(self.network)
        gaussian_loss = tf.constant(0.0, tf.float32)  # the original has no 'kernel_extents' variables
        statistics = getattr(self.network, "deformation_statistics", dict)()  # optional in the protocol
        diagnostics = {}
        for key, (offset_norm, lost_share) in statistics.items():
            diagnostics[f"offset_norm_{key}"] = offset_norm
            diagnostics[f"lost_share_{key}"] = lost_share
        context = replica_context()
        result = {}
        if context is not None:
            replicas = float(context.num_replicas_in_sync)
            output_part = output_loss * global_share(context, labels)
            local = (offsets_loss + gaussian_loss) + regularization_loss
            result["replica_loss"] = local / replicas + output_part
            # the logged values: those of the global batch, on every replica
            names = ["output_loss", "offsets_loss", *diagnostics]
            parts = [output_part, offsets_loss / replicas]
            parts += [value / replicas for value in diagnostics.values()]
            output_loss, offsets_loss, *means = all_reduce(context, tf.distribute.ReduceOp.SUM, parts)
            diagnostics = dict(zip(names[2:], means))
        total_loss = ((offsets_loss + gaussian_loss) + regularization_loss) + output_loss
        result.update(
            output_loss=output_loss,
            regularization_loss=regularization_loss,
            offsets_loss=offsets_loss,
            gaussian_loss=gaussian_loss,
            total_loss=total_loss,
            **diagnostics,
        )
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
        gradients = tape.gradient(result.pop("replica_loss", result["total_loss"]), self.variables)
        context = replica_context()
        if context is not None:
            gradients = _all_reduce_sum(context, gradients)
        updates = gradients
        if self.semantics == "paper":
            updates = paper_gradients(
                gradients, self.variables, self._paper_clip, self.config.train.offset_lr_factor
            )
        if context is not None:
            # Keras's apply_gradients sums over the replicas again: hand it each replica's share of
            # the (identical) reduced updates (exact for a power-of-two replica count).
            share = 1.0 / context.num_replicas_in_sync
            updates = [None if u is None else u * share for u in updates]
        result["learning_rate"] = tf.identity(self.learning_rate)
        self.optimizer.apply_gradients([(u, v) for u, v in zip(updates, self.variables) if u is not None])
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
            specs = ({k: batch_free_spec(v) for k, v in inputs.items()}, batch_free_spec(labels))
            if dropout_uniform is None:
                self._compiled[key] = tf.function(lambda x, y: self.run(x, y), input_signature=specs)
            else:
                specs += (tf.TensorSpec([None, None], tf.float32),)
                self._compiled[key] = tf.function(self.run, input_signature=specs)
        args = (inputs, labels) if dropout_uniform is None else (inputs, labels, dropout_uniform)
        return self._compiled[key](*args)


def accuracy(labels, logits):
    """Fraction of labels equal to ``argmax(logits)`` (float32); labels < 0 (ignored) are left out.

    Under R > 1 replicas: that of the global batch (all replicas' rows)."""
    labels = tf.cast(labels, tf.int32)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    valid = labels >= 0
    correct = tf.reduce_sum(tf.cast(tf.logical_and(valid, tf.equal(predictions, labels)), tf.float32))
    rows = labelled_rows(labels)
    context = replica_context()
    if context is not None:
        correct, rows = all_reduce(context, tf.distribute.ReduceOp.SUM, [correct, rows])
    return tf.math.divide_no_nan(correct, rows)


def replica_context():
    """The replica context of a ``tf.distribute`` step with more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def all_reduce(context, operation, values):
    """``context.all_reduce`` of a list of tensors or variables (read first: the strategy takes a
    variable for its own destination, and one holding zeros for none)."""
    return context.all_reduce(operation, [tf.identity(v) for v in values])


def labelled_rows(labels):
    """Rows with a label (>= 0; ignored rows are < 0), float32: what the output loss averages."""
    return tf.reduce_sum(tf.cast(tf.cast(labels, tf.int32) >= 0, tf.float32))


def global_share(context, labels):
    """This replica's labelled rows / all replicas' (0 when no replica has any)."""
    rows = labelled_rows(labels)
    return tf.math.divide_no_nan(rows, all_reduce(context, tf.distribute.ReduceOp.SUM, [rows])[0])


def _all_reduce_sum(context, gradients):
    """The gradients summed over the replicas (``None`` entries kept)."""
    present = [i for i, g in enumerate(gradients) if g is not None]
    dense = [tf.convert_to_tensor(gradients[i]) for i in present]
    reduced = all_reduce(context, tf.distribute.ReduceOp.SUM, dense) if dense else []
    out = list(gradients)
    for i, value in zip(present, reduced):
        out[i] = value
    return out


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
    ``step.optimizer`` (default: ``make_optimizer(config)``, constant learning rate) holds the
    learning-rate variable and the momentum slots.
    """
    return TrainStep(network, config, optimizer)


class TrainingModel(keras.Model):
    """Wraps a network so that ``fit`` / ``evaluate`` run ``TrainStep`` and the original losses.

    ``fit`` data: ``(inputs, labels)`` tuples (extra tuple elements are ignored). ``train_step``
    runs ``TrainStep.run`` with the compiled optimizer; ``test_step`` computes the same losses in
    inference mode and the accuracy. Logged metrics are epoch means: ``loss`` (total),
    ``output_loss``, ``regularization_loss``, ``offsets_loss``, ``accuracy``, the deformation
    diagnostics (``deformation_metric_names``), plus ``learning_rate`` (the rate of the next step).
    ``training.train.checkpoint_for`` saves the network variables and the optimizer's (slots,
    learning rate, iteration count: exact resume).
    """

    def __init__(self, network, config, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.config = config
        # the step logs the global batch's values on every replica (module docstring)
        self.distribute_reduction_method = "first"
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
    def metrics(self):
        return list(self._trackers.values()) + ([self._miou] if self._miou is not None else [])

    def compile(self, optimizer=None, **kwargs):
        """``optimizer``: a Keras optimizer or its name (``paper`` semantics apply to it); by default
        ``make_optimizer(config, train.epoch_steps)``, the one ``train.optimizer`` names."""
        if optimizer is None:
            optimizer = make_optimizer(self.config, self.config.train.epoch_steps)
        kwargs.setdefault("jit_compile", False)  # the custom ops and raw momentum ops have no XLA kernels
        super().compile(optimizer=keras.optimizers.get(optimizer), **kwargs)
        self.step = TrainStep(self.network, self.config, self.optimizer)
        self.built = True  # the network is (TrainStep checks it); this wrapper has no weights of its own

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds the model from the mean of one batch over the replicas,
        # which fails for stacked batches (replicas hold different numbers of points). Everything
        # is built by compile (network, optimizer; no compiled loss or metrics), so skip it.
        if not (self.built and self.optimizer is not None and self.optimizer.built):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _log(self, result, extra=None):
        for name, tracker in self._trackers.items():
            tracker.update_state(result["total_loss" if name == "loss" else name])
        logs = {name: tracker.result() for name, tracker in self._trackers.items()}
        logs["learning_rate"] = tf.identity(self.optimizer.learning_rate)
        logs.update(extra or {})
        if num_workers(self.distribute_strategy) > 1:
            # Keras reduces the logs of multi-worker steps with a mean over axis 0, which scalars
            # lack (tensorflow#72388); every worker's value is the global one, so any mean is it.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _dropout_uniform(self, labels):
        """Seeded head-dropout draw of this step (``(train.seed, iteration)``), so that a resumed run
        repeats the draws of an uninterrupted one; None for networks without a dropout head."""
        fc = getattr(self.network, "fc", None)
        if fc is None or not getattr(self.network, "dropout_rate", 0):
            return None
        iterations = tf.cast(self.optimizer.iterations, tf.int64)  # a Keras variable: tf.stack refuses it
        base = tf.constant(self.config.train.seed, tf.int64)
        context = replica_context()
        if context is not None:  # replicas draw apart; replica 0 draws as a single device does
            base += 1_000_003 * tf.cast(context.replica_id_in_sync_group, tf.int64)
        seed = tf.stack([base, iterations])
        return tf.random.stateless_uniform([tf.shape(labels)[0], fc.filters], seed)

    def train_step(self, data):
        inputs, labels = data[0], data[1]
        result = self.step.run(inputs, labels, self._dropout_uniform(labels))
        self._average_moving_statistics()
        return self._log(result)

    def _average_moving_statistics(self):
        """Per-replica batch norm (R > 1 replicas, ``model.sync_batch_norm`` off): each replica
        updated the moving statistics from its own batch; all take their mean, so that every
        replica (and the checkpoint) holds the same. Synchronized batch norm needs nothing."""
        context = replica_context()
        if context is None or self.config.model.sync_batch_norm:
            return
        statistics = [
            v
            for v in self.network.non_trainable_variables
            if v.path.endswith(("moving_mean", "moving_variance"))
        ]
        if statistics:
            means = all_reduce(context, tf.distribute.ReduceOp.MEAN, [v.value for v in statistics])
            for variable, mean in zip(statistics, means):
                variable.assign(mean)

    def test_step(self, data):
        inputs, labels = data[0], data[1]
        logits = self.network(inputs, training=False)
        result = self.step.losses(inputs, labels, logits)
        result["accuracy"] = accuracy(labels, logits)
        extra = {}
        if self._miou is not None:
            self._miou.update_state(labels, logits)
            confusion = tf.cast(self._miou.confusion, tf.float64)
            context = replica_context()
            if context is not None:  # the replicas' matrices summed
                confusion = all_reduce(context, tf.distribute.ReduceOp.SUM, [confusion])[0]
            extra["mean_iou"] = self._miou.of(confusion)
        return self._log(result, extra)
