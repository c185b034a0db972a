"""Test-time inference for any segmenter: ``InferenceOptions`` (flips, scales, sliding windows) applied
to a ``forward`` function, the one plain pass of a model, whatever runs it (dygraph, Paddle Inference,
ONNX Runtime, OpenVINO).

Same semantics as PaddleSeg's ``aug_inference``/``slide_inference``: logits are averaged, not
probabilities, and one forward pass runs per scale and flip: a batch of every flipped copy would
multiply the peak memory (a Cityscapes R101 multi-scale + flip evaluation at 1024x2048 would no longer
fit a GPU where PaddleSeg's does) and is no faster on CPU (ResNet50, 1024x512, 2 cores: 2.08x against
1.98x single-scale). The whole-image sliding window keeps its sums on the device; ``emanet.tiles``
streams the same windows for images too large to hold their scores.
"""
import dataclasses

import numpy as np
import paddle
import paddle.nn.functional as F

from emanet.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a model runs at test time: PaddleSeg's ``test_config``, as one value.

    Flips and scales apply only with ``aug_eval`` (as in PaddleSeg). ``crop_size`` and ``stride``
    are (width, height) of the sliding window, used with ``is_slide``; ``slide_batch`` windows
    go through the model at once (more uses more memory; on a GPU it is faster).
    """
    aug_eval: bool = False
    scales: tuple = (1.0,)
    flip_horizontal: bool = False
    flip_vertical: bool = False
    is_slide: bool = False
    crop_size: tuple = None
    stride: tuple = None
    slide_batch: int = 1

    def __post_init__(self):
        scales = (self.scales,) if isinstance(self.scales, (int, float)) else tuple(self.scales)
        object.__setattr__(self, 'scales', tuple(float(scale) for scale in scales))
        for key in ('crop_size', 'stride'):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        if int(self.slide_batch) < 1:
            raise InvalidInput(f"slide_batch must be at least 1, got {self.slide_batch}")
        object.__setattr__(self, 'slide_batch', int(self.slide_batch))
        if self.is_slide:
            check_window(self.crop_size, self.stride)

    @classmethod
    def from_config(cls, test_config=None, **overrides):
        """A config's ``test_config`` with command-line overrides (those not None win); unknown keys are refused."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = [key for key in (test_config or {}) if key not in known]
        if unknown:
            raise InvalidInput(f"test_config has unknown key '{unknown[0]}'; known: {', '.join(known)}")
        values = dict(test_config or {})
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def flips_or_scales(self):
        """Whether more than one view of the image is averaged (flips or scales other than 1.0)."""
        return self.aug_eval and (self.flip_horizontal or self.flip_vertical or self.scales != (1.0,))

    @property
    def augmented(self):
        """Whether anything beyond one plain forward pass runs (flips, scales or sliding windows)."""
        return self.is_slide or self.flips_or_scales


def check_window(crop_size, stride):
    """One sentence for a sliding window that is missing or leaves pixels uncovered."""
    if crop_size is None or stride is None:
        raise InvalidInput("sliding-window inference needs crop_size and stride, both (w, h)")
    if len(crop_size) != 2 or len(stride) != 2 or min(*crop_size, *stride) < 1:
        raise InvalidInput(f"crop_size and stride are (w, h) of at least 1 pixel, got {tuple(crop_size)} "
                           f"and {tuple(stride)}")
    if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
        raise InvalidInput(f"sliding window leaves pixels uncovered: stride {tuple(stride)} is larger "
                           f"than crop_size {tuple(crop_size)}")


@paddle.no_grad()
def augmented_logits(forward, images, options=InferenceOptions()):
    """Logits [N, C, H, W] for images [N, 3, H, W], averaged over every scale x flip of ``options``.

    ``forward(batch)`` gives the logits [n, C, h, w] of one plain pass (float32 paddle Tensors in
    and out). Each scale resizes the images to (int(H * scale + 0.5), int(W * scale + 0.5)),
    PaddleSeg's rounding. With only scale 1.0 and no flip this is exactly ``forward(images)``;
    ``options.is_slide`` runs windows of ``crop_size`` (w, h) every ``stride`` (w, h).
    """
    images = images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images)
    scales = list(options.scales) if options.aug_eval else [1.0]
    flips = _flip_combinations(options.aug_eval and options.flip_horizontal, options.aug_eval and options.flip_vertical)
    height, width = images.shape[-2:]
    if scales == [1.0] and flips == [(False, False)]:
        return _one_view(forward, images, options)
    summed = None
    for scale in scales:
        scaled = _resize(images, int(height * scale + 0.5), int(width * scale + 0.5))
        for flip in flips:
            flipped_logits = _one_view(forward, _flip(scaled, flip), options)  # [N, C, h, w]
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


def _one_view(forward, images, options):
    if options.is_slide:
        return slide_logits(forward, images, options.crop_size, options.stride, options.slide_batch)
    return forward(images)


def window_starts(length, window, step):
    """Start offsets of windows tiling [0, length); the last window ends at the edge."""
    if length <= window:
        return [0]
    num_windows = int(np.ceil((length - window) / step)) + 1
    return [min(index * step, length - window) for index in range(num_windows)]


def coverage(length, starts, window):
    """How many windows (of ``window`` pixels at ``starts``) cover each of ``length`` positions, float32."""
    count = np.zeros([length], dtype=np.float32)
    for start in starts:
        count[start:start + window] += 1
    return count


def slide_logits(forward, images, crop_size, stride, slide_batch=1):
    """Run ``forward`` on overlapping windows, ``slide_batch`` at a time, and average the logits where
    windows overlap (window sums in row-major order, then one division by the overlap count)."""
    check_window(crop_size, stride)
    (crop_width, crop_height), (stride_width, stride_height) = crop_size, stride
    height, width = images.shape[-2:]
    tops, lefts = window_starts(height, crop_height, stride_height), window_starts(width, crop_width, stride_width)
    windows = [(top, left) for top in tops for left in lefts]
    summed = None
    for first in range(0, len(windows), slide_batch):
        for top, left, window_logits in _run_windows(forward, images, windows[first:first + slide_batch],
                                                      crop_height, crop_width):
            if summed is None:
                summed = paddle.zeros([images.shape[0], window_logits.shape[1], height, width], dtype='float32')
            summed[:, :, top:top + window_logits.shape[2], left:left + window_logits.shape[3]] += window_logits
    # The windows form a grid, so a pixel's count is (windows over its row) x (windows over its column).
    count = np.outer(coverage(height, tops, crop_height), coverage(width, lefts, crop_width))
    return summed / paddle.to_tensor(count, place=summed.place)


def _run_windows(forward, images, windows, crop_height, crop_width):
    """(top, left, logits [N, C, h, w]) of each window; the windows of a call run as one batch."""
    crops = [images[:, :, top:top + crop_height, left:left + crop_width] for top, left in windows]
    logits = forward(paddle.concat(crops) if len(crops) > 1 else crops[0]).astype('float32')
    batch = images.shape[0]
    return [(top, left, logits[index * batch:(index + 1) * batch]) for index, (top, left) in enumerate(windows)]
