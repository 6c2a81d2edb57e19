"""Optimizer semantics of training/trainer.py against float32 / float64 numpy emulations.

The emulated original: tf.clip_by_norm(t, c) = (t * c) / max(|t|, c); ApplyMomentum:
accum = accum * m + g; var -= lr * accum. README section 10.4 gives the offset-update table.
"""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.config import Config, ConfigError
from training.trainer import (
    OFFSET_GRADIENT_SCALE,
    EpochDecay,
    OriginalMomentum,
    TrainingModel,
    is_offset_variable,
    make_optimizer,
    make_train_step,
    paper_gradients,
    update_entries,
)

LR = np.float32(1e-3)
MOMENTUM = np.float32(0.98)


def _np_clip(t, c=100.0):
    t = np.asarray(t, np.float32)
    norm = np.sqrt(np.sum(t.astype(np.float64) ** 2))
    return ((t * np.float32(c)) / np.float32(max(norm, c))).astype(np.float32)


def _np_momentum(var, accum, grad, lr=LR, m=MOMENTUM):
    accum = (accum * m + grad).astype(np.float32)
    var = (var - lr * accum).astype(np.float32)
    return var, accum


def _vars(shapes_and_names, rng):
    return [tf.Variable(rng.normal(size=s).astype(np.float32), name=n) for s, n in shapes_and_names]


def _grad_with_norm(rng, shape, norm):
    g = rng.normal(size=shape)
    return (g * norm / np.linalg.norm(g)).astype(np.float32)


def _momentum(variables, lr=LR, momentum=MOMENTUM, clip=100.0):
    optimizer = OriginalMomentum(lr, momentum, clip_norm=clip)
    optimizer.build(variables)
    return optimizer


def _step(variables, grads, semantics, clip=100.0, optimizer=None):
    """One update as the train step does it: ``original`` clips and doubles in the optimizer,
    ``paper`` transforms the gradients and applies them once."""
    grads = [tf.constant(g) for g in grads]
    if semantics == "paper":
        grads = paper_gradients(grads, variables, clip)
        clip = 0.0
    optimizer = optimizer or _momentum(variables, clip=clip)
    optimizer.apply_gradients(zip(grads, variables))
    return optimizer


