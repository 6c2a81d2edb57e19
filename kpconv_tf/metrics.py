"""Segmentation and classification metrics: numpy functions and Keras metrics.

Confusion matrices are int64 ``[C, C]`` with rows = true class, columns = predicted class.

Mean IoU follows the original release (``IoU_from_confusions``): the mean runs over the classes
that occur in the ground truth. A class that is only predicted is left out of the mean (its false
positives already count as false negatives of the true classes). Per-class IoU is
``TP / (TP + FP + FN)``, NaN when the class occurs in neither labels nor predictions. Unlike the
original, no 1e-6 is added to denominators, so values are exact.

ShapeNetPart (``shape_part_ious``, ``part_segmentation_summary``): a shape's IoU is the mean of
its category's part IoUs; instance mIoU averages shapes, class mIoU averages the per-category
means (Table 1 of the paper).

Keras metrics (``ConfusionMatrixMetric``, ``ConfusionMeanIoU``, ``ConfusionAccuracy``) take int
labels ``y_true`` and logits or probabilities ``y_pred [..., C]``; they are named so as not to
clash with ``keras.metrics.MeanIoU`` / ``Accuracy``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

PART_IOU_CONVENTIONS = ("original", "pointnet")


def _integer_array(value, name):
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}")
    return array.astype(np.int64).reshape(-1)


def _check_num_classes(num_classes, name="num_classes"):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_confusion(conf):
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] == 0:
        raise ValueError(f"conf must be a square [C, C] matrix, got shape {conf.shape}")
    if not (np.issubdtype(conf.dtype, np.integer) or np.issubdtype(conf.dtype, np.floating)):
        raise ValueError(f"conf must hold counts, got dtype {conf.dtype}")
    if np.any(conf < 0):
        raise ValueError("conf must not hold negative counts")
    return conf.astype(np.float64)


def _ratio(numerator, denominator):
    """Elementwise numerator / denominator, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _json_float(value):
    value = float(value)
    return None if np.isnan(value) else value


def confusion_matrix(labels, predictions, num_classes, ignore_label=-1):
    """int64 [C, C] counts of (true, predicted) pairs.

    ``labels`` and ``predictions`` are integer arrays of the same shape. Points whose label equals
    ``ignore_label`` or is negative are dropped; predictions must lie in [0, C) and the remaining
    labels too.
    """
    num_classes = _check_num_classes(num_classes)
    labels_array = np.asarray(labels)
    predictions_array = np.asarray(predictions)
    if labels_array.shape != predictions_array.shape:
        raise ValueError(
            f"labels and predictions must have the same shape, got {labels_array.shape} "
            f"and {predictions_array.shape}"
        )
    labels_flat = _integer_array(labels_array, "labels")
    predictions_flat = _integer_array(predictions_array, "predictions")
    if predictions_flat.size and (predictions_flat.min() < 0 or predictions_flat.max() >= num_classes):
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), got values in "
            f"[{predictions_flat.min()}, {predictions_flat.max()}]"
        )
    keep = (labels_flat >= 0) & (labels_flat != ignore_label)
    labels_flat, predictions_flat = labels_flat[keep], predictions_flat[keep]
    if labels_flat.size and labels_flat.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (or be ignored), got {labels_flat.max()}")
    counts = np.bincount(labels_flat * num_classes + predictions_flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def overall_accuracy(conf):
    """Fraction of correctly classified points (float, NaN for an empty matrix)."""
    conf = _check_confusion(conf)
    return float(_ratio(np.trace(conf), conf.sum()))


def iou_per_class(conf):
    """float64 [C]: TP / (TP + FP + FN); NaN for classes absent from labels and predictions."""
    conf = _check_confusion(conf)
    true_positives = np.diag(conf)
    union = conf.sum(axis=1) + conf.sum(axis=0) - true_positives
    return _ratio(true_positives, union)


def mean_iou(conf):
    """Mean IoU over the classes present in the ground truth (the original's convention).

    NaN when no class is present.
    """
    conf = _check_confusion(conf)
    present = conf.sum(axis=1) > 0
    if not np.any(present):
        return float("nan")
    return float(np.mean(iou_per_class(conf)[present]))


def recall_per_class(conf):
    """float64 [C]: TP / (TP + FN); NaN for classes absent from the ground truth."""
    conf = _check_confusion(conf)
    return _ratio(np.diag(conf), conf.sum(axis=1))


def mean_recall(conf):
    """Mean recall over the classes present in the ground truth (NaN when none is)."""
    recalls = recall_per_class(conf)
    if np.all(np.isnan(recalls)):
        return float("nan")
    return float(np.nanmean(recalls))


def summarize(conf, class_names):
    """JSON-serialisable dict of the metrics of ``conf``; undefined values are None.

    Keys: ``overall_accuracy``, ``mean_iou``, ``mean_recall``, ``per_class_iou`` ({name: IoU}),
    ``confusion`` (list of lists, rows = true class) and ``class_names``.
    """
    conf = np.asarray(conf)
    _check_confusion(conf)
    class_names = [str(name) for name in class_names]
    if len(class_names) != conf.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names but conf has {conf.shape[0]} classes")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be unique, got {class_names}")
    ious = iou_per_class(conf)
    return {
        "overall_accuracy": _json_float(overall_accuracy(conf)),
        "mean_iou": _json_float(mean_iou(conf)),
        "mean_recall": _json_float(mean_recall(conf)),
        "per_class_iou": {name: _json_float(iou) for name, iou in zip(class_names, ious)},
        "confusion": np.rint(conf).astype(np.int64).tolist(),
        "class_names": class_names,
    }


