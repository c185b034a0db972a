"""Logits for a batch of images: test-time augmentation, sliding window, undoing PaddleSeg's transforms.

Same semantics as PaddleSeg's ``aug_inference``/``slide_inference``, and like them one forward
pass per scale and flip on every device: a batch of every flipped copy would multiply the peak
memory (a Cityscapes R101 multi-scale + flip evaluation at 1024x2048 would no longer fit a GPU
where PaddleSeg's does) and is no faster on CPU (ResNet50, 1024x512, 2 cores: 2.08x against
1.98x single-scale). The sliding window stays on the device instead of accumulating in numpy.
"""
import collections.abc

import numpy as np
import paddle
import paddle.nn.functional as F


@paddle.no_grad()
def infer_logits(model, images, scales=(1.0,), flip_horizontal=False, flip_vertical=False,
                 is_slide=False, crop_size=None, stride=None):
    """Logits [N, C, H, W] for images [N, 3, H, W], averaged over every scale x flip.

    Each scale resizes the images to (int(H * scale + 0.5), int(W * scale + 0.5)), PaddleSeg's
    rounding. With only scale 1.0 and no flip this is exactly ``model(images)[0]``.

    Args:
        model: a PaddleSeg-style model returning a list whose first element is the main logits.
        scales: a float or a sequence of floats.
        is_slide: run the model on windows of ``crop_size`` (w, h) every ``stride`` (w, h).
    """
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    flips = _flip_combinations(flip_horizontal, flip_vertical)
    height, width = images.shape[-2:]
    if scales == [1.0] and flips == [(False, False)]:
        return _forward(model, images, is_slide, crop_size, stride)
    summed = None
    for scale in scales:
        scaled = _resize(images, int(height * scale + 0.5), int(width * scale + 0.5))
        for flip in flips:
            flipped_logits = _forward(model, _flip(scaled, flip), is_slide, crop_size, stride)  # [N, C, h, w]
            restored = _resize(_flip(flipped_logits, flip), height, width)  # [N, C, H, W]
            summed = restored if summed is None else summed + restored
    return summed / (len(scales) * len(flips))


def _flip_combinations(flip_horizontal, flip_vertical):
    """(horizontal, vertical) pairs to evaluate, identity first."""
    horizontal = [False, True] if flip_horizontal else [False]
    vertical = [False, True] if flip_vertical else [False]
    return [(h, v) for v in vertical for h in horizontal]


def _flip(tensor, flip):
    horizontal, vertical = flip
    axes = ([3] if horizontal else []) + ([2] if vertical else [])
    return paddle.flip(tensor, axis=axes) if axes else tensor


def _resize(tensor, height, width):
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    return F.interpolate(tensor, size=[height, width], mode='bilinear', align_corners=False)


def _forward(model, images, is_slide, crop_size, stride):
    if is_slide:
        return _slide_logits(model, images, crop_size, stride)
    return _main_logits(model, images)


def _main_logits(model, images):
    outputs = model(images)
    # Indexing a bare tensor with [0] would silently return the first image instead.
    if not isinstance(outputs, collections.abc.Sequence):
        raise TypeError(f"the model must return a list of logits, got {type(outputs).__name__}")
    return outputs[0]


def _window_starts(length, window, step):
    """Start offsets of windows tiling [0, length); the last window ends at the edge."""
    if length <= window:
        return [0]
    num_windows = int(np.ceil((length - window) / step)) + 1
    return [min(index * step, length - window) for index in range(num_windows)]


def _slide_logits(model, images, crop_size, stride):
    """Run the model on overlapping windows and average the logits where windows overlap."""
    if crop_size is None or stride is None:
        raise ValueError("sliding-window inference needs crop_size and stride, both (w, h)")
    crop_width, crop_height = crop_size
    stride_width, stride_height = stride
    height, width = images.shape[-2:]
    windows = [(top, left, min(top + crop_height, height), min(left + crop_width, width))
               for top in _window_starts(height, crop_height, stride_height)
               for left in _window_starts(width, crop_width, stride_width)]

    # The overlap count depends only on the geometry, so check it before running the model.
    count = np.zeros([height, width], dtype=np.float32)
    for top, left, bottom, right in windows:
        count[top:bottom, left:right] += 1
    if (count == 0).any():
        raise ValueError(f"sliding window leaves pixels uncovered: stride {tuple(stride)} is larger "
                         f"than crop_size {tuple(crop_size)}")

    summed = None
    for top, left, bottom, right in windows:
        window_logits = _main_logits(model, images[:, :, top:bottom, left:right])  # [N, C, h, w]
        if summed is None:
            summed = paddle.zeros([images.shape[0], window_logits.shape[1], height, width],
                                  dtype=window_logits.dtype)
        summed[:, :, top:bottom, left:right] += window_logits
    count = paddle.to_tensor(count, dtype=summed.dtype, place=summed.place)  # [H, W]
    return summed / count


@paddle.no_grad()
def reverse_transform(logits, trans_info):
    """Undo PaddleSeg transforms on logits [N, C, h, w], last transform first.

    ``trans_info`` is the list PaddleSeg's transforms record: ('resize', (h, w)) or
    ('padding', (h, w)) with the size before that transform. After a DataLoader batches it,
    the mode becomes a list with one entry per image and each size a Tensor [N]; every image
    of the batch must then share the sizes.
    """
    for mode, size in reversed(trans_info):
        if isinstance(mode, (list, tuple)):
            mode = mode[0]
        height, width = _batch_size_value(size[0]), _batch_size_value(size[1])
        if mode == 'resize':
            logits = _resize(logits, height, width)
        elif mode == 'padding':
            logits = logits[:, :, :height, :width]
        else:
            raise ValueError(f"unknown transform {mode!r} in trans_info; expected 'resize' or 'padding'")
    return logits


def _batch_size_value(value):
    """One int from an int, or from a batched Tensor/array whose entries must all agree."""
    values = np.asarray(value.numpy() if isinstance(value, paddle.Tensor) else value).reshape(-1)
    if len(set(values.tolist())) != 1:
        raise ValueError(f"trans_info sizes differ across the batch ({values.tolist()}); "
                         "reverse the transforms one image at a time")
    return int(values[0])
