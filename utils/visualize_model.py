"""What ``utils.visualize`` reads out of a trained network: inputs of chosen clouds, every block's
output with the points it lives on, every KPConv's neighbourhoods and (deformed) kernel points,
effective receptive fields, lost kernel points, and characteristic points of a cloud.

Block keys follow ``kpconv_tf.models.deformable_keys``: ``l3_0`` is encoder layer 3, block 0 of that
layer; ``u2_0`` decoder layer 2. A block's output lives on the points of layer ``level`` (a strided
or pooling block outputs on layer l + 1, an upsampling block on layer l - 1; ``global_average``
outputs one row per cloud, level None).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from kpconv_tf.architecture import LAYER_ENDING_KINDS, BlockSpec
from kpconv_tf.inputs import FEATURES, layer_keys
from kpconv_tf.layers import KPConv
from kpconv_tf.losses import deformation_statistics, nearest_squared_distances


@dataclass
class VisualRun:
    """A trained run ready to be looked at (``load_visual_run``)."""

    run_dir: Path
    config: object
    dataset: object
    network: object
    pipeline: object
    neighbor_limits: list[int]

    @property
    def is_scene(self) -> bool:
        return self.pipeline.is_scene

    @property
    def task(self) -> str:
        return self.pipeline.task


def load_visual_run(run_dir, checkpoint="last", overrides=()) -> VisualRun:
    """Config, dataset, network (weights of ``checkpoints/<checkpoint>``, else ``last``), a pipeline
    that keeps colours (no colour dropping: nothing is augmented here) and the run's neighbour limits
    (``calibration.json``, else the calibration cache)."""
    from training.pipeline import Pipeline
    from training.test import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run_dir} is not a directory")
    config, dataset, network = load_run(run_dir, overrides, checkpoint)
    view_config = copy.deepcopy(config)
    view_config.augment.color = 1.0
    pipeline = Pipeline(dataset, view_config)
    limits = None
    calibration = run_dir / "calibration.json"
    if calibration.is_file():
        limits = json.loads(calibration.read_text()).get("neighbor_limits")
    if not limits or len(limits) < config.model.num_layers:
        limits = pipeline.neighbor_limits
    return VisualRun(run_dir, config, dataset, network, pipeline, [int(v) for v in limits])


# ----------------------------------------------------------------------------------------------
# clouds and inputs


@dataclass
class Sample:
    """One cloud as the network sees it (not augmented).

    points float32 [n, 3] (scene spheres: relative to ``center``); extra float32 [n, 3 | 6] (normals,
    or colours + absolute xyz); label: class index (classification) or the object category;
    point_labels int32 [n] or None; name; source_indices int32 [n]: index of every point in its
    object / subsampled scene.
    """

    points: np.ndarray
    extra: np.ndarray
    label: int
    point_labels: np.ndarray | None
    name: str
    source_indices: np.ndarray
    center: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))


def split_size(run: VisualRun, split: str) -> int:
    items = run.dataset.scenes(split) if run.is_scene else run.dataset.clouds(split)
    return len(items)


def object_sample(run: VisualRun, split: str, index: int) -> Sample:
    clouds = run.dataset.clouds(split)
    if not 0 <= index < len(clouds):
        raise ValueError(f"--cloud {index} out of range: split {split!r} has {len(clouds)} clouds")
    cloud = clouds[index]
    normals = cloud.normals if cloud.normals is not None else np.zeros_like(cloud.points)
    name = cloud.name or f"{split}_{index}"
    return Sample(
        cloud.points.astype(np.float32),
        normals.astype(np.float32),
        int(cloud.label),
        None if cloud.point_labels is None else cloud.point_labels.astype(np.int32),
        name,
        np.arange(len(cloud.points), dtype=np.int32),
    )


def scene_sample(run: VisualRun, split: str, scene_index: int, center=None) -> Sample:
    """The input sphere (``dataset.in_radius``) of a scene around ``center`` (default: the point
    nearest the scene's bounding-box centre)."""
    scenes = run.dataset.scenes(split)
    if not 0 <= scene_index < len(scenes):
        raise ValueError(f"--cloud {scene_index} out of range: split {split!r} has {len(scenes)} scenes")
    scene = scenes[scene_index]
    if center is None:
        box_centre = 0.5 * (scene.points.min(0) + scene.points.max(0))
        center = scene.points[int(scene.tree.query(box_centre[None].astype(np.float64), k=1)[1][0, 0])]
    center = np.asarray(center, np.float64)
    indices = scene.tree.query_radius(center[None], r=run.config.dataset.in_radius)[0].astype(np.int32)
    if len(indices) == 0:
        raise ValueError(
            f"no point of scene {scene.name!r} within {run.config.dataset.in_radius} of {center}"
        )
    indices.sort()
    points = scene.points[indices]
    extra = np.concatenate([scene.colors[indices], points], 1).astype(np.float32)
    labels = None if scene.labels is None else scene.labels[indices].astype(np.int32)
    return Sample(
        (points - center).astype(np.float32), extra, 0, labels, scene.name, indices, center.astype(np.float32)
    )


def sample(run: VisualRun, split: str, index: int, center=None) -> Sample:
    if run.is_scene:
        return scene_sample(run, split, index, center)
    return object_sample(run, split, index)


def make_inputs(run: VisualRun, samples: list[Sample]):
    """The stacked input dict of ``samples`` (no augmentation) and the labels tensor."""
    if not samples:
        raise ValueError("samples must hold at least one cloud")
    segmentation = run.task != "classification"
    labels = (
        np.concatenate(
            [s.point_labels if s.point_labels is not None else np.full(len(s.points), -1) for s in samples]
        )
        if segmentation
        else np.array([s.label for s in samples])
    )
    batch = {
        "points": np.concatenate([s.points for s in samples]).astype(np.float32),
        "extra": np.concatenate([s.extra for s in samples]).astype(np.float32),
        "lengths": np.array([len(s.points) for s in samples], np.int32),
        "labels": labels.astype(np.int32),
        "object_labels": np.array([s.label for s in samples], np.int32),
        "cloud_indices": np.arange(len(samples), dtype=np.int32),
        "point_indices": np.concatenate([s.source_indices for s in samples]).astype(np.int32),
        "number": np.int64(0),
    }
    batch = {k: tf.convert_to_tensor(v) for k, v in batch.items()}
    return run.pipeline.map_batch(batch, run.neighbor_limits, seed=0, with_meta=False, augment=False)


# ----------------------------------------------------------------------------------------------
# blocks


@dataclass
class BlockInfo:
    spec: BlockSpec
    block: object

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def decoder(self) -> bool:
        return self.spec.decoder

    @property
    def level(self) -> int | None:
        """Pyramid layer of the block's output points; None for a per-cloud (global) output."""
        kind, layer = self.spec.kind, self.spec.layer
        if kind == "global":
            return None
        if kind == "upsample":
            return layer - 1
        return layer + 1 if kind in LAYER_ENDING_KINDS else layer


def blocks_of(network) -> list[BlockInfo]:
    """Every encoder then decoder block, with its spec."""
    return [BlockInfo(spec, block) for spec, block in network.blocks_with_specs()]


def find_block(network, key: str) -> BlockInfo:
    """The block called ``key`` (``l2_1``), ``last`` (last block with per-point outputs) or an index
    into ``blocks_of``; ValueError listing the keys otherwise."""
    infos = blocks_of(network)
    pointwise = [i for i in infos if i.level is not None]
    if key == "last":
        return pointwise[-1]
    for info in infos:
        if info.key == key:
            return info
    if str(key).lstrip("-").isdigit() and -len(infos) <= int(key) < len(infos):
        return infos[int(key)]
    described = ", ".join(f"{i.key} ({i.block.block_type})" for i in infos)
    raise ValueError(f"--layer {key!r} is not a block of this network; blocks: {described}, or 'last'")


def block_outputs(network, inputs, training=False):
    """{block key: output tensor} of one forward pass through the encoder (and decoder)."""
    outputs = network.run_blocks(inputs, training)[1]
    return {info.key: out for info, out in zip(blocks_of(network), outputs)}


@dataclass
class ConvRecord:
    """One KPConv of the last forward pass: kernel points relative to each query."""

    key: str
    conv: KPConv
    query_points: np.ndarray
    support_points: np.ndarray
    neighbors: np.ndarray
    deformed: np.ndarray | None  # [Nq, K, 3] (deformable), else None

    @property
    def rigid(self) -> np.ndarray:
        return self.conv.kernel_points.numpy()


@contextmanager
def recording_convs(network):
    """Records every KPConv call of the blocks (rigid and deformable) into the yielded list."""
    records = []
    patched = []
    for info in blocks_of(network):
        block = info.block
        original = block.run_kpconv

        def run(conv, features, inputs, *args, _block=block, _original=original, _key=info.key, **kwargs):
            query, support, neighbors = _block.conv_geometry(inputs, *args, **kwargs)
            deformed = None
            if conv.deformable:
                deformed = conv.kernel_points[None] + conv.offsets(query, support, neighbors, features)[1]
            records.append((_key, conv, query, support, neighbors, deformed))
            return _original(conv, features, inputs, *args, **kwargs)

        object.__setattr__(block, "run_kpconv", run)
        patched.append(block)
    try:
        yield records
    finally:
        for block in patched:
            object.__delattr__(block, "run_kpconv")


def kpconv_records(network, inputs) -> list[ConvRecord]:
    """Every KPConv of one inference pass, keyed by block (``/<conv name>`` when a block has more)."""
    with recording_convs(network) as raw:
        network(inputs, training=False)
    counts = {}
    for key, *_ in raw:
        counts[key] = counts.get(key, 0) + 1
    records = []
    for key, conv, query, support, neighbors, deformed in raw:
        name = key if counts[key] == 1 else f"{key}/{conv.name}"
        records.append(
            ConvRecord(
                name,
                conv,
                np.asarray(query),
                np.asarray(support),
                np.asarray(neighbors),
                None if deformed is None else np.asarray(deformed),
            )
        )
    return records


# ----------------------------------------------------------------------------------------------
# numbers


def lost_shares(kernel_points, query_points, support_points, neighbors, extent, rigid_kernel_points=None):
    """(per-query share of lost kernel points float32 [Nq], mean offset norm in extents, overall
    share): a kernel point is lost when no support point lies within ``extent`` of it.

    ``kernel_points`` [K, 3] (rigid, the same for every query) or [Nq, K, 3] (deformed), relative
    to the queries; offsets are measured from ``rigid_kernel_points`` [K, 3] (default: no offset).
    The rest as ``kpconv_tf.losses.nearest_squared_distances``.
    """
    kernel_points = tf.convert_to_tensor(kernel_points, tf.float32)
    query_points = tf.convert_to_tensor(query_points, tf.float32)
    rigid = kernel_points if rigid_kernel_points is None else rigid_kernel_points
    if kernel_points.shape.rank == 2:
        kernel_points = tf.broadcast_to(
            kernel_points[None], [tf.shape(query_points)[0], *kernel_points.shape]
        )
    nearest_d2 = nearest_squared_distances(kernel_points, query_points, support_points, neighbors)
    per_query = tf.reduce_mean(tf.cast(nearest_d2 >= extent**2, tf.float32), axis=1)
    offset_norm, share = deformation_statistics(kernel_points, rigid, nearest_d2, extent)
    return per_query.numpy(), float(offset_norm), float(share)


def erf_gradient(network, inputs, key: str, point: int, channel: int | None = None):
    """Effective receptive field: d response / d input features, float32 [N_0, D].

    The response is the output of block ``key`` at row ``point`` of its points: one ``channel``,
    or the sum over channels when None. Inference mode (batch-norm statistics fixed).
    """
    info = find_block(network, key)
    features = tf.convert_to_tensor(inputs[FEATURES])
    with tf.GradientTape() as tape:
        tape.watch(features)
        outputs = block_outputs(network, {**inputs, FEATURES: features})[info.key]
        rows = int(outputs.shape[0])
        if not 0 <= point < rows:
            raise ValueError(f"point {point} out of range: block {info.key} has {rows} rows")
        if channel is not None and not 0 <= channel < int(outputs.shape[1]):
            raise ValueError(
                f"--channel {channel} out of range: block {info.key} has {outputs.shape[1]} channels"
            )
        row = outputs[point]
        response = row[channel] if channel is not None else tf.reduce_sum(row)
    gradient = tape.gradient(response, features)
    if gradient is None:
        gradient = tf.zeros_like(features)
    return tf.convert_to_tensor(gradient).numpy(), float(response)


def nearest_rows(targets, sources, target_batch, source_batch):
    """For every target point, the index of its nearest source point of the same cloud: int64 [Nt]."""
    from sklearn.neighbors import KDTree

    targets, sources = np.asarray(targets, np.float64), np.asarray(sources, np.float64)
    target_batch, source_batch = np.asarray(target_batch), np.asarray(source_batch)
    result = np.zeros(len(targets), np.int64)
    for cloud in np.unique(target_batch):
        t_rows = np.flatnonzero(target_batch == cloud)
        s_rows = np.flatnonzero(source_batch == cloud)
        if len(s_rows) == 0:
            raise ValueError(f"cloud {cloud} has no point at the block's level")
        result[t_rows] = s_rows[KDTree(sources[s_rows]).query(targets[t_rows], k=1)[1][:, 0]]
    return result


def level_batch_index(inputs, level: int) -> np.ndarray:
    lengths = np.asarray(inputs[layer_keys(level).lengths])
    return np.repeat(np.arange(len(lengths)), lengths)


def to_input_points(inputs, values, level: int | None):
    """Values of one block's rows [N_level, ...] carried to the input points [N_0, ...] (each input
    point takes its nearest point of that level); ``level`` None: one row per cloud."""
    values = np.asarray(values)
    batch0 = level_batch_index(inputs, 0)
    if level is None:
        return values[batch0]
    if level == 0:
        return values
    rows = nearest_rows(
        np.asarray(inputs[layer_keys(0).points]),
        np.asarray(inputs[layer_keys(level).points]),
        batch0,
        level_batch_index(inputs, level),
    )
    return values[rows]


def characteristic_points(points, count: int, radius: float):
    """``count`` indices of points on corners, edges and planes, in turn ([(index, kind)]).

    Local covariance of the points within ``radius``, with eigenvalues l1 >= l2 >= l3: sphericity
    l3 / l1 marks corners, linearity (l1 - l2) / l1 edges, planarity (l2 - l3) / l1 planes. Picks
    are at least ``radius`` apart when the cloud allows it (else the spacing is relaxed).
    """
    from sklearn.neighbors import KDTree

    points = np.asarray(points, np.float64)
    if count < 1:
        raise ValueError(f"--auto must be >= 1, got {count}")
    if len(points) == 0:
        raise ValueError("the cloud has no points")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    neighbours = KDTree(points).query_radius(points, r=radius)
    rows = np.repeat(np.arange(len(points)), [len(n) for n in neighbours])
    columns = np.concatenate(neighbours)
    counts = np.bincount(rows, minlength=len(points)).astype(np.float64)
    mean = (
        np.stack([np.bincount(rows, points[columns, i], len(points)) for i in range(3)], 1) / counts[:, None]
    )
    centred = points[columns] - mean[rows]
    covariance = np.zeros((len(points), 3, 3))
    for i in range(3):
        for j in range(i, 3):
            covariance[:, i, j] = covariance[:, j, i] = (
                np.bincount(rows, centred[:, i] * centred[:, j], len(points)) / counts
            )
    eigen = np.linalg.eigvalsh(covariance)[:, ::-1]
    l1 = np.maximum(eigen[:, 0], 1e-12)
    few = counts < 4  # no shape to measure: never picked first
    scores = {
        "corner": eigen[:, 2] / l1,
        "edge": (eigen[:, 0] - eigen[:, 1]) / l1,
        "plane": (eigen[:, 1] - eigen[:, 2]) / l1,
    }
    orders = {kind: np.argsort(-np.where(few, -1.0, score), kind="stable") for kind, score in scores.items()}
    chosen, spacing = [], float(radius)
    while len(chosen) < min(count, len(points)):
        kind = list(scores)[len(chosen) % 3]
        taken = np.array([i for i, _ in chosen], np.int64)
        for index in orders[kind]:
            if index in taken:
                continue
            if len(taken) == 0 or np.min(np.linalg.norm(points[taken] - points[index], axis=1)) >= spacing:
                chosen.append((int(index), kind))
                break
        else:
            spacing *= 0.5  # small clouds: relax the spacing
    return chosen
