"""kpconv_tf.metrics against scikit-learn and hand-checked part-segmentation cases."""

import json

import keras
import numpy as np
import pytest
import sklearn.metrics as skm
import tensorflow as tf

from kpconv_tf import metrics

pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")


def random_case(seed, num_classes=6, size=400, ignore_label=-1):
    """Labels with one class only predicted and the last class absent everywhere; some labels ignored."""
    rng = np.random.default_rng(seed)
    present = rng.choice(num_classes - 1, size=num_classes - 2, replace=False)
    labels = rng.choice(present, size=size)
    predictions = np.where(rng.random(size) < 0.6, labels, rng.integers(0, num_classes - 1, size))
    dropped = rng.random(size) < 0.1
    labels = np.where(dropped, ignore_label, labels)
    labels[rng.random(size) < 0.05] = -3  # any negative label is dropped too
    return labels.astype(np.int32), predictions.astype(np.int64)


def kept(labels, predictions, ignore_label=-1):
    mask = (labels >= 0) & (labels != ignore_label)
    return labels[mask], predictions[mask]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ignore_label", [-1, 2])
def test_numpy_metrics_match_sklearn(seed, ignore_label):
    num_classes = 6
    labels, predictions = random_case(seed, num_classes, ignore_label=ignore_label)
    true, pred = kept(labels, predictions, ignore_label)
    classes = np.arange(num_classes)
    conf = metrics.confusion_matrix(labels, predictions, num_classes, ignore_label=ignore_label)

    assert conf.dtype == np.int64 and conf.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(conf, skm.confusion_matrix(true, pred, labels=classes))
    assert metrics.overall_accuracy(conf) == pytest.approx(skm.accuracy_score(true, pred), abs=1e-15)

    ious = metrics.iou_per_class(conf)
    absent_both = ~np.isin(classes, true) & ~np.isin(classes, pred)
    assert absent_both[-1] and np.array_equal(np.isnan(ious), absent_both)
    expected_ious = skm.jaccard_score(true, pred, labels=classes, average=None, zero_division=0)
    np.testing.assert_allclose(ious[~absent_both], expected_ious[~absent_both], rtol=1e-14)

    present = np.unique(true)
    assert len(present) < num_classes  # the case exercises absent classes
    assert metrics.mean_iou(conf) == pytest.approx(
        skm.jaccard_score(true, pred, labels=present, average="macro"), rel=1e-14
    )

    expected_recalls = skm.recall_score(true, pred, labels=classes, average=None, zero_division=np.nan)
    np.testing.assert_allclose(metrics.recall_per_class(conf), expected_recalls, rtol=1e-14, equal_nan=True)
    assert metrics.mean_recall(conf) == pytest.approx(
        skm.recall_score(true, pred, labels=present, average="macro"), rel=1e-14
    )
    assert metrics.mean_recall(conf) == pytest.approx(skm.balanced_accuracy_score(true, pred), rel=1e-14)


def test_predicted_only_class_is_left_out_of_mean_iou():
    # Class 2 never occurs in the labels: IoU 0, not counted in the mean (the original's rule).
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 2, 1, 1])
    conf = metrics.confusion_matrix(labels, predictions, 4)
    ious = metrics.iou_per_class(conf)
    np.testing.assert_allclose(ious[:3], [0.5, 1.0, 0.0])
    assert np.isnan(ious[3])
    assert metrics.mean_iou(conf) == pytest.approx(0.75)
    assert metrics.mean_recall(conf) == pytest.approx(0.75)
    assert metrics.overall_accuracy(conf) == pytest.approx(0.75)


def test_empty_confusion_gives_nan():
    conf = metrics.confusion_matrix(np.array([-1, -1]), np.array([0, 1]), 3)
    assert conf.sum() == 0
    assert np.isnan(metrics.overall_accuracy(conf))
    assert np.isnan(metrics.mean_iou(conf))
    assert np.isnan(metrics.mean_recall(conf))
    summary = metrics.summarize(conf, ["a", "b", "c"])
    assert summary["mean_iou"] is None and summary["per_class_iou"] == {"a": None, "b": None, "c": None}