def shape_part_ious(labels, predictions, num_parts, convention="original"):
    """Mean part IoU of one shape (float).

    ``labels`` and ``predictions`` are the shape's per-point part indices in [0, num_parts) of its
    category. ``convention="original"`` averages over the parts present in the labels (the
    original release); ``"pointnet"`` averages over all parts of the category, a part absent from
    both labels and predictions counting 1 (PointNet's evaluation).
    """
    if convention not in PART_IOU_CONVENTIONS:
        raise ValueError(f"convention must be one of {PART_IOU_CONVENTIONS}, got {convention!r}")
    num_parts = _check_num_classes(num_parts, "num_parts")
    labels_flat = _integer_array(labels, "labels")
    if labels_flat.size == 0:
        raise ValueError("labels must hold at least one point")
    if labels_flat.min() < 0:
        raise ValueError(f"labels must lie in [0, {num_parts}), got {labels_flat.min()}")
    conf = confusion_matrix(labels, predictions, num_parts)
    if convention == "original":
        return mean_iou(conf)
    ious = iou_per_class(conf)
    return float(np.mean(np.where(np.isnan(ious), 1.0, ious)))


def part_segmentation_summary(shape_ious, shape_categories, category_names):
    """Instance and class mIoU of ShapeNetPart-style results.

    ``shape_ious`` float [S] (one ``shape_part_ious`` per shape), ``shape_categories`` int [S]
    indices into ``category_names``. Returns ``instance_miou`` (mean over shapes), ``class_miou``
    (mean over the categories that have shapes of their mean) and ``per_category_miou``
    ({name: float, or None for a category without shapes}).
    """
    shape_ious = np.asarray(shape_ious, np.float64).reshape(-1)
    categories = _integer_array(shape_categories, "shape_categories")
    category_names = [str(name) for name in category_names]
    if categories.shape != shape_ious.shape:
        raise ValueError(
            f"shape_categories has {categories.size} entries but shape_ious has {shape_ious.size}"
        )
    if shape_ious.size == 0:
        raise ValueError("shape_ious must hold at least one shape")
    if np.any(np.isnan(shape_ious)):
        raise ValueError("shape_ious must not hold NaN")
    if categories.min() < 0 or categories.max() >= len(category_names):
        raise ValueError(
            f"shape_categories must lie in [0, {len(category_names)}), got values in "
            f"[{categories.min()}, {categories.max()}]"
        )
    per_category = {}
    for index, name in enumerate(category_names):
        members = shape_ious[categories == index]
        per_category[name] = float(np.mean(members)) if members.size else None
    present = [value for value in per_category.values() if value is not None]
    return {
        "instance_miou": float(np.mean(shape_ious)),
        "class_miou": float(np.mean(present)),
        "per_category_miou": per_category,
    }


