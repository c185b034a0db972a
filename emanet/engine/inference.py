"""The dygraph model as a Segmenter: its main logits, with the test-time options of ``emanet.test_time``
(flips, scales, sliding windows) that every segmenter shares."""
import collections.abc
import contextlib

import paddle

from emanet.segmenter import Segmenter, build_transforms
from emanet.test_time import InferenceOptions, augmented_logits


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
        self.num_classes = getattr(model, 'num_classes', None)
        self.transforms = build_transforms(transforms_cfg)
        self.options = options
        self.autocast = autocast

    @paddle.no_grad()
    def forward(self, images):
        self.model.eval()
        images = images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images)
        with paddle.amp.auto_cast(**self.autocast) if self.autocast else contextlib.nullcontext():
            return main_logits(self.model, images).astype('float32')


def infer_logits(model, images, options=InferenceOptions()):
    """Logits [N, C, H, W] of a dygraph ``model`` for images [N, 3, H, W], with ``options``
    (``emanet.test_time.augmented_logits`` over the model's main logits)."""
    return augmented_logits(lambda batch: main_logits(model, batch), images, options)


def main_logits(model, images):
    """The first of the logits a PaddleSeg-style model returns."""
    outputs = model(images)
    # Indexing a bare tensor with [0] would silently return the first image instead.
    if not isinstance(outputs, collections.abc.Sequence):
        raise TypeError(f"the model must return a list of logits, got {type(outputs).__name__}")
    return outputs[0]