@pytest.mark.parametrize(
    "labels, predictions, num_classes, match",
    [
        (np.array([0, 1]), np.array([0, 1, 1]), 3, "same shape"),
        (np.array([0, 1]), np.array([0, 3]), 3, "predictions"),
        (np.array([0, 1]), np.array([0, -1]), 3, "predictions"),
        (np.array([0, 5]), np.array([0, 1]), 3, "labels"),
        (np.array([0.0, 1.0]), np.array([0, 1]), 3, "labels"),
        (np.array([0, 1]), np.array([0.0, 1.0]), 3, "predictions"),
        (np.array([0, 1]), np.array([0, 1]), 0, "num_classes"),
        (np.array([0, 1]), np.array([0, 1]), 2.0, "num_classes"),
    ],
)
def test_confusion_matrix_rejects_bad_input(labels, predictions, num_classes, match):
    with pytest.raises(ValueError, match=match):
        metrics.confusion_matrix(labels, predictions, num_classes)


def test_confusion_consumers_reject_bad_matrices():
    with pytest.raises(ValueError, match="conf"):
        metrics.mean_iou(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="conf"):
        metrics.overall_accuracy(np.array([[1, -1], [0, 2]]))
    with pytest.raises(ValueError, match="class_names"):
        metrics.summarize(np.eye(3, dtype=np.int64), ["a", "b"])


def test_summarize_is_json_serialisable():
    labels, predictions = random_case(11, num_classes=5)
    conf = metrics.confusion_matrix(labels, predictions, 5)
    names = ["ground", "wall", "door", "table", "chair"]
    summary = json.loads(json.dumps(metrics.summarize(conf, names), allow_nan=False))
    assert summary["overall_accuracy"] == pytest.approx(metrics.overall_accuracy(conf))
    assert summary["mean_iou"] == pytest.approx(metrics.mean_iou(conf))
    assert summary["mean_recall"] == pytest.approx(metrics.mean_recall(conf))
    assert summary["confusion"] == conf.tolist()
    assert summary["class_names"] == names
    ious = metrics.iou_per_class(conf)
    for name, iou in zip(names, ious):
        assert summary["per_class_iou"][name] == (None if np.isnan(iou) else pytest.approx(iou))


def batches(seed, num_classes, count=4):
    rng = np.random.default_rng(seed)
    for size in rng.integers(1, 300, count):
        labels = rng.integers(-1, num_classes, size).astype(np.int32)
        logits = rng.normal(size=(size, num_classes)).astype(np.float32)
        yield labels, logits


@pytest.mark.parametrize("seed", range(3))
def test_keras_metrics_match_numpy_over_several_updates(seed):
    num_classes = 5
    confusion = metrics.ConfusionMatrixMetric(num_classes)
    miou = metrics.ConfusionMeanIoU(num_classes)
    accuracy = metrics.ConfusionAccuracy(num_classes)
    all_labels, all_predictions = [], []
    for labels, logits in batches(seed, num_classes):
        for metric in (confusion, miou, accuracy):
            metric.update_state(labels, logits)
        all_labels.append(labels)
        all_predictions.append(np.argmax(logits, axis=1))
    expected = metrics.confusion_matrix(
        np.concatenate(all_labels), np.concatenate(all_predictions), num_classes
    )
    np.testing.assert_array_equal(confusion.result().numpy(), expected)
    assert float(miou.result()) == pytest.approx(metrics.mean_iou(expected), rel=1e-6)
    assert float(accuracy.result()) == pytest.approx(metrics.overall_accuracy(expected), rel=1e-6)

    miou.reset_state()
    assert int(tf.reduce_sum(miou.confusion)) == 0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_metric_inside_tf_function_with_ignore_label(jit_compile):
    num_classes = 4
    metric = metrics.ConfusionMeanIoU(num_classes, ignore_label=0)

    @tf.function(jit_compile=jit_compile)
    def update(labels, logits):
        metric.update_state(labels, logits)

    all_labels, all_predictions = [], []
    for labels, logits in batches(7, num_classes, count=3):
        # [N, 1] labels and [N, 1, C] logits are flattened the same way.
        update(tf.constant(labels[:, None]), tf.constant(logits[:, None, :]))
        all_labels.append(labels)
        all_predictions.append(np.argmax(logits, axis=1))
    expected = metrics.confusion_matrix(
        np.concatenate(all_labels), np.concatenate(all_predictions), num_classes, ignore_label=0
    )
    assert expected[0].sum() == 0
    np.testing.assert_array_equal(metric.confusion.numpy(), expected)
    assert float(metric.result()) == pytest.approx(metrics.mean_iou(expected), rel=1e-6)


