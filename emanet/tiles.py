"""Sliding-window labels of images of any size in bounded memory.

``emanet.test_time.slide_logits`` keeps float scores [C, H, W] for the whole image: at 16384x16384 and
19 classes that is 20 GB, before the input's float copy. ``stream_strips`` runs the same windows in the
same order (row by row, ``slide_batch`` at a time), reads and prepares each window on its own in a thread
beside the model (the transforms must act pixel by pixel, as Normalize does) and keeps scores only where
windows still overlap: the part of a row of windows that the next row covers, and within a row the columns
the next window covers. The rest is divided by its window count and reduced to labels at once, and each
row of windows hands back its finished strip of labels, so memory grows with the window and the image
width, never with its area; the labels equal the whole-image ones. ``stream_labels`` gathers the strips of
an image held in memory; ``emanet.rasters`` writes them into a GeoTIFF as they come.

The scores carried from one row of windows to the next are C x overlap x width floats: 637 MB at 65536
pixels wide, 19 classes and 128 rows of overlap, and up to the window's height less one row where the last
row of windows is moved up to end at the image's edge. Given a ``spill_dir``, carries over ``SPILL_BYTES``
go to a nameless temporary file there (written and read in column order, as the windows come), so the
process's memory stays with the window; the kernel's page cache holds them as it can.
"""
import collections
import concurrent.futures
import os
import tempfile

import numpy as np

from emanet.test_time import check_window, coverage, window_starts

# The transforms that act on each pixel alone, so that a window can be prepared on its own.
PIXELWISE_TRANSFORMS = ('Normalize',)
# Batches of windows read and prepared ahead of the model.
WINDOWS_AHEAD = 2
# Carried scores larger than this go to a temporary file in ``spill_dir`` (when one is given).
SPILL_BYTES = 128 << 20


def pixelwise(transforms):
    """Whether a PaddleSeg Compose only applies pixel-by-pixel transforms (any window can be prepared alone)."""
    return all(type(transform).__name__ in PIXELWISE_TRANSFORMS for transform in transforms.transforms)