def test_offset_detection_and_entry_order():
    rng = np.random.default_rng(0)
    variables = _vars(
        [
            ((15, 4, 8), "conv2/weights"),
            ((15, 4, 45), "conv2/offset_conv_weights"),
            ((45,), "conv2/offset_conv_bias"),
            ((8,), "batch_normalization/gamma"),
        ],
        rng,
    )
    assert [is_offset_variable(v) for v in variables] == [False, True, True, False]
    grads = [tf.constant(_grad_with_norm(rng, v.shape, 5.0)) for v in variables]
    original = update_entries(grads, variables, "original", 100.0)
    assert [i for i, _ in original] == [0, 1, 1, 2, 2, 3]
    # weights: g then 0.1 g; biases: 0.1 g then g (the majority order of the original runs)
    np.testing.assert_allclose(original[1][1], grads[1], rtol=1e-6)
    np.testing.assert_allclose(original[2][1], 0.1 * grads[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(original[3][1], 0.1 * grads[2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(original[4][1], grads[2], rtol=1e-6)
    paper = update_entries(grads, variables, "paper", 100.0)
    assert [i for i, _ in paper] == [0, 1, 2, 3]
    for (i, update), g in zip(paper, grads):
        expected = g.numpy() * (OFFSET_GRADIENT_SCALE if i in (1, 2) else 1.0)
        np.testing.assert_allclose(update, expected, rtol=1e-6)
    # no clipping: the original applies the raw gradients once
    assert [i for i, _ in update_entries(grads, variables, "original", 0.0)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="semantics"):
        update_entries(grads, variables, "keras", 100.0)
    with pytest.raises(ValueError, match="length"):
        update_entries(grads[:2], variables, "paper", 100.0)


def test_paper_scale_is_one_tenth():
    rng = np.random.default_rng(1)
    variables = [
        tf.Variable(np.zeros(s, np.float32), name=n)
        for s, n in [((15, 4, 45), "offset_conv_weights"), ((45,), "offset_conv_bias")]
    ]
    initial = [v.numpy() for v in variables]
    grads = [_grad_with_norm(rng, v.shape, 7.0) for v in variables]  # unclipped
    optimizer = _step(variables, grads, "paper")
    assert OFFSET_GRADIENT_SCALE == 0.1
    for v, v0, g, slot in zip(variables, initial, grads, optimizer.slots):
        np.testing.assert_allclose(slot.numpy(), 0.1 * g, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose((v.numpy() - v0) / (-LR * g), 0.1, rtol=1e-5)


def test_clip_and_momentum_match_float32_emulation():
    rng = np.random.default_rng(2)
    shapes = [
        ((15, 8, 16), "layer_0/conv/weights"),
        ((16,), "bn/beta"),
        ((15, 8, 45), "offset_conv_weights"),
        ((45,), "offset_conv_bias"),
    ]
    variables = _vars(shapes, rng)
    state = [v.numpy() for v in variables]
    accums = [np.zeros(v.shape, np.float32) for v in variables]
    optimizer = _momentum(variables)
    for step, norms in enumerate(
        [(50.0, 300.0, 514.95, 24.24), (2000.0, 3.0, 80.0, 1500.0), (10.0, 10.0, 191.54, 10.6)]
    ):
        grads = [_grad_with_norm(rng, v.shape, n) for v, n in zip(variables, norms)]
        if step == 2:
            optimizer.learning_rate.assign(0.05)  # TF1 momentum: the new lr scales the whole slot
        lr = np.float32(0.05) if step == 2 else LR
        _step(variables, grads, "original", optimizer=optimizer)
        for i, g in enumerate(grads):
            name = shapes[i][1]
            if "offset_conv" not in name:
                parts = [g]
            elif name.endswith("bias"):
                parts = [np.float32(0.1) * g, g]
            else:
                parts = [g, np.float32(0.1) * g]
            for part in parts:
                state[i], accums[i] = _np_momentum(state[i], accums[i], _np_clip(part), lr=lr)
        for v, s, slot, a in zip(variables, state, optimizer.slots, accums):
            np.testing.assert_allclose(slot.numpy(), a, rtol=0, atol=1e-6 * np.abs(a).max())
            np.testing.assert_allclose(v.numpy(), s, rtol=0, atol=1e-6 * np.abs(s).max())
    assert int(optimizer.iterations.numpy()) == 3


@pytest.mark.parametrize(
    "name,norm,expected_slot,expected_dv",
    [
        # README 10.4, step 0 (zero slots and zero offset weights): slot/g and -dv/(lr g)
        ("layer_3/resnetb_deformable_0/conv2/offset_conv_weights", 514.95, 0.29031, 0.48450),
        ("layer_3/resnetb_deformable_0/conv2/offset_conv_bias", 24.24, 1.09800, 1.19800),
        ("layer_3/resnetb_deformable_strided_1/conv2/offset_conv_weights", 191.54, 0.61164, 1.13373),
        ("layer_4/resnetb_deformable_0/conv2/offset_conv_weights", 187.65, 0.62226, 1.15517),
        ("layer_4/resnetb_deformable_0/conv2/offset_conv_bias", 10.6, 1.09800, 1.19800),
    ],
)
def test_offset_double_update_table(name, norm, expected_slot, expected_dv):
    rng = np.random.default_rng(3)
    shape = (45,) if name.endswith("bias") else (15, 64, 45)
    variable = tf.Variable(np.zeros(shape, np.float32), name=name)
    grad = _grad_with_norm(rng, shape, norm)
    optimizer = _step([variable], [grad], "original")
    big = np.abs(grad) > 1e-3 * np.abs(grad).max()
    slot_ratio = optimizer.slots[0].numpy()[big] / grad[big]
    dv_ratio = -variable.numpy()[big] / (LR * grad[big])
    np.testing.assert_allclose(slot_ratio, expected_slot, atol=6e-5)
    np.testing.assert_allclose(dv_ratio, expected_dv, atol=6e-5)


def test_slots_and_learning_rate_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    variables = _vars([((3, 4), "a/weights"), ((4,), "a/offset_conv_bias")], rng)
    grads = [_grad_with_norm(rng, v.shape, 200.0) for v in variables]
    optimizer = _step(variables, grads, "original")
    optimizer.learning_rate.assign(0.02)
    path = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / "ckpt"))
    fresh = _momentum(variables, 1.0, 0.5)
    tf.train.Checkpoint(optimizer=fresh).read(path).assert_consumed()
    for a, b in zip(optimizer.slots, fresh.slots):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert fresh.learning_rate.numpy() == np.float32(0.02)
    assert int(fresh.iterations.numpy()) == 1
    fresh.reset()
    assert all(not np.any(s.numpy()) for s in fresh.slots)
    with pytest.raises(ValueError, match="momentum"):
        OriginalMomentum(0.1, 1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        OriginalMomentum(0.0, 0.9)


class ToyNetwork(keras.Model):
    """Smallest network with the trainer's protocol: BN, 'weights' and offset_conv variables."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed
        self.bn = keras.layers.BatchNormalization(momentum=0.98, epsilon=1e-6)

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(seed=self.seed)
        self.w = self.add_weight(name="weights", shape=(3, 4), initializer=init)
        self.ow = self.add_weight(name="offset_conv_weights", shape=(3, 4), initializer=init)
        self.ob = self.add_weight(name="offset_conv_bias", shape=(4,), initializer="zeros")

    def call(self, inputs, training=False, dropout_uniform=None):
        logits = self.bn(inputs["features"] @ (self.w + self.ow) + self.ob, training=training)
        if dropout_uniform is not None:
            logits = tf.where(dropout_uniform[:, :4] >= 0.5, logits / 0.5, 0.0)
        self.add_loss(0.1 * tf.reduce_sum(self.ow**2))  # stands for the offset regularisation
        return logits

    def output_loss(self, labels, logits, inputs):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _toy_data():
    rng = np.random.default_rng(5)
    x = (3.0 * rng.normal(size=(48, 3))).astype(np.float32)
    y = rng.integers(0, 4, 48).astype(np.int32)
    return x, y


def _toy_config(semantics):
    config = Config()
    config.train.semantics = semantics
    config.train.learning_rate = 0.2
    config.train.momentum = 0.98
    config.train.grad_clip_norm = 0.5  # small enough that clipping is active
    return config


def test_fit_runs_the_same_step_as_make_train_step():
    x, y = _toy_data()
    batches = [({"features": x[i : i + 16]}, y[i : i + 16]) for i in range(0, 48, 16)]
    nets = []
    for _ in range(2):
        net = ToyNetwork(seed=7)
        net({"features": x[:2]})
        nets.append(net)
    step = make_train_step(nets[0], _toy_config("original"))
    manual = [step(b[0], b[1]) for b in batches]
    wrapper = TrainingModel(nets[1], _toy_config("original"))
    wrapper.compile()
    dataset = tf.data.Dataset.from_tensor_slices(({"features": x}, y)).batch(16)
    history = wrapper.fit(dataset, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(nets[0].variables, nets[1].variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for a, b in zip(step.optimizer.slots, wrapper.optimizer.slots):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    mean_loss = np.mean([float(r["total_loss"]) for r in manual])
    np.testing.assert_allclose(history.history["loss"][0], mean_loss, rtol=1e-6)
    assert int(wrapper.optimizer.iterations.numpy()) == 3
    # the total is offsets + l2 + output, l2 over 'weights' variables (offset_conv_weights included)
    first = manual[0]
    expected_l2 = 1e-3 * 0.5 * sum(np.sum(v.numpy() ** 2) for v in _initial_weights(x))
    np.testing.assert_allclose(first["regularization_loss"], expected_l2, rtol=1e-5)
    np.testing.assert_allclose(
        first["total_loss"],
        first["offsets_loss"] + first["regularization_loss"] + first["output_loss"],
        rtol=1e-6,
    )
    # evaluation: inference-mode losses, no update
    before = [v.numpy() for v in nets[1].variables]
    logs = wrapper.evaluate(dataset, verbose=0, return_dict=True)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, nets[1].variables))
    logits = nets[1]({"features": x}, training=False).numpy()
    np.testing.assert_allclose(logs["accuracy"], np.mean(logits.argmax(-1) == y), atol=1e-6)


def _initial_weights(x):
    net = ToyNetwork(seed=7)
    net({"features": x[:2]})
    return [net.w, net.ow]


def test_learning_rate_variable_and_dropout_replay():
    x, y = _toy_data()
    net = ToyNetwork(seed=7)
    net({"features": x[:2]})
    step = make_train_step(net, _toy_config("paper"))
    uniform = np.random.default_rng(6).uniform(size=(16, 1024)).astype(np.float32)
    step.learning_rate.assign(0.0)  # a zero learning rate leaves the weights unchanged
    before = [v.numpy() for v in net.trainable_variables]
    result = step({"features": x[:16]}, y[:16], dropout_uniform=uniform)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, net.trainable_variables))
    assert float(result["learning_rate"]) == 0.0
    kept = uniform[:, :4] >= 0.5
    assert np.all((result["logits"].numpy() == 0) | kept)
    with pytest.raises(ValueError, match="semantics"):
        make_train_step(net, _toy_config("keras"))
    with pytest.raises(ValueError, match="network"):
        make_train_step(ToyNetwork(seed=1), _toy_config("paper"))


def test_update_entries_have_the_original_structure():
    """The 116 entries of the original KP-CNN (README 10.3 step 4): per variable, the same scales."""
    log = np.load(Path(__file__).parent / "fixtures/original_tf/train_public/kpcnn/lr_0.001/log.npz")
    names = [str(n) for n in log["trainable_variable_names"]]
    variables = [tf.Variable(np.zeros(2, np.float32), name=n) for n in names]
    grads = [tf.constant([3.0, 4.0]) for _ in names]  # norm 5: never clipped
    entries = update_entries(grads, variables, "original", float(log["grad_clip_norm"]))
    assert len(entries) == len(log["update_entry_variable"]) == 116
    ours, ref = {}, {}
    for index, update in entries:
        ours.setdefault(names[index], []).append(round(float(update[0]) / 3.0, 6))
    for name, scale in zip(log["update_entry_variable"], log["update_entry_scale"]):
        ref.setdefault(str(name), []).append(round(float(scale), 6))
    assert {k: sorted(v) for k, v in ours.items()} == {k: sorted(v) for k, v in ref.items()}
    # application order: weights g then 0.1 g, biases 0.1 g then g (README 10.4 majority pattern)
    order = {str(n): int(o) for n, o in zip(log["offset_variable_names"], log["offset_update_order"][0])}
    for name, o in order.items():
        assert ours[name] == ([1.0, 0.1] if o == 1 else [0.1, 1.0]), name


def test_mlp_offset_variables_get_one_scaled_entry():
    import tensorflow as tf

    from training.trainer import update_entries

    mlp = tf.Variable(tf.ones([2, 3]), name="offset_mlp_weights")
    conv = tf.Variable(tf.ones([2, 3]), name="offset_conv_weights")
    g = tf.fill([2, 3], 2.0)
    for semantics, counts in (("original", [1, 2]), ("paper", [1, 1])):
        entries = update_entries([g, g], [mlp, conv], semantics, clip_norm=100.0)
        assert [sum(1 for i, _ in entries if i == k) for k in (0, 1)] == counts
        first_mlp = [u for i, u in entries if i == 0][0]
        np.testing.assert_allclose(first_mlp.numpy(), 0.2)


def test_deformation_diagnostics_logged_and_divergence_warned(tmp_path, capsys):
    from training.train import OFFSETS_GROWTH_STEPS, StepLog, append_csv

    logger = StepLog(tmp_path, start_time=0.0)
    # Keras hands the callback epoch running means; a steady per-step value gives no warning...
    for batch in range(2 * OFFSETS_GROWTH_STEPS):
        logger._watch_offsets(batch, 0.5)
    assert "warning" not in capsys.readouterr().err
    # ...while per-step values growing 20x over 50 steps do (the means are recomputed from them).
    values = np.geomspace(0.01, 0.2, OFFSETS_GROWTH_STEPS + 1)
    means = np.cumsum(values) / np.arange(1, len(values) + 1)
    for batch, mean in enumerate(means):
        logger._watch_offsets(batch, float(mean))
    err = capsys.readouterr().err
    assert "offsets loss grew from 0.01 to 0.2" in err and "lost_share_" in err
    logger.close()
    row = {
        "epoch": 1,
        "loss": 1.0,
        "offset_norm_l3_0": 0.4,
        "lost_share_l3_0": 0.2,
        "val_lost_share_l3_0": 0.3,
        "val_output_loss": 2.0,
    }
    append_csv(tmp_path / "log.csv", row)
    with open(tmp_path / "log.csv") as f:
        header = f.readline().strip().split(",")
    assert {"offset_norm_l3_0", "lost_share_l3_0", "val_lost_share_l3_0"} <= set(header)
    assert "val_output_loss" not in header


def test_epoch_decay_is_the_originals_schedule():
    """Keys are the original's: lr *= factor at the end of epoch k counted from 0, in float32."""
    config = Config.from_dict(
        {"train": {"learning_rate": 1e-3, "max_epoch": 5, "lr_decay": {"factor": 0.1, "over_epochs": 80}}}
    )
    factor = 0.1 ** (1 / 80)
    assert config.train.decays() == dict.fromkeys(range(1, 5), factor) and config.train.lr_decays == {}
    schedule = EpochDecay(config.train.learning_rate, 3, config.train.decays())
    lr, expected = np.float32(1e-3), []
    for epoch in range(6):
        expected += [lr] * 3
        if epoch in config.train.decays():
            lr = np.float32(lr * np.float32(factor))  # TF1's assign(lr * decay)
    got = [schedule(step).numpy() for step in range(18)]
    np.testing.assert_array_equal(got, expected)  # epochs 0 and 1 at lr0; epoch 5 keeps epoch 4's rate
    optimizer = make_optimizer(config, steps_per_epoch=3)
    assert isinstance(optimizer, OriginalMomentum) and isinstance(optimizer._learning_rate, EpochDecay)
    # a dict written out is still read; an override of lr_decay replaces it
    written = Config.from_dict({"train": {"lr_decays": {"2": 0.5}}})
    assert written.train.decays() == {2: 0.5}
    replaced = Config.from_dict({"train": {"lr_decays": {2: 0.5}}}, ["train.lr_decay={every_epochs: 2}"])
    assert replaced.train.lr_decays == {} and sorted(replaced.train.decays())[:2] == [2, 4]
    with pytest.raises(ConfigError, match="both"):
        Config.from_dict({"train": {"lr_decays": {2: 0.5}, "lr_decay": {"every_epochs": 2}}})


def test_paper_semantics_with_any_keras_optimizer():
    x, y = _toy_data()
    config = _toy_config("paper")
    config.train.grad_clip_norm = 1e6  # unclipped: the update is -lr * scale * g
    nets = []
    for _ in range(2):
        net = ToyNetwork(seed=7)
        net({"features": x[:2]})
        nets.append(net)
    with tf.GradientTape() as tape:
        logits = nets[0]({"features": x[:16]}, training=True)
        loss = make_train_step(nets[0], config).losses({"features": x[:16]}, y[:16], logits)["total_loss"]
    grads = tape.gradient(loss, nets[0].trainable_variables)
    wrapper = TrainingModel(nets[1], config)
    sgd = keras.optimizers.SGD(0.05)
    wrapper.compile(optimizer=sgd)  # overrides train.optimizer
    assert wrapper.optimizer is sgd
    before = [v.numpy() for v in nets[1].trainable_variables]
    wrapper.fit(
        tf.data.Dataset.from_tensors(({"features": x[:16]}, y[:16])), epochs=1, verbose=0, shuffle=False
    )
    for v, v0, g in zip(nets[1].trainable_variables, before, grads):
        scale = OFFSET_GRADIENT_SCALE if is_offset_variable(v) else 1.0
        np.testing.assert_allclose(
            v.numpy() - v0, -0.05 * scale * g.numpy(), rtol=2e-4, atol=1e-7, err_msg=v.path
        )
    # train.optimizer names any Keras optimizer, with its arguments
    config.train.optimizer = {"name": "adamw", "weight_decay": 0.01}
    adamw = make_optimizer(config)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.01
    config.train.optimizer = "sgd"
    assert make_optimizer(config).momentum == config.train.momentum
    with pytest.raises(ValueError, match="OriginalMomentum"):
        TrainingModel(nets[1], _toy_config("original")).compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(ConfigError, match="original_momentum"):
        Config.from_dict({"train": {"semantics": "original", "optimizer": "adam"}})
