"""One worker of tests/test_distribute.py's multi-worker run (TF_CONFIG set by the test).

    python tests/multiworker_driver.py WEIGHTS.npz -- TRAINING_ARGS...

Runs ``training.train`` with the arguments after ``--`` and, when training ends, writes this
worker's network weights to WEIGHTS.npz (a test's view of a worker that writes nothing itself).
"""

import sys

import keras
import numpy as np
import tensorflow as tf

from training.train import main


class SaveWeights(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        network = self.model.network
        np.savez(self.path, **{f"{i:04d}": v.numpy() for i, v in enumerate(network.variables)})


if __name__ == "__main__":
    keras.config.disable_traceback_filtering()  # full tracebacks in the test log
    tf.debugging.disable_traceback_filtering()
    weights, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    sys.exit(main(rest, callbacks=[SaveWeights(weights)]))
