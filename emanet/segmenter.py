"""The one prediction interface: a ``Segmenter`` turns images into label maps at their own size.

Implementations: ``emanet.engine.inference.ModelSegmenter`` (a dygraph model with its test-time
options) and ``emanet.deploy.exported.ExportedSegmenter`` (an exported model in Paddle Inference).
Evaluation (``emanet.engine.evaluate.evaluate``), prediction on files
(``emanet.engine.predict.predict_images``), the tools and the benchmark take any of them.
"""
import dataclasses
import os

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F
from paddleseg.cvlibs import manager
from paddleseg.transforms import Compose

from emanet.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a dygraph model runs at test time: PaddleSeg's ``test_config``, as one value.

    Flips and scales apply only with ``aug_eval`` (as in PaddleSeg). ``crop_size`` and ``stride``
    are (width, height) of the sliding window, used with ``is_slide``.
    """
    aug_eval: bool = False
    scales: tuple = (1.0,)
    flip_horizontal: bool = False
    flip_vertical: bool = False
    is_slide: bool = False
    crop_size: tuple = None
    stride: tuple = None

    def __post_init__(self):
        scales = (self.scales,) if isinstance(self.scales, (int, float)) else tuple(self.scales)
        object.__setattr__(self, 'scales', tuple(float(scale) for scale in scales))
        for key in ('crop_size', 'stride'):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))

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
    def augmented(self):
        """Whether anything beyond one plain forward pass runs (flips, scales or sliding windows)."""
        return self.is_slide or (self.aug_eval and (self.flip_horizontal or self.flip_vertical
                                                    or self.scales != (1.0,)))


def build_transforms(transforms_cfg):
    """PaddleSeg's Compose of transforms given as config dicts, e.g. [{'type': 'Normalize'}]."""
    transforms = []
    for transform_cfg in transforms_cfg:
        kwargs = dict(transform_cfg)
        name = kwargs.pop('type')
        if name not in manager.TRANSFORMS.components_dict:
            raise InvalidInput(f"unknown transform '{name}'")
        transforms.append(manager.TRANSFORMS[name](**kwargs))
    return Compose(transforms)


@paddle.no_grad()
def undo_transforms(maps, trans_info, labels=False):
    """Undo PaddleSeg's transforms on maps [N, C, h, w], last transform first: resizes back
    (bilinear for scores, nearest for ``labels``: labels cannot be interpolated), paddings cropped.

    ``trans_info`` is the list PaddleSeg's transforms record: ('resize', (h, w)) or ('padding', (h, w))
    with the size before that transform. After a DataLoader batches it, the mode becomes a list with
    one entry per image and each size a Tensor [N]; every image of the batch must then share the sizes.
    """
    for mode, size in reversed(trans_info):
        if isinstance(mode, (list, tuple)):
            mode = mode[0]
        height, width = _one_size(size[0]), _one_size(size[1])
        if mode == 'resize':
            if tuple(maps.shape[-2:]) != (height, width):
                maps = F.interpolate(maps, size=[height, width], mode='nearest' if labels else 'bilinear',
                                     align_corners=False)
        elif mode == 'padding':
            maps = maps[:, :, :height, :width]
        else:
            raise ValueError(f"unknown transform {mode!r} in trans_info; expected 'resize' or 'padding'")
    return maps


def _one_size(value):
    """One int from an int, or from a batched Tensor/array whose entries must all agree."""
    values = np.asarray(value.numpy() if isinstance(value, paddle.Tensor) else value).reshape(-1)
    if len(set(values.tolist())) != 1:
        raise ValueError(f"trans_info sizes differ across the batch ({values.tolist()}); "
                         "reverse the transforms one image at a time")
    return int(values[0])


def read_image(image):
    """A BGR uint8 array [H, W, 3] from an image path or such an array; one clear error otherwise."""
    if isinstance(image, (str, os.PathLike)):
        path = str(image)
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read image: {path}")
        return image
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise InvalidInput(f"an image must be a path or a BGR array [H, W, 3], got {type(image).__name__} "
                         f"of shape {getattr(image, 'shape', None)}")
    return image


class Segmenter:
    """Label maps from images; subclasses give ``logits`` (or override ``labels``).

    Attributes:
        transforms: PaddleSeg's Compose that prepares one image (the config's val transforms).
    """

    transforms = None

    def logits(self, images):
        """Logits [N, C, h, w] (float32 paddle Tensor) of a preprocessed batch [N, 3, h, w]."""
        raise NotImplementedError

    def labels(self, images, trans_info):
        """Label maps [N, H, W] (int32 numpy) of a preprocessed batch, at the size before the transforms."""
        logits = undo_transforms(self.logits(images), trans_info)
        return paddle.argmax(logits, axis=1).numpy().astype(np.int32)

    def preprocess(self, image):
        """(input [3, h, w] float32, trans_info) for an image path or a BGR uint8 array [H, W, 3]."""
        data = self.transforms({'img': read_image(image).astype('float32'), 'trans_info': [], 'gt_fields': []})
        return data['img'], data['trans_info']

    def predict(self, image):
        """Label map [H, W] (int32) of an image path or a BGR uint8 array, at the image's size."""
        array, trans_info = self.preprocess(image)
        return self.labels(array[None], trans_info)[0]
