"""Replays the original trainer's recorded KP-CNN steps (fixture README section 10), `original` semantics.

From the original initial checkpoint, the stored batches are fed with the dropout uniforms the
original drew, and compared with the original's per-step records (losses, raw gradient norms,
per-entry norms and clipping decisions, statistics of every variable and slot after every step),
its final checkpoint and its final momentum slots.

What can be compared at 1e-4: everything the original computed from a state we share exactly,
i.e. the whole first step (from init_ckpt) and the forward pass of the second. Later steps are not
reproducible by any port that is not bit-exact: with 2-3 clouds per batch the fc batch norm
amplifies float32 round-off (README 10.5/10.8), and perturbing the initial weights by 1e-7 relative
(one ulp) changes our own step-3 loss by tens of percent (`test_trajectory_sensitivity`). For the
5-step run we therefore assert that our distance to the original is no larger than the distance
between two runs of ours that differ by one ulp in the initial weights, and print both.
"""

from pathlib import Path

import numpy as np
import pytest

from kpconv_tf import convert
from training.trainer import is_offset_variable, make_train_step

FIXTURES = Path(__file__).parent / "fixtures" / "original_tf" / "train_public" / "kpcnn"
TOLERANCE = 1e-4
LOSSES = ("output_loss", "regularization_loss", "offsets_loss", "total_loss")

pytestmark = pytest.mark.slow


def _batch(batches, t, config):
    flat = [batches[f"step{t}_{name}"] for name in batches["flat_input_names"]]
    inputs = convert.inputs_from_original(flat, config)
    return inputs, batches[f"step{t}_labels"], batches[f"step{t}_dropout_uniform"]


def _stats(values):
    """float64 (sum, l2, maxabs) per name, as log.npz stores them."""
    return {
        n: (
            np.sum(v, dtype=np.float64),
            np.linalg.norm(v.astype(np.float64).ravel()),
            float(np.max(np.abs(v))) if v.size else 0.0,
        )
        for n, v in values.items()
    }


class Replay:
    """A KP-CNN restored from init_ckpt with its train step; `run(t)` replays stored batch t."""

    def __init__(self, semantics, learning_rate=None, perturbation=0.0, seed=0):
        self.config = convert.config_from_original(FIXTURES / "parameters.txt")
        self.config.train.semantics = semantics
        self.batches = np.load(FIXTURES / "batches.npz")
        self.network = convert.load_original_checkpoint(FIXTURES / "init_ckpt" / "model.ckpt", self.config)
        self.variable_map = convert.original_variable_map(self.network)
        self.step = make_train_step(self.network, self.config)
        if learning_rate is not None:
            self.step.learning_rate.assign(learning_rate)
        if perturbation:
            rng = np.random.default_rng(seed)
            for v in self.step.variables:
                v.assign(v.numpy() * (1 + perturbation * rng.standard_normal(v.shape)).astype(np.float32))
        self.initial = self.values()
        self.history = []

    def run(self, t):
        inputs, labels, uniform = _batch(self.batches, t, self.config)
        result = {k: v.numpy() for k, v in self.step(inputs, labels, dropout_uniform=uniform).items()}
        index = {id(v): i for i, v in enumerate(self.step.variables)}
        result["grad_norm"] = {
            n: result["grad_norms"][index[id(v)]] for n, v in self.variable_map.items() if id(v) in index
        }
        result["var_stats"] = _stats(self.values())
        result["slot_stats"] = _stats(self.slots())
        self.history.append(result)
        return result

    def values(self):
        return {name: v.numpy() for name, v in self.variable_map.items()}

    def slots(self):
        slot_of = {id(v): s for v, s in zip(self.step.variables, self.step.optimizer.slots)}
        return {name: slot_of[id(v)].numpy() for name, v in self.variable_map.items() if id(v) in slot_of}


