"""Sliding-window labels of images of any size in bounded memory.

``emanet.test_time.slide_logits`` keeps float scores [C, H, W] for the whole image: at 16384x16384 and
19 classes that is 20 GB, before the input's float copy. ``stream_labels`` runs the same windows in the
same order (row by row, ``slide_batch`` at a time) on a uint8 image, prepares each window on its own
(the transforms must act pixel by pixel, as Normalize does) and keeps scores only where windows still
overlap: the part of a row of windows that the next row covers, and within a row the columns the next
window covers. The rest is divided by its window count and reduced to labels at once, so memory grows
with the window and the image width, never with its area; the labels equal the whole-image ones.
"""
import numpy as np

from emanet.test_time import check_window, coverage, window_starts

# The transforms that act on each pixel alone, so that a window can be prepared on its own.
PIXELWISE_TRANSFORMS = ('Normalize',)


def pixelwise(transforms):
    """Whether a PaddleSeg Compose only applies pixel-by-pixel transforms (any window can be prepared alone)."""
    return all(type(transform).__name__ in PIXELWISE_TRANSFORMS for transform in transforms.transforms)


def stream_labels(image, prepare, forward, crop_size, stride, slide_batch=1):
    """Labels [H, W] (uint8 up to 256 classes, else int32) of ``image`` [H, W, 3] by sliding windows.

    Args:
        image: the decoded image, uint8 [H, W, 3] (only windows of it are ever converted to float).
        prepare: a window [h, w, 3] uint8 -> model input [3, h, w] float32.
        forward: a batch [n, 3, h, w] float32 numpy -> logits [n, C, h, w] (numpy or paddle Tensor).
        crop_size, stride: (w, h) of the windows and of their steps.
        slide_batch: windows per forward call.
    """
    check_window(crop_size, stride)
    height, width = image.shape[:2]
    (crop_width, crop_height), (stride_width, stride_height) = crop_size, stride
    tops, lefts = window_starts(height, crop_height, stride_height), window_starts(width, crop_width, stride_width)
    row_count, column_count = coverage(height, tops, crop_height), coverage(width, lefts, crop_width)
    state = _StreamState(height, width, row_count, column_count)
    windows = [(row, top, left) for row, top in enumerate(tops) for left in lefts]
    for first in range(0, len(windows), slide_batch):
        batch = windows[first:first + slide_batch]
        inputs = np.stack([prepare(image[top:top + crop_height, left:left + crop_width]) for _, top, left in batch])
        logits = forward(inputs)
        logits = np.asarray(logits.numpy() if hasattr(logits, 'numpy') else logits, dtype=np.float32)
        for (row, top, left), window_logits in zip(batch, logits):
            next_top = tops[row + 1] if row + 1 < len(tops) else height
            column = lefts.index(left)
            next_left = lefts[column + 1] if column + 1 < len(lefts) else width
            state.add(top, left, next_top, next_left, window_logits)
    return state.labels


class _StreamState:
    """The scores still open while windows stream row by row: ``carry`` holds the rows of the current
    row of windows that earlier rows already covered (sums, all columns), ``open`` the current row's
    columns from ``open_left`` on that later windows of the row will add to."""

    def __init__(self, height, width, row_count, column_count):
        self.height, self.width = height, width
        self.row_count, self.column_count = row_count, column_count
        self.labels = None
        self.carry = None  # [C, rows, W]: sums for rows [top, top + rows) of the current row of windows
        self.next_carry = None
        self.open = None  # [C, h, w]: sums for columns [open_left, open_left + w) of the current row
        self.open_left = 0

    def add(self, top, left, next_top, next_left, logits):
        classes, window_height, window_width = logits.shape
        if self.labels is None:
            self.labels = np.empty([self.height, self.width], np.uint8 if classes <= 256 else np.int32)
        if left == 0:  # a new row of windows
            self.carry, self.next_carry = self.next_carry, None
            self.open, self.open_left = None, 0
        self._extend_open(classes, window_height, left + window_width)
        self.open[:, :, left - self.open_left:left - self.open_left + window_width] += logits
        # Columns before the next window's left edge are complete for this row of windows.
        self._close(top, next_top, self.open_left, next_left)
        self.open = self.open[:, :, next_left - self.open_left:]
        self.open_left = next_left

    def _extend_open(self, classes, window_height, right):
        """Make ``open`` reach column ``right``, new columns starting from the carried sums (or zero)."""
        current_right = self.open_left + (0 if self.open is None else self.open.shape[2])
        if right <= current_right:
            return
        added = np.zeros([classes, window_height, right - current_right], np.float32)
        if self.carry is not None:
            added[:, :self.carry.shape[1]] = self.carry[:, :, current_right:right]
        self.open = added if self.open is None else np.concatenate([self.open, added], axis=2)

    def _close(self, top, next_top, left, right):
        """Columns [left, right) of the current row: rows above ``next_top`` become labels, the rest is carried."""
        if right <= left:
            return
        sums = self.open[:, :, :right - left]
        final_rows = next_top - top
        count = np.outer(self.row_count[top:next_top], self.column_count[left:right])
        scores = sums[:, :final_rows]
        self.labels[top:next_top, left:right] = first_max_index(scores if (count == 1).all() else scores / count)
        if sums.shape[1] > final_rows:
            if self.next_carry is None:
                self.next_carry = np.zeros([sums.shape[0], sums.shape[1] - final_rows, self.width], np.float32)
            self.next_carry[:, :, left:right] = sums[:, final_rows:]


def first_max_index(scores):
    """``np.argmax(scores, axis=0)`` of scores [C, h, w] (the first class of the highest score, NaN wins), as
    uint8 up to 256 classes: the maximum plane by plane, then the lowest class that reaches it. numpy's argmax
    over the first axis walks C-strided columns, about 3x slower at 19 classes."""
    best = scores[0].copy()
    for class_scores in scores[1:]:
        np.maximum(best, class_scores, out=best)
    if np.isnan(best).any():
        return np.argmax(scores, axis=0)
    index = np.zeros(scores.shape[1:], np.uint8 if scores.shape[0] <= 256 else np.intp)
    for class_index in range(scores.shape[0] - 1, -1, -1):
        index[scores[class_index] == best] = class_index
    return index


def overlay(image, labels, colors, weight=0.6, band_rows=256):
    """Blend the colours of ``labels`` over ``image`` (BGR uint8 [H, W, 3]) in place, band by band: the
    same pixels as PaddleSeg's ``visualize`` (``cv2.addWeighted``), without full-size float or colour copies."""
    import cv2
    palette = np.asarray(colors, np.uint8).reshape(-1, 3)[:, ::-1]  # RGB -> BGR, as the image
    for top in range(0, image.shape[0], band_rows):
        band = image[top:top + band_rows]
        cv2.addWeighted(band, weight, palette[labels[top:top + band_rows]], 1 - weight, 0, dst=band)
    return image
