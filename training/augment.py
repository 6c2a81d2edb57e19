"""Per-cloud augmentation of stacked batches, as the original pipelines apply it, in TF.

Every random number comes from stateless ops seeded by ``(seed, batch_number)``, so a batch is
augmented identically whatever the number of parallel map calls, and an interrupted run resumes
with the same draws.
"""

from __future__ import annotations

import math

import tensorflow as tf

from kpconv_tf.config import AugmentConfig


def _rotations(rotation: str, num_clouds, seed):
    """[B, 3, 3] float32 rotation matrices (row-vector convention: p' = p @ R)."""
    if rotation == "none":
        return tf.eye(3, batch_shape=[num_clouds])
    theta = tf.random.stateless_uniform([num_clouds], seed, 0.0, 2 * math.pi)
    c, s = tf.cos(theta), tf.sin(theta)
    zero, one = tf.zeros_like(c), tf.ones_like(c)
    if rotation == "vertical":
        return tf.reshape(tf.stack([c, -s, zero, s, c, zero, zero, zero, one], 1), [-1, 3, 3])
    if rotation == "all":
        # Rodrigues' formula about an axis uniform on the sphere: a uniform random rotation when the
        # angle density is (1 - cos)/pi; the original's 'all' draws the angle uniformly, as here.
        axis = tf.random.stateless_normal([num_clouds, 3], seed + [0, 1])
        axis = axis / tf.maximum(tf.norm(axis, axis=1, keepdims=True), 1e-12)
        x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
        t = 1 - c
        matrix = tf.stack(
            [
                t * x * x + c,
                t * x * y - s * z,
                t * x * z + s * y,
                t * x * y + s * z,
                t * y * y + c,
                t * y * z - s * x,
                t * x * z - s * y,
                t * y * z + s * x,
                t * z * z + c,
            ],
            1,
        )
        return tf.transpose(tf.reshape(matrix, [-1, 3, 3]), [0, 2, 1])
    raise ValueError(f"augment.rotation must be 'vertical', 'all' or 'none', got {rotation!r}")


def augment_points(points, batch_index, num_clouds, config: AugmentConfig, seed, normals=None):
    """Rotates, scales (with symmetries) and noises every cloud of a stacked batch.

    Args:
        points: float32 [N, 3]; batch_index: int32 [N] cloud of every point; num_clouds: B.
        config: the augmentation section; seed: int32/int64 [2] stateless seed of this batch.
        normals: optional float32 [N, 3], rotated with the points and renormalised after scaling.

    Returns:
        (points [N, 3], normals or None, scales [B, 3], rotations [B, 3, 3]).
    """
    seed = tf.cast(seed, tf.int64)
    rotations = _rotations(config.rotation, num_clouds, seed)
    per_point_rotation = tf.gather(rotations, batch_index)
    points = tf.squeeze(tf.matmul(points[:, None, :], per_point_rotation), 1)
    width = 3 if config.scale_anisotropic else 1
    scales = tf.random.stateless_uniform(
        [num_clouds, width], seed + [0, 2], config.scale_min, config.scale_max
    )
    scales = tf.broadcast_to(scales, [num_clouds, 3])
    flips = []
    for axis, enabled in enumerate(config.symmetries):
        if enabled:
            coin = tf.random.stateless_uniform([num_clouds, 1], seed + [0, 3 + axis])
            flips.append(tf.round(coin) * 2 - 1)
        else:
            flips.append(tf.ones([num_clouds, 1]))
    scales = scales * tf.concat(flips, 1)
    per_point_scale = tf.gather(scales, batch_index)
    points = points * per_point_scale
    points = points + tf.random.stateless_normal(tf.shape(points), seed + [0, 7], stddev=config.noise)
    if normals is not None:
        normals = tf.squeeze(tf.matmul(normals[:, None, :], per_point_rotation), 1) / per_point_scale
        normals = normals / tf.maximum(tf.norm(normals, axis=1, keepdims=True), 1e-12)
    return points, normals, scales, rotations


def drop_colors(colors, batch_index, num_clouds, keep_probability, seed):
    """Zeroes the colours of each cloud with probability ``1 - keep_probability`` (float32 [N, C])."""
    seed = tf.cast(seed, tf.int64)
    keep = tf.cast(tf.random.stateless_uniform([num_clouds], seed + [0, 11]) < keep_probability, tf.float32)
    return colors * tf.gather(keep, batch_index)[:, None]