def _relative(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _loss_errors(replay, log, steps):
    return {
        name: max(
            abs(float(replay.history[t][name]) - float(log[name][t])) / abs(float(log[name][t]))
            for t in steps
        )
        for name in LOSSES
    }


@pytest.fixture(scope="module")
def run_1e3():
    replay = Replay("original")
    for t in range(5):
        replay.run(t)
    return replay, np.load(FIXTURES / "lr_0.001" / "log.npz")


@pytest.fixture(scope="module")
def run_1e3_perturbed():
    replay = Replay("original", perturbation=1e-7)
    for t in range(5):
        replay.run(t)
    return replay


def _check_first_step(replay, log):
    """Step 0 from the shared initial state: losses, gradients, clipping, every slot and variable."""
    first = replay.history[0]
    errors = _loss_errors(replay, log, [0])
    names = [str(n) for n in log["trainable_variable_names"]]
    ours_g = np.array([first["grad_norm"][n] for n in names])
    errors["grad_norm"] = float(np.max(np.abs(ours_g - log["grad_norm"][0]) / log["grad_norm"][0]))
    # per-entry norms before clipping: the original's entry e is scale * g of its variable
    entry_norm = np.array(
        [
            float(s) * first["grad_norm"][str(n)]
            for n, s in zip(log["update_entry_variable"], log["update_entry_scale"])
        ]
    )
    ref_entry = log["entry_pre_clip_norm"][0]
    clear = np.abs(ref_entry - 100.0) > 1e-2 * 100.0  # decisions away from the threshold
    np.testing.assert_array_equal((entry_norm > 100.0)[clear], log["entry_clipped"][0][clear] == 1)
    slot_names = [str(n)[len("optimizer/") : -len("/Momentum")] for n in log["slot_names"]]
    errors["slot_l2"] = max(
        abs(first["slot_stats"][n][1] - log["slot_l2"][0, j]) / log["slot_l2"][0, j]
        for j, n in enumerate(slot_names)
    )
    errors["slot_maxabs"] = max(
        abs(first["slot_stats"][n][2] - log["slot_maxabs"][0, j]) / log["slot_maxabs"][0, j]
        for j, n in enumerate(slot_names)
    )
    # batch-norm moving statistics (not slots): compare the change of their sums, with a float32
    # rounding allowance; trainable variables moved by exactly -lr * slot in this first step
    initial = _stats(replay.initial)
    errors["batch_norm_updates"] = 0.0
    for j, n in enumerate(str(x) for x in log["checkpoint_variable_names"]):
        if "moving_" not in n:
            continue
        ref_delta = log["var_sum"][0, j] - initial[n][0]
        our_delta = first["var_stats"][n][0] - initial[n][0]
        rounding = 2e-7 * np.sqrt(replay.initial[n].size) * initial[n][1]
        error = max(abs(our_delta - ref_delta) - rounding, 0.0) / abs(ref_delta)
        errors["batch_norm_updates"] = max(errors["batch_norm_updates"], error)
    ours_var = np.array([first["var_stats"][str(n)][1] for n in log["checkpoint_variable_names"]])
    errors["var_l2"] = float(np.max(np.abs(ours_var - log["var_l2"][0]) / log["var_l2"][0]))
    return errors


def test_first_step_matches_the_original(run_1e3):
    replay, log = run_1e3
    errors = _check_first_step(replay, log)
    print("lr 1e-3, step 0 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOLERANCE, errors
    assert float(replay.history[0]["learning_rate"]) == float(log["learning_rate"][0])
    assert float(replay.history[0]["accuracy"]) == float(log["accuracy"][0])


def test_second_forward_pass_matches_the_original(run_1e3):
    replay, log = run_1e3
    errors = _loss_errors(replay, log, [1])
    print("lr 1e-3, step 1 loss relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOLERANCE, errors


def _final_errors(replay, final_values, final_slots):
    """Max over variables of ||delta_ours - delta_ref|| / ||delta_ref|| (weights, BN stats) and slots."""
    worst = {"weights": 0.0, "batch_norm": 0.0, "slots": 0.0}
    ours = replay.values()
    for name, ref in final_values.items():
        ref_delta = ref - replay.initial[name]
        if not np.any(ref_delta):
            continue
        kind = "batch_norm" if "moving_" in name else "weights"
        worst[kind] = max(worst[kind], _relative(ours[name] - replay.initial[name], ref_delta))
    for name, slot in replay.slots().items():
        worst["slots"] = max(worst["slots"], _relative(slot, final_slots[name]))
    return worst


def test_trajectory_sensitivity(run_1e3, run_1e3_perturbed):
    """5 steps at lr 1e-3: our distance to the original vs the one-ulp spread of our own runs."""
    import tensorflow as tf

    replay, log = run_1e3
    reader = tf.train.load_checkpoint(str(FIXTURES / "lr_0.001" / "final_ckpt" / "model.ckpt"))
    final = {name: reader.get_tensor(name) for name in replay.variable_map}
    for name in final:  # kernel points never move
        if "kernel_points" in name:
            np.testing.assert_array_equal(final[name], replay.values()[name])
    slots_npz = np.load(FIXTURES / "lr_0.001" / "final_slots.npz")
    ref_slots = {k[len("optimizer/") : -len("/Momentum")]: slots_npz[k] for k in slots_npz.files}
    assert sorted(ref_slots) == sorted(replay.slots())
    to_reference = _final_errors(replay, final, ref_slots)
    to_reference.update(_loss_errors(replay, log, range(5)))
    other = run_1e3_perturbed
    spread = _final_errors(replay, other.values(), other.slots())
    spread.update(
        {
            n: max(
                abs(float(replay.history[t][n]) - float(other.history[t][n])) / abs(float(log[n][t]))
                for t in range(5)
            )
            for n in LOSSES
        }
    )
    print(
        "lr 1e-3, 5 steps, max relative error to the original:",
        {k: f"{v:.1e}" for k, v in to_reference.items()},
    )
    print(
        "lr 1e-3, 5 steps, spread of our runs for a 1e-7 weight perturbation:",
        {k: f"{v:.1e}" for k, v in spread.items()},
    )
    assert spread["output_loss"] > 100 * TOLERANCE  # the 1e-4 target is below the trajectory's conditioning
    for key in ("weights", "batch_norm", "slots", "output_loss", "total_loss"):
        assert to_reference[key] <= 3 * spread[key], (key, to_reference[key], spread[key])


def test_learning_rate_005():
    """lr 0.05 (fresh slots, same batches): step 0 at 1e-4 (losses, gradients, slots, BN statistics,
    var_l2); steps 1-4 (losses, var_l2 after every step) within the spread of our own runs under
    1e-7 weight perturbations. At this rate some variables grow several-fold within four steps, so
    one perturbed run is too small a sample of that spread: the largest over three is taken."""
    log = np.load(FIXTURES / "lr_0.05" / "log.npz")
    lr = float(log["learning_rate_config"])
    replay = Replay("original", learning_rate=lr)
    others = [Replay("original", learning_rate=lr, perturbation=1e-7, seed=seed) for seed in range(3)]
    for run in [replay, *others]:
        for t in range(int(log["n_steps"])):
            run.run(t)
    errors = _check_first_step(replay, log)
    print("lr 0.05, step 0 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOLERANCE, errors
    names = [str(n) for n in log["checkpoint_variable_names"]]

    def var_l2(run, t):
        return np.array([run.history[t]["var_stats"][n][1] for n in names])

    to_reference, spread = {}, {}
    for t in range(1, 5):
        ours, reference = var_l2(replay, t), log["var_l2"][t]
        to_reference[f"var_l2_{t}"] = float(np.max(np.abs(ours - reference) / reference))
        spread[f"var_l2_{t}"] = max(float(np.max(np.abs(ours - var_l2(o, t)) / reference)) for o in others)
        for n in ("output_loss", "total_loss"):
            value, reference = float(replay.history[t][n]), float(log[n][t])
            to_reference[f"{n}_{t}"] = abs(value - reference) / reference
            spread[f"{n}_{t}"] = max(abs(value - float(o.history[t][n])) / reference for o in others)
    print(
        "lr 0.05, steps 1-4, relative error to the original:",
        {k: f"{v:.1e}" for k, v in to_reference.items()},
    )
    print(
        "lr 0.05, steps 1-4, largest spread over three 1e-7 weight perturbations:",
        {k: f"{v:.1e}" for k, v in spread.items()},
    )
    worst_ref, worst_spread = max(to_reference.values()), max(spread.values())
    assert worst_spread > 10 * TOLERANCE
    assert worst_ref <= 3 * worst_spread, (worst_ref, worst_spread)


def test_paper_semantics_differ_only_on_offset_variables():
    original, paper = Replay("original"), Replay("paper")
    results = {"original": original.run(0), "paper": paper.run(0)}
    for name in LOSSES:  # same forward pass
        assert results["original"][name] == results["paper"][name]
    a, b = original.values(), paper.values()
    offset_names = {name for name, v in original.variable_map.items() if is_offset_variable(v)}
    assert len(offset_names) == 6
    for name in a:
        if name in offset_names:
            assert not np.allclose(a[name], b[name]), name
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # paper: one update with clip(0.1 g). Original biases (unclipped, 0.1 g first): slot = 0.098 g + g
    slots_original, slots_paper = original.slots(), paper.slots()
    for name in offset_names:
        norm = float(results["paper"]["grad_norm"][name])
        np.testing.assert_allclose(np.linalg.norm(slots_paper[name]), min(0.1 * norm, 100.0), rtol=1e-5)
        if name.endswith("bias"):
            scale = np.abs(slots_paper[name]).max()
            np.testing.assert_allclose(
                slots_paper[name], slots_original[name] * (0.1 / 1.098), rtol=1e-4, atol=1e-6 * scale
            )
