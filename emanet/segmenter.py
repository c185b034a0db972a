"""The one prediction interface: a ``Segmenter`` turns images into label maps at their own size.

Implementations give ``forward``, one plain pass: ``emanet.engine.inference.ModelSegmenter`` (a dygraph
model) and ``emanet.deploy.exported.ExportedSegmenter`` (an export in Paddle Inference, ONNX Runtime or
OpenVINO). Every segmenter runs its ``InferenceOptions`` the same way around it (``emanet.test_time``),
and a sliding window without flips or scales streams in bounded memory (``emanet.tiles``). Evaluation
(``emanet.engine.evaluate.evaluate``), prediction on files (``emanet.engine.predict.predict_images``),
the tools and the benchmark take any of them.
"""
import os

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F
from paddleseg.cvlibs import manager
from paddleseg.transforms import Compose

from emanet.errors import InvalidInput, MissingFile
from emanet.test_time import InferenceOptions, augmented_logits
from emanet.tiles import pixelwise, stream_labels

__all__ = ['InferenceOptions', 'Segmenter', 'apply_transforms', 'build_transforms', 'read_image',
           'undo_transforms']


def build_transforms(transforms_cfg):
    """PaddleSeg's Compose of transforms given as config dicts, e.g. [{'type': 'Normalize'}]."""
    transforms = []
    for transform_cfg in transforms_cfg:
        kwargs = dict(transform_cfg)
        name = kwargs.pop('type')
        if not isinstance(name, str) or name not in manager.TRANSFORMS.components_dict:
            raise InvalidInput(f"unknown transform {name!r}")
        try:
            transforms.append(manager.TRANSFORMS[name](**kwargs))
        except (TypeError, ValueError) as err:  # arguments a transform does not take, or values it refuses
            raise InvalidInput(f"transform {name}: {' '.join(str(err).split())}") from None
    return Compose(transforms)


def apply_transforms(transforms, image):
    """(input [3, h, w] float32, trans_info) of PaddleSeg's Compose ``transforms`` on one BGR image [H, W, 3]."""
    data = transforms({'img': image.astype('float32'), 'trans_info': [], 'gt_fields': []})
    return data['img'], data['trans_info']


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
            if not os.path.isfile(path):
                raise MissingFile(f"image not found: {path}")
            raise InvalidInput(f"{path}: cannot be decoded as an image (not an image, a damaged one, or more "
                               f"pixels than OpenCV reads)")
        return image
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise InvalidInput(f"an image must be a path or a BGR array [H, W, 3], got {type(image).__name__} "
                         f"of shape {getattr(image, 'shape', None)}")
    return image


class Segmenter:
    """Label maps from images; subclasses give ``forward``, the model's one plain pass, and every
    segmenter runs its ``options`` (flips, scales, sliding windows) the same way around it.

    Attributes:
        transforms: PaddleSeg's Compose that prepares one image (the config's val transforms).
        options (InferenceOptions): the test-time options.
    """

    transforms = None
    options = InferenceOptions()
    num_classes = None  # when known without running the model

    def forward(self, images):
        """Logits [N, C, h, w] (float32 paddle Tensor) of one plain pass over a preprocessed batch [N, 3, h, w]."""
        raise NotImplementedError

    def logits(self, images):
        """Logits [N, C, h, w] (float32 paddle Tensor) of a preprocessed batch, with the test-time options."""
        return augmented_logits(self.forward, images, self.options)

    def labels(self, images, trans_info):
        """Label maps [N, H, W] (int32 numpy) of a preprocessed batch, at the size before the transforms."""
        logits = undo_transforms(self.logits(images), trans_info)
        return paddle.argmax(logits, axis=1).numpy().astype(np.int32)

    def preprocess(self, image):
        """(input [3, h, w] float32, trans_info) for an image path or a BGR uint8 array [H, W, 3]."""
        return apply_transforms(self.transforms, read_image(image))

    @property
    def streams(self):
        """Whether single images run window by window in bounded memory (``emanet.tiles``): a sliding
        window without flips or scales, and transforms that act pixel by pixel."""
        return self.options.is_slide and not self.options.flips_or_scales and pixelwise(self.transforms)

    def prepare(self, image):
        """What ``predict_prepared`` needs of an image path or BGR array, made apart from the model (in
        another thread, say): (the BGR uint8 image, its model input or None when it streams, trans_info)."""
        image = read_image(image)
        if self.streams:
            return image, None, []
        model_input, trans_info = self.preprocess(image)
        return image, model_input, trans_info

    def predict_prepared(self, prepared):
        """Label map [H, W] of what ``prepare`` gave: uint8 when it streams, else int32."""
        image, model_input, trans_info = prepared
        if model_input is None:
            return stream_labels(image, self.prepare_window, self.forward, self.options.crop_size,
                                 self.options.stride, self.options.slide_batch)
        return self.labels(model_input[None], trans_info)[0]

    def predict(self, image):
        """Label map [H, W] of an image path or a BGR uint8 array, at the image's size."""
        return self.predict_prepared(self.prepare(image))

    def prepare_window(self, window):
        """A window [h, w, 3] BGR uint8 of an image as model input [3, h, w] (pixel-by-pixel transforms)."""
        return apply_transforms(self.transforms, window)[0]
