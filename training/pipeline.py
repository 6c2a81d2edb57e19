"""The stacked-batch input pipeline: batch streams, calibration and the tf.data map.

A *stream* (Python, cheap) decides which clouds or spheres form each batch and stacks them along
the point axis until the batch limit; a ``tf.data`` map (parallel calls, compiled ops) augments the
batch and builds the per-layer input dict of ARCHITECTURE.md with ``kpconv_tf.pyramid``.

Batches are numbered. Augmentation draws come from stateless ops seeded by ``(seed, number)`` and the
streams are deterministic in their seed, so ``start_batch=k`` rebuilds exactly the batches an
interrupted run would have seen next (exact resume) and any number of parallel calls gives the same
data.

    pipeline = Pipeline(dataset, config)          # calibrates (cached on disk) on first use
    train = pipeline.dataset("train")             # endless: (inputs, labels)
    val = pipeline.dataset("validation")          # one validation pass
    test = pipeline.dataset("test", with_meta=True, seed=vote)   # (inputs, labels, meta)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import tensorflow as tf

from kpconv_tf.architecture import layer_specs
from kpconv_tf.config import Config
from kpconv_tf.inputs import layer_keys
from kpconv_tf.pyramid import build_pyramid
from training.augment import augment_points, drop_colors
from training.datasets.base import ObjectDataset, SceneDataset, cache_root, discard_cache
from training.scenes import scene_feature_columns

OBJECT_TASKS = ("classification", "segmentation", "multi_segmentation")


@dataclass
class Batch:
    """One stacked batch as the streams yield it (numpy).

    points float32 [N, 3]; extra float32 [N, E] (objects: normals; scenes: rgb, then absolute xyz);
    lengths int32 [B]; labels int32 [B] (classification) or [N] (segmentation, -1 = ignored);
    object_labels int32 [B]; cloud_indices int32 [B] (object index or scene index); point_indices
    int32 [N] (index of every point in its object / subsampled scene); number: the batch number.
    """

    points: np.ndarray
    extra: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    object_labels: np.ndarray
    cloud_indices: np.ndarray
    point_indices: np.ndarray
    number: int


def _stack(items, number, point_labels):
    """items: list of (points, extra, label or point labels, object label, cloud index, point indices)."""
    return Batch(
        points=np.concatenate([i[0] for i in items]).astype(np.float32),
        extra=np.concatenate([i[1] for i in items]).astype(np.float32),
        lengths=np.array([len(i[0]) for i in items], np.int32),
        labels=(
            np.concatenate([i[2] for i in items]) if point_labels else np.array([i[2] for i in items])
        ).astype(np.int32),
        object_labels=np.array([i[3] for i in items], np.int32),
        cloud_indices=np.array([i[4] for i in items], np.int32),
        point_indices=np.concatenate([i[5] for i in items]).astype(np.int32),
        number=number,
    )


BATCH_ARRAYS = tuple(f.name for f in fields(Batch) if f.name != "number")


def join_batches(batches) -> Batch:
    """One stacked batch of the clouds of ``batches`` in order (numbered as the first): what one
    device sees of a step whose replicas hold ``batches``."""
    arrays = {name: np.concatenate([getattr(b, name) for b in batches]) for name in BATCH_ARRAYS}
    return Batch(**arrays, number=batches[0].number)


def _pack(items: Iterator, batch_limit: float, point_labels: bool) -> Iterator[Batch]:
    """Greedy stacking as the original: add items until the next one would pass ``batch_limit``
    points (a batch always holds at least one item)."""
    current, total, number = [], 0, 0
    for item in items:
        n = len(item[0])
        if current and total + n > batch_limit:
            yield _stack(current, number, point_labels)
            number += 1
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        yield _stack(current, number, point_labels)


class ObjectStream:
    """Batches of whole objects.

    mode "random": endless, a fresh seeded permutation of the split per pass (training);
    "potentials": ``count`` objects of least potential per call, as the original's validation;
    "sequential": every object once, in order (testing and voting).
    """

    def __init__(
        self,
        dataset: ObjectDataset,
        split: str,
        batch_limit: float,
        mode: str,
        seed: int = 0,
        count: int | None = None,
        start_pass: int | None = None,
    ):
        self.clouds = dataset.clouds(split)
        if not self.clouds:
            raise ValueError(f"dataset {dataset.name} has no clouds in split {split!r}")
        self.task = dataset.task
        self.batch_limit = batch_limit
        self.mode = mode
        self.seed = seed
        self.count = count
        self.potentials = np.random.default_rng([seed, 1]).random(len(self.clouds)) * 1e-3
        # start_pass k: the potentials as k earlier passes left them (a resumed run validates as an
        # uninterrupted one)
        for _ in range((start_pass or 0) if mode == "potentials" else 0):
            for _ in self._order():
                pass

    def _item(self, index):
        cloud = self.clouds[index]
        normals = cloud.normals if cloud.normals is not None else np.zeros_like(cloud.points)
        segmentation = self.task != "classification"
        label = cloud.point_labels if segmentation else cloud.label
        return (cloud.points, normals, label, cloud.label, index, np.arange(len(cloud.points)))

    def _order(self):
        if self.mode == "random":
            passes = 0
            while True:
                yield from np.random.default_rng([self.seed, 2, passes]).permutation(len(self.clouds))
                passes += 1
        elif self.mode == "potentials":
            count = min(self.count or len(self.clouds), len(self.clouds))
            chosen = np.argsort(self.potentials, kind="stable")[:count]
            self.potentials[chosen] += 1.0
            yield from chosen
        elif self.mode == "sequential":
            yield from range(len(self.clouds))
        else:
            raise ValueError(f"mode must be 'random', 'potentials' or 'sequential', got {self.mode!r}")

    def batches(self, start_batch=0) -> Iterator[Batch]:
        segmentation = self.task != "classification"
        for batch in _pack((self._item(i) for i in self._order()), self.batch_limit, segmentation):
            if batch.number >= start_batch:
                yield batch

    def sizes(self):
        return np.array([len(c.points) for c in self.clouds])


class SceneStream:
    """Batches of spheres cut from scenes (``training.scenes.SphereSampler``).

    mode "random": endless random spheres (training); "potentials": ``count`` batches of spheres
    placed by potentials (validation, testing; the sampler keeps its potentials across calls).
    """

    def __init__(
        self,
        dataset: SceneDataset,
        split: str,
        batch_limit: float,
        mode: str,
        in_radius: float,
        seed: int = 0,
        count: int | None = None,
        start_pass: int | None = None,
    ):
        from training.scenes import SphereSampler

        self.scenes = dataset.scenes(split)
        if not self.scenes:
            raise ValueError(f"dataset {dataset.name} has no scenes in split {split!r}")
        self.batch_limit = batch_limit
        self.mode = mode
        self.in_radius = in_radius
        self.seed = seed
        self.count = count
        self.sampler = SphereSampler(self.scenes, in_radius, mode=mode, seed=seed)
        # start_pass k: pass k places its spheres from potentials seeded by (seed, k), so a resumed run
        # validates as an uninterrupted one (replaying the earlier passes would cost as much as running them)
        self.next_pass = start_pass

    def _items(self):
        while True:
            crop = self.sampler.sample()
            if len(crop.points) == 0:
                continue
            absolute = crop.points + crop.center[None, :]
            labels = crop.labels if crop.labels is not None else np.full(len(crop.points), -1, np.int32)
            extra = np.concatenate([crop.colors, absolute], 1)
            yield (crop.points, extra, labels, 0, crop.scene_index, crop.input_indices)

    def batches(self, start_batch=0) -> Iterator[Batch]:
        if self.next_pass is not None:
            from training.scenes import SphereSampler

            self.sampler = SphereSampler(
                self.scenes, self.in_radius, mode=self.mode, seed=[self.seed, self.next_pass]
            )
            self.next_pass += 1
        for batch in _pack(self._items(), self.batch_limit, True):
            if self.count is not None and batch.number >= self.count:
                return
            if batch.number >= start_batch:
                yield batch

    def sizes(self, samples=300):
        from training.scenes import SphereSampler

        sampler = SphereSampler(self.scenes, self.in_radius, mode="random", seed=self.seed + 12345)
        return np.array([len(sampler.sample().points) for _ in range(samples)])


# ----------------------------------------------------------------------------------------------
# calibration


def calibrate_batch_limit(sizes, batch_num: int, seed: int = 0, iterations: int = 10000) -> float:
    """Batch limit (points) for which greedy stacking averages ``batch_num`` clouds per batch.

    The original's proportional controller: start from ``max(size) * batch_num`` and correct the
    limit by ``10 * (batch_num - running mean)`` after every random batch.
    """
    sizes = np.sort(np.asarray(sizes, np.float64))
    if len(sizes) == 0:
        raise ValueError("sizes: no clouds to calibrate the batch limit on")
    if batch_num < 1:
        raise ValueError(f"batch_num must be >= 1, got {batch_num}")
    rng = np.random.default_rng([seed, 3])
    limit = sizes[-1] * batch_num
    draw = min(len(sizes), max(2 * batch_num + 1, int(np.searchsorted(np.cumsum(sizes), limit)) + 1))
    estimate = 0.0
    for i in range(iterations):
        shapes = rng.choice(sizes, size=draw, replace=draw > len(sizes))
        count = max(1, int(np.sum(np.cumsum(shapes) < limit)))
        estimate += (count - estimate) / min(i + 1, 100)
        limit += 10.0 * (batch_num - estimate)
    return float(max(limit, sizes[0]))


def neighbor_histogram_limit(counts: np.ndarray, keep_ratio: float = 0.8) -> int:
    """Smallest width keeping ``keep_ratio`` of the neighbourhoods whole, as the original computes it
    from the histogram of neighbourhood sizes (``counts``: neighbours per row)."""
    hist = np.bincount(np.asarray(counts, np.int64))
    cumsum = np.cumsum(hist)
    return int(np.sum(cumsum < keep_ratio * cumsum[-1]))


def _features(config: Config, task: str, points, extra, batch_index, num_clouds, seed):
    """Input features [N, in_features_dim] as the original builds them per dataset kind."""
    dim = config.dataset.in_features_dim
    ones = tf.ones_like(points[:, :1])
    if task in OBJECT_TASKS:
        if dim == 1:
            return ones
        if dim == 4:
            return tf.concat([ones, extra], 1)  # the (augmented) normals
        raise ValueError(f"dataset.in_features_dim must be 1 or 4 (ones, normals) for objects, got {dim}")
    columns = scene_feature_columns(dim)
    parts = {"ones": ones, "height": extra[:, 5:], "xyz": points}  # extra: rgb, absolute xyz
    if "rgb" in columns:
        parts["rgb"] = drop_colors(extra[:, :3], batch_index, num_clouds, config.augment.color, seed)
    return tf.concat([parts[c] for c in columns], 1)


class Pipeline:
    """Streams, calibration and tf.data datasets of one dataset under one config.

    ``config.dataset.num_classes`` and ``config.model.network_model`` must already describe the
    dataset (``training.datasets.configure``). Calibration results are cached on disk (keyed by the
    dataset, split, grid size, radii and batch_num) and exposed as ``batch_limit`` and
    ``neighbor_limits``.
    """

    def __init__(self, dataset, config: Config, calibration_split="train", verbose=False):
        self.data = dataset
        self.config = config
        self.task = dataset.task
        self.is_scene = isinstance(dataset, SceneDataset)
        self.calibration_split = calibration_split
        self.verbose = verbose
        self._batch_limit = None
        self._neighbor_limits = None

    # -- streams --------------------------------------------------------------------------------
    def stream(
        self,
        split: str,
        mode: str,
        seed: int = 0,
        count: int | None = None,
        batch_limit=None,
        start_pass: int | None = None,
    ):
        limit = batch_limit if batch_limit is not None else self.batch_limit
        if self.is_scene:
            return SceneStream(
                self.data, split, limit, mode, self.config.dataset.in_radius, seed, count, start_pass
            )
        return ObjectStream(self.data, split, limit, mode, seed, count, start_pass)

    # -- calibration ----------------------------------------------------------------------------
    def _cache_key(self) -> str:
        model = self.config.model
        spec = {
            "dataset": self.data.name,
            "identity": getattr(self.data, "cache_identity", lambda: None)(),
            "split": self.calibration_split,
            "dl": model.first_subsampling_dl,
            "in_radius": self.config.dataset.in_radius if self.is_scene else None,
            "radii": [[s.conv_radius, s.pool_radius, s.upsample_radius] for s in layer_specs(model)],
            "batch_num": self.config.train.batch_num,
            "density": model.density_parameter,
            "version": 1,
        }
        return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _cache_path(self):
        return cache_root() / "calibration" / f"{self.data.name}_{self._cache_key()}.json"

    def _load_cache(self):
        """The cached calibration values; {} when absent or unreadable (then deleted, after a warning)."""
        path = self._cache_path()
        if not path.exists():
            return {}
        try:
            with open(path) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"a JSON {type(values).__name__}, not an object")
            return values
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            discard_cache(path, err)
            return {}

    def _save_cache(self, values):
        path = self._cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(values, f)
        tmp.replace(path)

    @property
    def batch_limit(self) -> float:
        if self._batch_limit is None:
            cached = self._load_cache()
            if "batch_limit" in cached:
                self._batch_limit = float(cached["batch_limit"])
            else:
                stream = self.stream(self.calibration_split, "random", batch_limit=1.0)
                self._batch_limit = calibrate_batch_limit(
                    stream.sizes(), self.config.train.batch_num, self.config.train.seed
                )
                self._save_cache({**cached, "batch_limit": self._batch_limit})
        return self._batch_limit

    @property
    def neighbor_limits(self) -> list[int]:
        if self._neighbor_limits is None:
            cached = self._load_cache()
            if "neighbor_limits" in cached:
                self._neighbor_limits = [int(v) for v in cached["neighbor_limits"]]
            else:
                self._neighbor_limits = self.calibrate_neighbors()
                # Re-read: calibrating the neighbours may have just cached the batch limit.
                self._save_cache({**self._load_cache(), "neighbor_limits": self._neighbor_limits})
        return self._neighbor_limits

    def calibrate_neighbors(self, keep_ratio=0.8, samples_threshold=10000, max_batches=200) -> list[int]:
        """Per-layer widths keeping ``keep_ratio`` of the convolution neighbourhoods whole, from
        augmented training batches (at least ``samples_threshold`` rows per layer when available)."""
        num_layers = self.config.model.num_layers
        counts = [[] for _ in range(num_layers)]
        # Neighbourhoods larger than the original's bound cannot shape the 80% percentile.
        bound = int(math.ceil(4 / 3 * math.pi * (self.config.model.density_parameter + 1) ** 3))
        dataset = self.tf_dataset(
            self.stream(self.calibration_split, "random", self.config.train.seed),
            neighbor_limits=[bound] * num_layers,
            with_meta=False,
            seed=self.config.train.seed,
        )
        for index, (inputs, _) in enumerate(dataset):
            for l in range(num_layers):
                neighbors = inputs[layer_keys(l).neighbors].numpy()
                counts[l].append(np.sum(neighbors < neighbors.shape[0], axis=1))
            rows = min(sum(len(c) for c in layer) for layer in counts)
            if rows >= samples_threshold or index + 1 >= max_batches:
                break
        return [neighbor_histogram_limit(np.concatenate(c), keep_ratio) for c in counts]

    # -- tf.data --------------------------------------------------------------------------------
    def _signature(self):
        extra = 6 if self.is_scene else 3
        return Batch(
            points=tf.TensorSpec([None, 3], tf.float32),
            extra=tf.TensorSpec([None, extra], tf.float32),
            lengths=tf.TensorSpec([None], tf.int32),
            labels=tf.TensorSpec([None], tf.int32),
            object_labels=tf.TensorSpec([None], tf.int32),
            cloud_indices=tf.TensorSpec([None], tf.int32),
            point_indices=tf.TensorSpec([None], tf.int32),
            number=tf.TensorSpec([], tf.int64),
        )

    def map_batch(
        self, batch: dict[str, tf.Tensor], neighbor_limits, seed: int, with_meta: bool, augment: bool = True
    ):
        """The tf.data map: augmentation, features, pyramid. Returns (inputs, labels[, meta])."""
        config = self.config
        points, extra, lengths = batch["points"], batch["extra"], batch["lengths"]
        num_clouds = tf.shape(lengths)[0]
        batch_index = tf.repeat(tf.range(num_clouds), lengths)
        op_seed = tf.stack([tf.constant(seed, tf.int64), batch["number"]])
        normals = None if self.is_scene else extra
        if augment:
            points, normals, scales, rotations = augment_points(
                points, batch_index, num_clouds, config.augment, op_seed, normals=normals
            )
        else:
            scales, rotations = tf.ones([num_clouds, 3]), tf.eye(3, batch_shape=[num_clouds])
        if not self.is_scene:
            extra = normals
        features = _features(config, self.task, points, extra, batch_index, num_clouds, op_seed)
        inputs = build_pyramid(
            points, lengths, features, config.model, neighbor_limits, implementation=config.model.pyramid
        )
        if self.task == "multi_segmentation":
            inputs["object_labels"] = batch["object_labels"]
        if not with_meta:
            return inputs, batch["labels"]
        meta = {
            "cloud_indices": batch["cloud_indices"],
            "point_indices": batch["point_indices"],
            "scales": scales,
            "rotations": rotations,
            "batch_number": batch["number"],
        }
        return inputs, batch["labels"], meta

    def inputs_of(self, batch: Batch, augment: bool = False):
        """``(inputs, labels)`` of one stream batch (``map_batch`` called eagerly)."""
        tensors = {k: tf.convert_to_tensor(v) for k, v in batch.__dict__.items()}
        tensors["number"] = tf.constant(batch.number, tf.int64)
        seed = self.config.train.seed
        return self.map_batch(tensors, self.neighbor_limits, seed, with_meta=False, augment=augment)

    def tf_dataset(
        self,
        stream,
        neighbor_limits,
        with_meta,
        seed,
        start_batch=0,
        augment=True,
        parallel_calls=None,
        shard=(1, 0),
    ):
        """tf.data.Dataset over the batches of ``stream`` (an ObjectStream or SceneStream);
        ``shard`` ``(count, index)`` keeps batches ``index, index + count, ...`` only."""
        signature = self._signature()
        count, index = shard

        def generate():
            for number, batch in enumerate(stream.batches(start_batch)):
                if number % count == index:
                    yield batch.__dict__

        dataset = tf.data.Dataset.from_generator(generate, output_signature=signature.__dict__)
        calls = parallel_calls or tf.data.AUTOTUNE
        dataset = dataset.map(
            lambda b: self.map_batch(b, neighbor_limits, seed, with_meta, augment),
            num_parallel_calls=calls,
            deterministic=True,
        )
        return dataset.prefetch(tf.data.AUTOTUNE)

    def dataset(
        self,
        split: str,
        *,
        with_meta=False,
        seed: int | None = None,
        start_batch: int = 0,
        augment: bool = True,
        parallel_calls=None,
        mode: str | None = None,
        count: int | None = None,
        start_pass: int = 0,
        shard=(1, 0),
    ):
        """A tf.data.Dataset of ``(inputs, labels)`` (plus ``meta`` when ``with_meta``).

        split "train": endless random batches (``start_batch`` skips the first batches of the stream,
        for exact resume); "validation" / "test": objects by potentials (validation) or in order
        (test), scenes by potentials. ``seed`` defaults to ``train.seed``; test votes pass their own.
        Validation passes (one per iteration of the dataset) are numbered from ``start_pass``; pass k
        depends on the seed and k only, so a resumed run passes its epoch count.
        """
        seed = self.config.train.seed if seed is None else int(seed)
        stream = self._split_stream(split, seed, mode, count, start_pass)
        return self.tf_dataset(
            stream, self.neighbor_limits, with_meta, seed, start_batch, augment, parallel_calls, shard
        )

    def _split_stream(self, split, seed, mode=None, count=None, start_pass=0):
        """The stream of batches behind ``dataset(split, ...)``."""
        if mode is None:
            mode = "random" if split == "train" else ("sequential" if split == "test" else "potentials")
        data_split = split
        if not self.is_scene and split == "validation":
            data_split = "test"  # object datasets validate on their test split, as the original
        if count is None and mode == "potentials":
            count = self.config.dataset.validation_size * (
                1 if self.is_scene else self.config.train.batch_num
            )
        passes = start_pass if split == "validation" else None
        return self.stream(data_split, mode, seed, count, start_pass=passes)

    def validation_pass(self, index: int):
        """Validation pass ``index`` alone (``dataset("validation", start_pass=index)`` iterated
        once), with its number of batches known to tf.data (Keras then reads no more than it holds).
        Scenes: ``validation_size`` batches; objects: the pass's objects packed, counted here."""
        dataset = self.dataset("validation", start_pass=index)
        return dataset.apply(tf.data.experimental.assert_cardinality(self._pass_length(index)))

    def _pass_length(self, index: int) -> int:
        """Batches of validation pass ``index``."""
        if self.is_scene:
            return self.config.dataset.validation_size  # a scene pass stops at that many batches
        stream = self._split_stream("validation", self.config.train.seed, start_pass=index)
        return sum(1 for _ in stream.batches())

    def distributed_dataset(self, strategy, split: str = "train", start_step: int = 0, **kwargs):
        """The split for ``strategy`` (``tf.distribute``): each replica receives whole stacked
        batches of its own, taken in turn from its worker's input pipeline.

        "train": every pipeline builds its own stream, seeded apart (pipeline 0 with the seed of a
        single-device run); ``start_step`` skips the batches of that many steps (exact resume).
        Other splits: the pipelines share the split's batches (pipeline i takes every i-th).
        """
        base_seed = self.config.train.seed if kwargs.get("seed") is None else int(kwargs["seed"])
        kwargs = {k: v for k, v in kwargs.items() if k != "seed"}

        def make(context: tf.distribute.InputContext):
            replicas = context.num_replicas_in_sync // context.num_input_pipelines
            if split == "train":
                seed = base_seed + 100003 * context.input_pipeline_id
                return self.dataset(split, seed=seed, start_batch=start_step * replicas, **kwargs)
            shard = (context.num_input_pipelines, context.input_pipeline_id)
            return self.dataset(split, seed=base_seed, shard=shard, **kwargs)

        return strategy.distribute_datasets_from_function(make)

    def validation_steps(self, index: int, replicas: int = 1) -> int:
        """Steps of validation pass ``index`` on ``replicas`` replicas: its batch count // replicas
        (a pass of L batches runs ``replicas * (L // replicas)`` of them, at least one step)."""
        return max(1, self._pass_length(index) // replicas)
