"""Segmentation metrics from a confusion matrix, replacing PaddleSeg's (its ``calculate_area`` fails on Paddle 3).

A class absent from both the labels and the predictions has an undefined IoU. It is
reported as NaN and left out of the mean, as the official Cityscapes evaluator does
(PaddleSeg counted it as 0, which lowers mIoU on subsets that miss a class).
"""
import math

import numpy as np
import paddle

from emanet.engine.distributed import sum_over_processes
from emanet.errors import InvalidInput


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """Count pixels by (ground-truth class, predicted class), skipping pixels labelled ``ignore_index``.

    Args:
        pred, label: integer arrays of the same shape (any shape).

    Returns:
        np.int64 array [num_classes, num_classes]; row = ground truth, column = prediction.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {pred.shape} does not match label shape {label.shape}")
    valid = label != ignore_index
    label = label[valid].astype(np.int64)
    pred = pred[valid].astype(np.int64)
    _check_range(label, num_classes, f"label values {{}} are outside [0, {num_classes}) "
                                     f"and are not the ignore index {ignore_index}")
    # An out-of-range prediction would be counted in a neighbouring row, so refuse it too.
    _check_range(pred, num_classes, f"pred values {{}} are outside [0, {num_classes})")
    pair_index = label * num_classes + pred
    counts = np.bincount(pair_index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_range(values, num_classes, message):
    outside = (values < 0) | (values >= num_classes)
    if outside.any():
        raise ValueError(message.format(np.unique(values[outside]).tolist()))


class SegMetrics:
    """Accumulates a confusion matrix over batches and derives mIoU, accuracy, kappa and dice from it.

    ``num_images`` counts images: a 3-D or 4-D label ([N, H, W] or [N, 1, H, W]) adds its
    first dimension N, any other label (e.g. a single [H, W] map) adds 1.
    """

    def __init__(self, num_classes, ignore_index=255, class_names=None):
        if class_names is not None and len(class_names) != num_classes:
            raise InvalidInput(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion = np.zeros([num_classes, num_classes], dtype=np.int64)
        self.num_images = 0

    def update(self, pred, label):
        """Add a prediction and its label (numpy arrays or paddle Tensors of the same shape)."""
        pred = _to_numpy(pred)
        label = _to_numpy(label)
        self.confusion += confusion_matrix(pred, label, self.num_classes, self.ignore_index)
        self.num_images += label.shape[0] if label.ndim in (3, 4) else 1

    def sum_over_processes(self):
        """Add up every data-parallel process's confusion matrix and image count (exact: integers)."""
        totals = sum_over_processes(np.append(self.confusion.reshape(-1), self.num_images))
        self.confusion = totals[:-1].reshape(self.num_classes, self.num_classes)
        self.num_images = int(totals[-1])

    def compute(self):
        """Metrics of everything seen so far, as JSON-serialisable python floats and lists (NaN = undefined)."""
        confusion = self.confusion.astype(np.float64)
        true_positive = np.diag(confusion)  # [num_classes]
        predicted = confusion.sum(axis=0)  # [num_classes]
        actual = confusion.sum(axis=1)  # [num_classes]
        false_positive = predicted - true_positive
        false_negative = actual - true_positive
        total = confusion.sum()

        class_iou = _divide(true_positive, true_positive + false_positive + false_negative)
        class_precision = _divide(true_positive, predicted)
        class_recall = _divide(true_positive, actual)
        class_dice = _divide(2 * true_positive, 2 * true_positive + false_positive + false_negative)

        accuracy = _divide(true_positive.sum(), total)
        chance_agreement = _divide((predicted * actual).sum(), total * total)
        kappa = _divide(accuracy - chance_agreement, 1 - chance_agreement)
        return {
            'miou': _nanmean(class_iou),
            'acc': float(accuracy),
            'kappa': float(kappa),
            'dice': _nanmean(class_dice),
            'class_iou': class_iou.tolist(),
            'class_precision': class_precision.tolist(),
            'class_recall': class_recall.tolist(),
            'class_dice': class_dice.tolist(),
            'num_images': self.num_images,
            'class_names': self.class_names,
            'confusion_matrix': self.confusion.tolist(),
        }


def json_ready(value):
    """``value`` with every NaN or infinite float (an undefined score) as None: JSON has no NaN,
    and a strict reader (JavaScript's JSON.parse, jq) refuses the bare NaN Python writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _to_numpy(array):
    return array.numpy() if isinstance(array, paddle.Tensor) else np.asarray(array)


def _divide(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0, without numpy's warning."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    result = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=result, where=denominator != 0)
    return result


def _nanmean(values):
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float('nan')


def format_report(result):
    """A grep-able summary line in PaddleSeg's format, then one aligned row per class.

    ``result['note']``, when given, ends the summary line in parentheses (e.g. what the
    evaluation left out). A score that is undefined prints as '-'; a class absent from
    both the labels and the predictions is marked 'absent'.
    """
    summary = (f"[EVAL] #Images: {result['num_images']} mIoU: {result['miou']:.4f} "
               f"Acc: {result['acc']:.4f} Kappa: {result['kappa']:.4f} Dice: {result['dice']:.4f}")
    if result.get('note'):
        summary += f" ({result['note']})"
    names = result.get('class_names')
    header = ['Class'] + (['Name'] if names else []) + ['IoU', 'Precision', 'Recall', '']
    rows = []
    for class_id, scores in enumerate(zip(result['class_iou'], result['class_precision'],
                                          result['class_recall'])):
        absent = math.isnan(scores[0])  # no IoU: neither labelled nor predicted anywhere
        rows.append([str(class_id)] + ([str(names[class_id])] if names else [])
                    + ['-' if math.isnan(score) else f"{score:.4f}" for score in scores]
                    + ['absent' if absent else ''])
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
    lines = [summary]
    for row in [header] + rows:
        lines.append('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return '\n'.join(lines)