def read_ahead(executor, function, items, ahead):
    """``function(item)`` of each item in order, run on ``executor`` at most ``ahead`` items before the consumer."""
    pending = collections.deque()
    for item in items:
        pending.append(executor.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def stream_labels(image, prepare, forward, crop_size, stride, slide_batch=1, spill_dir=None):
    """Labels [H, W] (uint8 up to 256 classes, else int32) of ``image`` [H, W, 3] by sliding windows.

    Args:
        image: the decoded image, uint8 [H, W, 3] (only windows of it are ever converted to float).
        prepare: a window [h, w, 3] uint8 -> model input [3, h, w] float32.
        forward: a batch [n, 3, h, w] float32 numpy -> logits [n, C, h, w] (numpy or paddle Tensor).
        crop_size, stride: (w, h) of the windows and of their steps.
        slide_batch: windows per forward call.
        spill_dir: as for ``stream_strips``.
    """
    height, width = image.shape[:2]
    labels = None
    for top, strip, _ in stream_strips(lambda top, left, rows, columns: image[top:top + rows, left:left + columns],
                                       height, width, prepare, forward, crop_size, stride, slide_batch,
                                       spill_dir=spill_dir):
        if labels is None or labels.dtype.itemsize < strip.dtype.itemsize:
            labels = np.empty([height, width], strip.dtype) if labels is None else labels.astype(strip.dtype)
        labels[top:top + strip.shape[0]] = strip
    return labels


def stream_strips(read_window, height, width, prepare, forward, crop_size, stride, slide_batch=1, confidence=False,
                  spill_dir=None):
    """(top, labels [h, width], confidence [h, width] or None) of each strip of an image [height, width], top to
    bottom: the rows that no later window covers, once the row of windows above them has run.

    Args:
        read_window: (top, left, rows, columns) -> that window of the image, uint8 [rows, columns, 3], or None
            for a window to skip (all nodata): it adds no scores, and its pixels' labels are only meaningful
            where other windows cover them.
        prepare, forward, crop_size, stride, slide_batch: as for ``stream_labels``.
        confidence: also give the top class's probability (softmax of the averaged logits), 0-254 as uint8.
        spill_dir: a folder for the carried scores over ``SPILL_BYTES`` (a file without a name, gone when closed).
    Labels are uint8 up to 256 classes, else int32.
    """
    check_window(crop_size, stride)
    (crop_width, crop_height), (stride_width, stride_height) = crop_size, stride
    window_height, window_width = min(crop_height, height), min(crop_width, width)
    tops, lefts = window_starts(height, crop_height, stride_height), window_starts(width, crop_width, stride_width)
    state = _StreamState(width, coverage(height, tops, crop_height), coverage(width, lefts, crop_width), confidence,
                         spill_dir)
    windows = [(row, column) for row in range(len(tops)) for column in range(len(lefts))]
    batches = [windows[first:first + slide_batch] for first in range(0, len(windows), slide_batch)]

    def load(batch):
        crops = [read_window(tops[row], lefts[column], window_height, window_width) for row, column in batch]
        inputs = [prepare(crop) for crop in crops if crop is not None]
        return batch, [crop is not None for crop in crops], np.stack(inputs) if inputs else None

    with concurrent.futures.ThreadPoolExecutor(1, 'emanet-windows') as reader:
        try:
            for batch, was_read, inputs in read_ahead(reader, load, batches, WINDOWS_AHEAD):
                logits = iter(())
                if inputs is not None:
                    logits = forward(inputs)
                    logits = iter(np.asarray(logits.numpy() if hasattr(logits, 'numpy') else logits,
                                             dtype=np.float32))
                for (row, column), read in zip(batch, was_read):
                    next_top = tops[row + 1] if row + 1 < len(tops) else height
                    next_left = lefts[column + 1] if column + 1 < len(lefts) else width
                    strip = state.add(tops[row], lefts[column], next_top, next_left, window_height, window_width,
                                      next(logits) if read else None)
                    if strip is not None:
                        yield strip
        finally:
            state.close()


class _StreamState:
    """The scores still open while windows stream row by row: ``carry`` holds the rows of the current
    row of windows that earlier rows already covered (sums, all columns), ``open`` the current row's
    columns from ``open_left`` on that later windows of the row will add to, ``strip`` the labels (and
    confidences) of the current row's final rows. The class count is the first window's that runs; before
    it, only skipped windows were seen, so the scores are zero."""

    def __init__(self, width, row_count, column_count, confidence, spill_dir=None):
        self.width = width
        self.row_count, self.column_count = row_count, column_count
        self.confidence = confidence
        self.spill_dir = spill_dir
        self.classes = None
        self.carry = None  # _Carry [C, rows, W]: sums for rows [top, top + rows) of the current row of windows
        self.next_carry = None
        self.open = None  # [C, h, w]: sums for columns [open_left, open_left + w) of the current row
        self.open_left = 0
        self.strip = self.strip_confidence = None

    def add(self, top, left, next_top, next_left, window_height, window_width, logits):
        """Add one window's logits [C, h, w] (None: skipped); the finished (top, labels, confidence) after a
        row's last window, else None."""
        if logits is not None and self.classes is None:
            self.classes = logits.shape[0]
        if left == 0:  # a new row of windows
            if self.carry is not None:
                self.carry.close()
            self.carry, self.next_carry = self.next_carry, None
            self.open, self.open_left = None, 0
            self.strip = np.zeros([next_top - top, self.width], np.uint8)
            self.strip_confidence = np.zeros_like(self.strip) if self.confidence else None
        if self.classes is not None:
            self._extend_open(window_height, left + window_width)
            if logits is not None:
                self.open[:, :, left - self.open_left:left - self.open_left + window_width] += logits
            # Columns before the next window's left edge are complete for this row of windows.
            self._close(top, next_top, self.open_left, next_left)
            self.open = self.open[:, :, next_left - self.open_left:]
        self.open_left = next_left
        if next_left == self.width:
            return top, self.strip, self.strip_confidence
        return None

    def _extend_open(self, window_height, right):
        """Make ``open`` reach column ``right``, new columns starting from the carried sums (or zero)."""
        current_right = self.open_left + (0 if self.open is None else self.open.shape[2])
        if right <= current_right:
            return
        added = np.zeros([self.classes, window_height, right - current_right], np.float32)
        if self.carry is not None:
            added[:, :self.carry.rows] = self.carry.read(current_right, right)
        self.open = added if self.open is None else np.concatenate([self.open, added], axis=2)

    def _close(self, top, next_top, left, right):
        """Columns [left, right) of the current row: rows above ``next_top`` become labels, the rest is carried."""
        if right <= left:
            return
        sums = self.open[:, :, :right - left]
        final_rows = next_top - top
        count = np.outer(self.row_count[top:next_top], self.column_count[left:right])
        scores = sums[:, :final_rows]
        scores = scores if (count == 1).all() else scores / count
        labels = first_max_index(scores)
        if labels.dtype.itemsize > self.strip.dtype.itemsize:
            self.strip = self.strip.astype(np.int32)
        self.strip[:, left:right] = labels
        if self.confidence:
            # The top class's softmax probability, 1 / sum(exp(score - best)), on 0-254 (255 stays free for nodata).
            top_probability = 1.0 / np.exp(scores - scores.max(axis=0)).sum(axis=0)
            self.strip_confidence[:, left:right] = np.rint(top_probability * 254)
        if sums.shape[1] > final_rows:
            if self.next_carry is None:
                self.next_carry = _Carry(sums.shape[0], sums.shape[1] - final_rows, self.width, self.spill_dir)
            self.next_carry.write(left, sums[:, final_rows:])

    def close(self):
        for carry in (self.carry, self.next_carry):
            if carry is not None:
                carry.close()


class _Carry:
    """Score sums [C, rows, width] written and read column range by column range, left to right: an array,
    or over ``SPILL_BYTES`` with a ``spill_dir``, a nameless temporary file there holding each column's
    C x rows floats together (a column range is one read or write)."""

    def __init__(self, classes, rows, width, spill_dir=None):
        self.classes, self.rows, self.spill_dir = classes, rows, spill_dir
        self.column_bytes = classes * rows * 4
        self.file = self.array = None
        if spill_dir is not None and self.column_bytes * width > SPILL_BYTES:
            self.file = tempfile.TemporaryFile(dir=spill_dir)  # unlinked at once on Linux: nothing to delete later
            self.file.truncate(self.column_bytes * width)  # sparse: columns never written read as zeros
        else:
            self.array = np.zeros([classes, rows, width], np.float32)

    def write(self, left, values):
        """Sums [C, rows, n] of columns [left, left + n)."""
        if self.array is not None:
            self.array[:, :, left:left + values.shape[2]] = values
            return
        data = np.ascontiguousarray(values.transpose(2, 0, 1))
        if os.pwrite(self.file.fileno(), data, left * self.column_bytes) != data.nbytes:
            raise OSError(f"short write to the temporary file of carried scores in {self.spill_dir}")

    def read(self, left, right):
        """Sums [C, rows, right - left] of columns [left, right)."""
        if self.array is not None:
            return self.array[:, :, left:right]
        data = os.pread(self.file.fileno(), (right - left) * self.column_bytes, left * self.column_bytes)
        return np.frombuffer(data, np.float32).reshape(right - left, self.classes, self.rows).transpose(1, 2, 0)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.file = self.array = None


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
