"""Deformable KPConv trained for many steps on the embedded lidar objects (issue: the original
definition diverges on one-sided, sparse scans; the stable one does not).

The measure is the share of "lost" kernel points (no input point within the extent): ~0.2-0.35 for
rigid kernels on these objects, near 1 once the original's unbounded offsets have flown away.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.models import build_network
from training.config import load_config
from training.datasets import configure, load_dataset
from training.pipeline import Pipeline
from training.trainer import TrainingModel

# The shipped ModelNet40 recipe (lr 1e-3, momentum 0.98, dropout 0.5, deformable layers 3-4), on a
# coarser grid and 32 first features so that a test can afford 100 steps, and with batch-norm
# momentum 0.9 instead of 0.98: at 0.98 the running statistics lag the weights for far longer than
# 100 steps, and the test accuracy in inference mode then says more about them than about learning
# (measured with 64 features on a 2-core AVX-512 machine: training accuracy 0.87 deformable / 0.86
# rigid, test accuracy 0.34 / 0.47).
SMALL = [
    "dataset.name=EmbeddedLidarObjects",
    "dataset.extra={train_per_class: 12, test_per_class: 10, seed: 2}",
    "model.first_subsampling_dl=0.05",
    "model.first_features_dim=32",
    "model.batch_norm_momentum=0.9",
    "train.epoch_steps=20",
    "train.seed=1",
    "model.kernel_seed=1",
]
RIGID = [
    "model.architecture=[simple, resnetb, resnetb_strided, resnetb, resnetb_strided, resnetb, "
    "resnetb_strided, resnetb, resnetb_strided, resnetb, global_average]"
]
ORIGINAL_DEFINITION = [
    "model.offset_bound=0",
    "train.offsets_loss=fitting",
    "train.offsets_decay=0.1",
    "train.semantics=original",
]


pytestmark = pytest.mark.usefixtures("module_cache")


def _train(overrides, epochs):
    """Trains ``epochs`` x 20 steps; returns (mean lost share per epoch, history, test accuracy)."""
    config = load_config("modelnet40", SMALL + overrides)
    keras.utils.set_random_seed(1)
    dataset = load_dataset(config)
    configure(config, dataset)
    pipeline = Pipeline(dataset, config)
    model = TrainingModel(build_network(config), config)
    model.compile()
    history = model.fit(
        pipeline.dataset("train").repeat(),
        steps_per_epoch=config.train.epoch_steps,
        epochs=epochs,
        verbose=0,
        shuffle=False,
    ).history
    lost_keys = [k for k in history if k.startswith("lost_share_")]  # none for a rigid network
    lost = [np.mean([history[k][e] for k in lost_keys]) for e in range(epochs)] if lost_keys else []
    # The test pass with its length known, as EpochValidation's passes: evaluate on a dataset of unknown
    # length reads until it ends and Keras then warns "Your input ran out of data" (the fit is not the
    # cause: its stream is endless and steps_per_epoch bounds it).
    batches = sum(1 for _ in pipeline.stream("test", "sequential", config.train.seed).batches())
    test_pass = pipeline.dataset("test", augment=False).apply(
        tf.data.experimental.assert_cardinality(batches)
    )
    test = model.evaluate(test_pass, verbose=0, return_dict=True)
    return lost, history, float(test["accuracy"])


@pytest.fixture(scope="module")
def stable():
    return _train([], epochs=5)


@pytest.mark.slow
def test_shipped_deformable_recipe_keeps_its_kernel_points_on_the_points(stable):
    lost, history, _ = stable
    assert lost[-1] < 0.45, lost  # rigid kernels: 0.2-0.35
    assert max(history["offsets_loss"]) < 3 * history["offsets_loss"][0] + 1.0, history["offsets_loss"]
    assert np.all(np.isfinite(history["loss"]))


@pytest.mark.slow
def test_shipped_deformable_recipe_learns_like_the_rigid_network(stable):
    """100 steps of the ModelNet40 recipe on 72 objects (6 classes, chance 0.17): measured 0.80 for
    the deformable network and 0.83 for the rigid one on 60 test objects (2-core AVX-512 machine)."""
    _, _, rigid_accuracy = _train(RIGID, epochs=5)
    deformable_accuracy = stable[2]
    assert deformable_accuracy > 0.4
    assert deformable_accuracy >= rigid_accuracy - 0.1, (deformable_accuracy, rigid_accuracy)


@pytest.mark.slow
def test_original_definition_loses_its_kernel_points():
    """The same run with the original's definition: the offsets fly away (the cause of the
    divergence, also measured with the original code). Keeps the tests above meaningful."""
    lost, history, _ = _train(ORIGINAL_DEFINITION, epochs=3)
    assert lost[-1] > 0.6, lost
    assert history["offsets_loss"][-1] > 3 * history["offsets_loss"][0], history["offsets_loss"]
