"""The ``tf.distribute`` strategy of a training run (``train.strategy``) and which worker writes.

* ``default``: one device (TensorFlow's default strategy).
* ``mirrored``: ``MirroredStrategy`` over every visible GPU, or over the logical CPU devices when
  there is no GPU (one replica unless the process split its CPU, as the tests do).
* ``multiworker``: ``MultiWorkerMirroredStrategy`` over the workers that ``TF_CONFIG`` lists
  (``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}``), or
  those of a SLURM allocation when ``TF_CONFIG`` is not set. Every worker runs the same command.

Each replica trains on whole stacked batches of its own (``Pipeline.distributed_dataset``); the
global batch of a step is the union of the replicas' batches. The chief (task ``chief``, or worker
0 when the cluster has no chief) writes the run directory; the other workers only read it.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from kpconv_tf.config import STRATEGIES

# A collective that waits longer than this for a peer fails instead of hanging (a dead worker).
COLLECTIVE_TIMEOUT_SECONDS = 600.0


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy called ``name`` (``STRATEGIES``); create it before any other TF work."""
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        # Logical CPUs: collective all-reduces launched from the replicas' threads can pair up in
        # different orders (seen with the many of synchronized batch norm); reducing on one device
        # has no such pairing.
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver(), communication_options=options
    )


def cluster_resolver():
    """The cluster of ``TF_CONFIG``, else of SLURM; ValueError naming what is missing or wrong."""
    text = os.environ.get("TF_CONFIG")
    if text:
        try:
            value = json.loads(text)
            workers = value["cluster"]["worker"]
            task = value["task"]
            task_type, index = task["type"], int(task["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                'TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
                f'"task": {{"type": "worker", "index": 0}}}}: {err}'
            ) from err
        if task_type == "worker" and not 0 <= index < len(workers):
            raise ValueError(f"TF_CONFIG: task index {index} is not one of the {len(workers)} workers")
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if os.environ.get("SLURM_JOB_ID"):
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise ValueError(
        "train.strategy multiworker needs the cluster: set TF_CONFIG on every worker (README, "
        '"Several GPUs or machines") or run the workers under SLURM (srun)'
    )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the worker that writes the run directory (always, outside multi-worker runs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    jobs = resolver.cluster_spec().as_dict()
    if "chief" in jobs:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes of the strategy's cluster (1 outside multi-worker runs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, [])) for job in ("chief", "worker"))


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True when ``flag`` is True on any worker (a collective: every worker must call it)."""
    if num_workers(strategy) == 1:
        return bool(flag)
    value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None).numpy() > 0)