@keras.saving.register_keras_serializable(package="kpconv_tf")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates an int64 [C, C] confusion matrix; ``result()`` returns it.

    ``update_state(y_true, y_pred)``: ``y_true`` int [...] labels, ``y_pred`` [..., C] logits or
    probabilities (argmax is taken). Labels equal to ``ignore_label`` or negative are skipped.
    Out-of-range labels raise ``InvalidArgumentError``.
    """

    def __init__(self, num_classes, ignore_label=-1, name="confusion_matrix", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_label = int(ignore_label)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="int64", name="confusion"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__} does not support sample_weight")
        y_pred = tf.convert_to_tensor(y_pred)
        if (
            y_pred.shape.rank is not None
            and y_pred.shape[-1] is not None
            and y_pred.shape[-1] != self.num_classes
        ):
            raise ValueError(
                f"y_pred must have {self.num_classes} classes in its last axis, got shape {y_pred.shape}"
            )
        labels = tf.reshape(tf.cast(y_true, tf.int64), [-1])
        predictions = tf.argmax(tf.reshape(y_pred, [-1, self.num_classes]), axis=-1, output_type=tf.int64)
        tf.debugging.assert_equal(
            tf.size(labels, out_type=tf.int64),
            tf.size(predictions, out_type=tf.int64),
            message="y_true must have one label per row of y_pred",
        )
        keep = tf.logical_and(labels >= 0, tf.not_equal(labels, self.ignore_label))
        tf.debugging.assert_less(
            tf.where(keep, labels, 0),
            tf.constant(self.num_classes, tf.int64),
            message=f"y_true must lie in [0, {self.num_classes}) or be ignored",
        )
        # Ignored points go to one extra segment that is dropped: static shapes, so XLA compiles it.
        num_pairs = self.num_classes * self.num_classes
        pair_index = tf.where(keep, labels * self.num_classes + predictions, num_pairs)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(pair_index), pair_index, num_pairs + 1)
        self.confusion.assign_add(tf.reshape(counts[:num_pairs], [self.num_classes, self.num_classes]))

    def result(self):
        return tf.convert_to_tensor(self.confusion)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "ignore_label": self.ignore_label})
        return config


@keras.saving.register_keras_serializable(package="kpconv_tf")
class ConfusionMeanIoU(ConfusionMatrixMetric):
    """Mean IoU of the accumulated confusion matrix, as ``mean_iou`` (classes present in the labels)."""

    def __init__(self, num_classes, ignore_label=-1, name="mean_iou", dtype=None):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, dtype=dtype)

    def result(self):
        return self.of(self.confusion)

    def of(self, confusion):
        """The mean IoU of a [C, C] confusion matrix (e.g. one summed over replicas), as ``dtype``."""
        conf = tf.cast(confusion, tf.float64)
        true_positives = tf.linalg.diag_part(conf)
        support = tf.reduce_sum(conf, axis=1)
        union = support + tf.reduce_sum(conf, axis=0) - true_positives
        present = support > 0
        ious = tf.math.divide_no_nan(true_positives, union)
        value = tf.reduce_sum(tf.where(present, ious, 0.0)) / tf.reduce_sum(tf.cast(present, tf.float64))
        return tf.cast(value, self.dtype)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class ConfusionAccuracy(ConfusionMatrixMetric):
    """Overall accuracy of the accumulated confusion matrix (ignored labels skipped)."""

    def __init__(self, num_classes, ignore_label=-1, name="overall_accuracy", dtype=None):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, dtype=dtype)

    def result(self):
        conf = tf.cast(self.confusion, tf.float64)
        return tf.cast(tf.linalg.trace(conf) / tf.reduce_sum(conf), self.dtype)
