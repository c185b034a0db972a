"""Segmentation metrics: confusion matrix, IoU/accuracy/kappa/dice, and the printed report."""
import math
import re

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emanet.engine.metrics import SegMetrics, confusion_matrix, format_report

# 3 classes, one ignored pixel (its prediction 2 must not count).
LABEL = np.array([[0, 0, 1, 1],
                  [2, 2, 255, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 2, 0]])
# Rows = ground truth, columns = prediction.
CONFUSION = np.array([[2, 1, 0],
                      [0, 2, 0],
                      [1, 0, 1]])
# TP = [2, 2, 1], FP = [1, 1, 0], FN = [1, 0, 1]; 7 valid pixels.
CLASS_IOU = [2 / 4, 2 / 3, 1 / 2]
CLASS_PRECISION = [2 / 3, 2 / 3, 1 / 1]
CLASS_RECALL = [2 / 3, 2 / 2, 1 / 2]
CLASS_DICE = [4 / 6, 4 / 5, 2 / 3]  # 2TP / (2TP + FP + FN)
ACC = 5 / 7
# Chance agreement = sum(predicted * actual) / 7^2 = (3*3 + 3*2 + 1*2) / 49 = 17/49.
KAPPA = (5 / 7 - 17 / 49) / (1 - 17 / 49)


def test_confusion_matrix_counts_gt_rows_and_prediction_columns_skipping_ignored():
    matrix = confusion_matrix(PRED, LABEL, num_classes=3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, CONFUSION)


def test_every_metric_matches_the_hand_computed_example():
    metrics = SegMetrics(num_classes=3, class_names=['road', 'car', 'sky'])
    metrics.update(PRED, LABEL)
    result = metrics.compute()
    assert result['class_iou'] == pytest.approx(CLASS_IOU)
    assert result['class_precision'] == pytest.approx(CLASS_PRECISION)
    assert result['class_recall'] == pytest.approx(CLASS_RECALL)
    assert result['class_dice'] == pytest.approx(CLASS_DICE)
    assert result['miou'] == pytest.approx(np.mean(CLASS_IOU))
    assert result['dice'] == pytest.approx(np.mean(CLASS_DICE))
    assert result['acc'] == pytest.approx(ACC)
    assert result['kappa'] == pytest.approx(KAPPA)
    assert result['kappa'] == pytest.approx(0.5625)
    assert result['num_images'] == 1
    assert result['class_names'] == ['road', 'car', 'sky']
    assert all(type(result[key]) is float for key in ('miou', 'acc', 'kappa', 'dice'))
    assert all(type(value) is float for value in result['class_iou'])


def test_a_class_absent_from_labels_and_predictions_is_nan_and_left_out_of_the_mean():
    metrics = SegMetrics(num_classes=4)
    metrics.update(PRED, LABEL)
    result = metrics.compute()
    assert math.isnan(result['class_iou'][3])
    assert math.isnan(result['class_precision'][3])
    assert math.isnan(result['class_recall'][3])
    assert math.isnan(result['class_dice'][3])
    assert result['miou'] == pytest.approx(np.mean(CLASS_IOU))
    assert result['dice'] == pytest.approx(np.mean(CLASS_DICE))


def test_a_class_only_predicted_or_only_labelled_scores_zero_and_counts_in_the_mean():
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 2, 2])
    metrics = SegMetrics(num_classes=3)
    metrics.update(pred, label)
    result = metrics.compute()
    assert result['class_iou'] == [1.0, 0.0, 0.0]
    assert result['miou'] == pytest.approx(1 / 3)
    assert math.isnan(result['class_precision'][1])  # never predicted
    assert math.isnan(result['class_recall'][2])  # never labelled


def test_out_of_range_label_names_the_values_and_num_classes():
    label = np.array([0, 7, 9, 255, 7])
    with pytest.raises(ValueError, match=re.escape(
            'label values [7, 9] are outside [0, 5) and are not the ignore index 255')):
        confusion_matrix(np.zeros(5, dtype=np.int64), label, num_classes=5)


def test_out_of_range_prediction_is_refused_rather_than_counted_in_another_class():
    with pytest.raises(ValueError, match=re.escape('pred values [3] are outside [0, 3)')):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), num_classes=3)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=re.escape('(2, 4)') + '.*' + re.escape('(1, 2, 4)')):
        confusion_matrix(np.zeros([2, 4]), np.zeros([1, 2, 4]), num_classes=3)


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match='2 class names given for 3 classes'):
        SegMetrics(num_classes=3, class_names=['a', 'b'])


