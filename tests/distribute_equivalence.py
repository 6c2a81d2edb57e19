"""Driver of tests/test_distribute.py (a process of its own: it splits the CPU in two devices).

    python tests/distribute_equivalence.py OUT.json

For each case: ``model.fit`` for 3 steps under ``MirroredStrategy`` on 2 logical CPU devices, each
replica fed stacked batches of its own (of very different sizes), against ``model.fit`` on one
device fed the union of the two replicas' batches, from the same initial weights. Writes the
per-step losses, the largest weight differences and the per-replica sizes of every case.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from kpconv_tf.models import build_network  # noqa: E402
from training.config import load_config  # noqa: E402
from training.datasets import configure, load_dataset  # noqa: E402
from training.distribute import make_strategy  # noqa: E402
from training.pipeline import Pipeline, join_batches  # noqa: E402
from training.trainer import TrainingModel, batch_free_spec, make_optimizer  # noqa: E402

STEPS = 3
CASES = {
    # name: (config, semantics, optimizer, sync_batch_norm)
    "classification_paper_sgd": ("embedded_shapes", "paper", "sgd", True),
    "classification_original": ("embedded_shapes", "original", "original_momentum", True),
    "segmentation_paper_sgd": ("embedded_rooms", "paper", "sgd", True),
    "segmentation_original": ("embedded_rooms", "original", "original_momentum", True),
    "segmentation_per_replica_norm": ("embedded_rooms", "paper", "sgd", False),
}


def first_clouds(batch, count):
    """The first ``count`` clouds of a stacked batch."""
    n = int(batch.lengths[:count].sum())
    point_labels = len(batch.labels) == len(batch.points)
    return replace(
        batch,
        points=batch.points[:n],
        extra=batch.extra[:n],
        lengths=batch.lengths[:count],
        labels=batch.labels[:n] if point_labels else batch.labels[:count],
        object_labels=batch.object_labels[:count],
        cloud_indices=batch.cloud_indices[:count],
        point_indices=batch.point_indices[:n],
    )


def dataset_of(elements):
    specs = tf.nest.map_structure(batch_free_spec, elements[0])
    return tf.data.Dataset.from_generator(lambda: iter(elements), output_signature=specs)


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        # Keras logs running means: recover each step's value
        mean = float(logs["loss"])
        self.values.append((batch + 1) * mean - sum(self.values))


def train(config, strategy, data, initial):
    with strategy.scope():
        network = build_network(config)
        model = TrainingModel(network, config)
        model.compile(optimizer=make_optimizer(config))
    for variable, value in zip(network.variables, initial, strict=True):
        variable.assign(value)
    losses = StepLosses()
    model.fit(data, epochs=1, steps_per_epoch=STEPS, shuffle=False, verbose=0, callbacks=[losses])
    return network, losses.values


def run_case(name, config_name, semantics, optimizer, sync):
    overrides = [
        f"train.semantics={semantics}",
        f"train.optimizer={optimizer}",
        "train.learning_rate=0.001",
        f"model.sync_batch_norm={str(sync).lower()}",
        "model.dropout=0",
        "augment.color=1.0",
    ]
    config = load_config(config_name, overrides)
    data = load_dataset(config)
    configure(config, data)
    pipeline = Pipeline(data, config)
    stream = pipeline.stream("train", "random", seed=0).batches()
    pairs = []
    for _ in range(STEPS):
        a, b = next(stream), next(stream)
        pairs.append((a, first_clouds(b, 1)))  # replica 1: one cloud, replica 0: a whole batch
    replica_inputs = [[pipeline.inputs_of(a), pipeline.inputs_of(b)] for a, b in pairs]
    union_inputs = [pipeline.inputs_of(join_batches([a, b])) for a, b in pairs]

    keras.utils.set_random_seed(0)
    reference = build_network(config)
    initial = [v.numpy() for v in reference.variables]
    single, single_losses = train(config, tf.distribute.get_strategy(), dataset_of(union_inputs), initial)

    strategy = make_strategy("mirrored")
    interleaved = [x for step in replica_inputs for x in step]
    distributed = strategy.distribute_datasets_from_function(lambda context: dataset_of(interleaved))
    mirrored, mirrored_losses = train(config, strategy, distributed, initial)

    weight_error, moved, replica_spread = 0.0, 0.0, 0.0
    for a, b, start in zip(mirrored.variables, single.variables, initial, strict=True):
        parts = [p.numpy() for p in strategy.experimental_local_results(a.value)]
        scale = max(1.0, float(np.abs(b.numpy()).max()))
        weight_error = max(weight_error, float(np.abs(parts[0] - b.numpy()).max()) / scale)
        moved = max(moved, float(np.abs(b.numpy() - start).max()) / scale)
        replica_spread = max(replica_spread, max(float(np.abs(p - parts[0]).max()) for p in parts))
    return {
        "single_losses": single_losses,
        "mirrored_losses": mirrored_losses,
        "weight_error": weight_error,
        "weights_moved": moved,
        "replica_spread": replica_spread,
        "replica_points": [[int(x[0]["points_0"].shape[0]) for x in step] for step in replica_inputs],
    }


def main(out, names=()):
    results = {}
    for name, case in CASES.items():
        if names and name not in names:
            continue
        results[name] = run_case(name, *case)
        print(name, json.dumps(results[name]), flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
