"""The dygraph model as a Segmenter: logits with test-time augmentation and sliding windows.

Same semantics as PaddleSeg's ``aug_inference``/``slide_inference``, and like them one forward
pass per scale and flip on every device: a batch of every flipped copy would multiply the peak
memory (a Cityscapes R101 multi-scale + flip evaluation at 1024x2048 would no longer fit a GPU
where PaddleSeg's does) and is no faster on CPU (ResNet50, 1024x512, 2 cores: 2.08x against
1.98x single-scale). The sliding window stays on the device instead of accumulating in numpy.
"""
import collections.abc
import contextlib

import numpy as np
import paddle
import paddle.nn.functional as F

from emanet.errors import InvalidInput
from emanet.segmenter import InferenceOptions, Segmenter, build_transforms


class ModelSegmenter(Segmenter):
    """A dygraph model behind the ``Segmenter`` interface, run with its test-time ``options``.

    Args:
        model: a PaddleSeg-style model returning a list whose first element is the main logits.
        transforms_cfg (list[dict]): the config's val transforms, to prepare single images.
        options (InferenceOptions): flips, scales, sliding window.
        autocast (dict): ``paddle.amp.auto_cast`` arguments for a model trained with mixed precision.
    """

    def __init__(self, model, transforms_cfg=(), options=InferenceOptions(), autocast=None):
        self.model = model
        self.transforms = build_transforms(transforms_cfg)
        self.options = options
        self.autocast = autocast

    def logits(self, images):
        self.model.eval()
        images = images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images)
        with paddle.amp.auto_cast(**self.autocast) if self.autocast else contextlib.nullcontext():
            return infer_logits(self.model, images, self.options).astype('float32')


@paddle.no_grad()
def infer_logits(model, images, options=InferenceOptions()):
    """Logits [N, C, H, W] for images [N, 3, H, W], averaged over every scale x flip of ``options``.

    Flips and scales apply with ``options.aug_eval``. Each scale resizes the images to
    (int(H * scale + 0.5), int(W * scale + 0.5)), PaddleSeg's rounding. With only scale 1.0 and
    no flip this is exactly ``model(images)[0]``; ``options.is_slide`` runs windows of
    ``crop_size`` (w, h) every ``stride`` (w, h).
    """
    scales = list(options.scales) if options.aug_eval else [1.0]
    flips = _flip_combinations(options.aug_eval and options.flip_horizontal, options.aug_eval and options.flip_vertical)
    height, width = images.shape[-2:]
    slide = (options.is_slide, options.crop_size, options.stride)
    if scales == [1.0] and flips == [(False, False)]:
        return _forward(model, images, *slide)
    summed = None
    for scale in scales:
        scaled = _resize(images, int(height * scale + 0.5), int(width * scale + 0.5))
        for flip in flips:
            flipped_logits = _forward(model, _flip(scaled, flip), *slide)  # [N, C, h, w]
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
        raise InvalidInput("sliding-window inference needs crop_size and stride, both (w, h)")
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
        raise InvalidInput(f"sliding window leaves pixels uncovered: stride {tuple(stride)} is larger "
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