def test_updates_accumulate_like_one_update_on_the_concatenation():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, size=[2, 5, 6]) for _ in range(3)]
    preds = [rng.integers(0, 4, size=[2, 5, 6]) for _ in range(3)]
    for label in labels:
        label[0, 0, :3] = 255

    accumulated = SegMetrics(num_classes=4)
    for pred, label in zip(preds, labels):
        accumulated.update(pred, label)
    at_once = SegMetrics(num_classes=4)
    at_once.update(np.concatenate(preds), np.concatenate(labels))

    np.testing.assert_array_equal(accumulated.confusion, at_once.confusion)
    assert accumulated.compute() == at_once.compute()
    assert accumulated.num_images == 6


def test_paddle_tensors_are_accepted_and_count_images_by_batch_size():
    metrics = SegMetrics(num_classes=3)
    label = paddle.to_tensor(np.stack([LABEL, LABEL])[:, None], dtype='int64')  # [2, 1, 2, 4]
    pred = paddle.to_tensor(np.stack([PRED, PRED])[:, None], dtype='int32')
    metrics.update(pred, label)
    metrics.update(PRED, LABEL)  # a single [H, W] map is one image
    np.testing.assert_array_equal(metrics.confusion, 3 * CONFUSION)
    assert metrics.num_images == 3


def test_report_starts_with_paddleseg_grepable_line_then_aligned_class_table():
    metrics = SegMetrics(num_classes=3, class_names=['road', 'car', 'sky'])
    metrics.update(PRED[None], LABEL[None])
    metrics.update(PRED[None], LABEL[None])
    lines = format_report(metrics.compute()).splitlines()
    assert re.fullmatch(r'\[EVAL\] #Images: 2 mIoU: 0\.5556 Acc: 0\.7143 Kappa: 0\.5625 Dice: 0\.7111',
                        lines[0])
    header, rows = lines[1], lines[2:]
    assert header.split() == ['Class', 'Name', 'IoU', 'Precision', 'Recall']
    assert rows[0].split() == ['0', 'road', '0.5000', '0.6667', '0.6667']
    assert rows[2].split() == ['2', 'sky', '0.5000', '1.0000', '0.5000']
    for column in ('IoU', 'Precision', 'Recall'):
        start = header.index(column)
        assert all(re.match(r'\d\.\d{4}', row[start:]) for row in rows)


def test_report_without_class_names_has_no_name_column():
    metrics = SegMetrics(num_classes=3)
    metrics.update(PRED, LABEL)
    assert format_report(metrics.compute()).splitlines()[1].split() == ['Class', 'IoU', 'Precision', 'Recall']


def test_report_prints_undefined_scores_as_dashes_and_marks_absent_classes():
    metrics = SegMetrics(num_classes=5, class_names=['road', 'car', 'sky', 'bus', 'train'])
    metrics.update(np.array([0, 0, 2, 2]), np.array([0, 0, 3, 3]))  # bus labelled, never predicted
    report = format_report(metrics.compute())
    rows = report.splitlines()[2:]
    assert 'nan' not in report
    assert rows[1].split() == ['1', 'car', '-', '-', '-', 'absent']
    assert rows[3].split() == ['3', 'bus', '0.0000', '-', '0.0000']
    assert rows[4].split() == ['4', 'train', '-', '-', '-', 'absent']


def test_report_note_ends_the_summary_line():
    metrics = SegMetrics(num_classes=3)
    metrics.update(PRED, LABEL)
    summary = format_report(dict(metrics.compute(), note='exported model: test_config flip not applied'))
    assert summary.splitlines()[0].endswith('Dice: 0.7111 (exported model: test_config flip not applied)')


@st.composite
def label_maps(draw):
    num_classes = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=6))
    label = draw(hnp.arrays(np.int64, shape, elements=st.sampled_from(list(range(num_classes)) + [255])))
    pred = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, num_classes - 1)))
    return num_classes, pred, label


@settings(max_examples=60, deadline=None)
@given(label_maps())
def test_confusion_matrix_counts_every_valid_pixel_once_and_miou_is_a_fraction(case):
    num_classes, pred, label = case
    metrics = SegMetrics(num_classes)
    metrics.update(pred, label)
    assert metrics.confusion.sum() == np.count_nonzero(label != 255)
    np.testing.assert_array_equal(metrics.confusion.sum(axis=1),
                                  np.bincount(label[label != 255], minlength=num_classes))
    miou = metrics.compute()['miou']
    if (label != 255).any():
        assert 0.0 <= miou <= 1.0
    else:
        assert math.isnan(miou)
