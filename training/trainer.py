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

import numpy as np
import tensorflow as tf

OFFSET_GRADIENT_SCALE = 0.1
SEMANTICS = ("original", "paper")


def is_offset_variable(variable):
    """True for the offset-convolution variables of deformable KPConvs (scaled gradients)."""
    return "offset_conv" in _variable_path(variable)


def _variable_path(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.split(":")[0]  # tf.Variable names end with ":0"


def update_entries(gradients, variables, semantics="original", clip_norm=100.0):
    """Turns raw gradients into the ordered list of momentum updates of one step.

    Args:
        gradients: list of float32 tensors (``None`` for variables without gradient), one per
            variable.
        variables: the matching variables (only their names are read).
        semantics: ``"original"`` or ``"paper"`` (module docstring).
        clip_norm: per-entry clipping norm; ``<= 0`` disables clipping. As in the original
            trainer, ``original`` semantics without clipping apply the raw gradients once.

    Returns:
        list of ``(variable_index, update)`` in application order, each update clipped on its own
        with ``tf.clip_by_norm`` (``t * c / max(|t|, c)``).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if len(gradients) != len(variables):
        raise ValueError(f"gradients and variables differ in length: {len(gradients)} != {len(variables)}")
    clip = clip_norm is not None and clip_norm > 0
    scale = tf.constant(OFFSET_GRADIENT_SCALE, tf.float32)
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
            tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                        name=_variable_path(v).replace("/", "_") + "_momentum")
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
                var=variables[index].handle, accum=self.slots[index].handle, lr=learning_rate,
                grad=tf.cast(update, tf.float32), momentum=momentum, use_locking=False,
                use_nesterov=False)
        self.iterations.assign_add(1)

    def reset(self):
        """Sets every slot to zero (the state of a fresh original trainer)."""
        for slot in self.slots:
            slot.assign(tf.zeros_like(slot))