def test_keras_metrics_in_model_evaluate():
    num_classes = 3
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(-1, num_classes, 64).astype(np.int32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(num_classes)])
    model.compile(
        loss=lambda y_true, y_pred: keras.ops.mean(y_pred**2),
        metrics=[metrics.ConfusionMeanIoU(num_classes), metrics.ConfusionAccuracy(num_classes)],
    )
    results = model.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    predictions = np.argmax(model.predict(x, verbose=0), axis=1)
    expected = metrics.confusion_matrix(y, predictions, num_classes)
    assert results["mean_iou"] == pytest.approx(metrics.mean_iou(expected), rel=1e-6)
    assert results["overall_accuracy"] == pytest.approx(metrics.overall_accuracy(expected), rel=1e-6)


def test_keras_metric_rejects_bad_input():
    metric = metrics.ConfusionAccuracy(3)
    with pytest.raises(ValueError, match="y_pred"):
        metric.update_state(np.array([0, 1]), np.zeros((2, 4), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="y_true"):
        metric.update_state(np.array([0, 3]), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="sample_weight"):
        metric.update_state(np.array([0, 1]), np.zeros((2, 3), np.float32), sample_weight=np.ones(2))
    with pytest.raises(ValueError, match="num_classes"):
        metrics.ConfusionMeanIoU(0)


@pytest.mark.parametrize(
    "cls", [metrics.ConfusionMatrixMetric, metrics.ConfusionMeanIoU, metrics.ConfusionAccuracy]
)
def test_keras_metric_serialization_round_trip(cls):
    metric = cls(7, ignore_label=3, name="custom")
    config = keras.saving.serialize_keras_object(metric)
    assert config["registered_name"] == f"kpconv_tf>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)))
    assert type(restored) is cls
    assert restored.get_config() == metric.get_config()
    assert (restored.num_classes, restored.ignore_label, restored.name) == (7, 3, "custom")


def test_shape_part_ious_hand_cases():
    labels = np.array([0, 0, 0, 1, 1, 1])
    predictions = np.array([0, 0, 1, 1, 1, 2])
    # part 0: I=2, U=3; part 1: I=2, U=4; part 2: only predicted (IoU 0); part 3 absent.
    assert metrics.shape_part_ious(labels, predictions, 4) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics.shape_part_ious(labels, predictions, 4, convention="pointnet") == pytest.approx(
        (2 / 3 + 1 / 2 + 0 + 1) / 4
    )
    perfect = np.array([1, 1, 2])
    assert metrics.shape_part_ious(perfect, perfect, 3) == 1.0
    assert metrics.shape_part_ious(perfect, perfect, 3, convention="pointnet") == 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.shape_part_ious(np.array([-1, 0]), np.array([0, 0]), 2)
    with pytest.raises(ValueError, match="predictions"):
        metrics.shape_part_ious(np.array([1, 0]), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="convention"):
        metrics.shape_part_ious(perfect, perfect, 3, convention="mean")


def test_part_segmentation_summary():
    summary = metrics.part_segmentation_summary(
        [1.0, 0.5, 0.6, 0.9], np.array([0, 0, 0, 2]), ["airplane", "bag", "cap"]
    )
    assert summary["instance_miou"] == pytest.approx(0.75)
    assert summary["per_category_miou"] == {
        "airplane": pytest.approx(0.7),
        "bag": None,
        "cap": pytest.approx(0.9),
    }
    assert summary["class_miou"] == pytest.approx(0.8)
    json.dumps(summary, allow_nan=False)
    with pytest.raises(ValueError, match="shape_categories"):
        metrics.part_segmentation_summary([1.0], [3], ["a", "b"])
    with pytest.raises(ValueError, match="shape_categories"):
        metrics.part_segmentation_summary([1.0, 0.5], [0], ["a"])
