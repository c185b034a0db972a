"""Inference of a dygraph model: test-time augmentation, flips, sliding window."""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from emanet.engine.inference import infer_logits
from emanet.segmenter import InferenceOptions

NUM_CLASSES = 4


def opts(**options):
    """Test-time options with ``aug_eval`` on, so that the flips and scales given apply."""
    return InferenceOptions(aug_eval=True, **options)


class PointwiseModel(nn.Layer):
    """A 1x1 conv: the logits of a pixel depend on that pixel only (translation- and flip-equivariant)."""

    def __init__(self):
        super().__init__()
        paddle.seed(0)
        self.conv = nn.Conv2D(3, NUM_CLASSES, 1)

    def forward(self, x):
        return [self.conv(x)]


class RampModel(PointwiseModel):
    """Adds a ramp over the columns, ``symmetric`` about the centre or rising left to right.

    The rising ramp makes the output depend on where a pixel is, so an un-flipped result differs
    from the plain one and a flip that is not undone shows.
    """

    def __init__(self, symmetric):
        super().__init__()
        self.symmetric = symmetric

    def forward(self, x):
        width = x.shape[-1]
        columns = paddle.arange(width, dtype='float32')  # [W]
        ramp = paddle.abs(columns - (width - 1) / 2) if self.symmetric else columns / width
        return [self.conv(x) + ramp]


class CountingModel(nn.Layer):
    """Records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


def random_images(*shape):
    return paddle.to_tensor(np.random.default_rng(0).standard_normal(shape).astype('float32'))


def flip_w(x):
    return paddle.flip(x, axis=[3])


def flip_h(x):
    return paddle.flip(x, axis=[2])


def test_single_scale_without_flip_is_exactly_the_model_output():
    model = RampModel(symmetric=False)
    images = random_images(2, 3, 5, 7)
    logits = infer_logits(model, images)
    np.testing.assert_array_equal(logits.numpy(), model(images)[0].numpy())
    assert logits.stop_gradient


def test_flips_of_a_flip_symmetric_model_on_a_symmetric_image_change_nothing():
    model = RampModel(symmetric=True)
    half = random_images(1, 3, 6, 4)
    images = paddle.concat([half, flip_w(half)], axis=3)  # [1, 3, 6, 8], left-right symmetric
    plain = infer_logits(model, images)
    flipped = infer_logits(model, images, opts(flip_horizontal=True))
    np.testing.assert_allclose(flipped.numpy(), plain.numpy(), atol=1e-6)


def test_flipped_logits_are_flipped_back_before_averaging():
    model = RampModel(symmetric=False)
    images = random_images(2, 3, 5, 6)
    logits = infer_logits(model, images, opts(flip_horizontal=True, flip_vertical=True))
    expected = (model(images)[0]
                + flip_w(model(flip_w(images))[0])
                + flip_h(model(flip_h(images))[0])
                + flip_h(flip_w(model(flip_h(flip_w(images)))[0]))) / 4
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-6)


def test_multi_scale_averages_the_logits_resized_back_to_the_input():
    model = RampModel(symmetric=False)
    images = random_images(1, 3, 7, 10)
    scales = (0.75, 1.0, 1.5)
    logits = infer_logits(model, images, opts(scales=scales))
    # Halves round up, as in PaddleSeg: 7 * 0.75 = 5.25 -> 5, 10 * 0.75 = 7.5 -> 8, 7 * 1.5 = 10.5 -> 11.
    sizes = [[5, 8], [7, 10], [11, 15]]
    expected = sum(F.interpolate(model(F.interpolate(images, size, mode='bilinear'))[0], [7, 10], mode='bilinear')
                   for size in sizes) / len(sizes)
    assert logits.shape == [1, NUM_CLASSES, 7, 10]
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-6)


def test_every_scale_and_flip_is_one_forward_of_the_batch_alone():
    # As PaddleSeg: the peak batch is the input's, on every device (no branch looks at the device).
    model = CountingModel(PointwiseModel())
    images = random_images(2, 3, 6, 6)
    infer_logits(model, images, opts(scales=(0.5, 1.0), flip_horizontal=True, flip_vertical=True))
    assert model.batch_sizes == [2] * 2 * 4
    model.batch_sizes.clear()
    infer_logits(model, images, opts(flip_horizontal=True))
    assert model.batch_sizes == [2, 2]


def test_sliding_window_of_a_translation_equivariant_model_equals_the_whole_image():
    model = PointwiseModel()
    images = random_images(2, 3, 10, 13)
    whole = model(images)[0]
    windowed = infer_logits(model, images, opts(is_slide=True, crop_size=(4, 3), stride=(3, 2)))
    np.testing.assert_allclose(windowed.numpy(), whole.numpy(), atol=1e-6)


def test_sliding_window_tiles_row_major_with_the_last_window_on_the_edge():
    inputs = []

    def recording_model(x):
        inputs.append(x)
        return [x]

    images = paddle.arange(7 * 11, dtype='float32').reshape([1, 1, 7, 11])
    infer_logits(recording_model, images, opts(is_slide=True, crop_size=(4, 4), stride=(3, 3)))
    # Rows start at 0, 3 (= 7 - 4); columns at 0, 3, 6 and 7 (= 11 - 4) rather than 9.
    starts = [divmod(int(window[0, 0, 0, 0]), 11) for window in inputs]
    assert starts == [(0, 0), (0, 3), (0, 6), (0, 7), (3, 0), (3, 3), (3, 6), (3, 7)]
    assert all(window.shape == [1, 1, 4, 4] for window in inputs)


def test_sliding_window_larger_than_the_image_runs_once_on_the_whole_image():
    model = CountingModel(PointwiseModel())
    images = random_images(1, 3, 5, 6)
    windowed = infer_logits(model, images, opts(is_slide=True, crop_size=(8, 8), stride=(4, 4)))
    assert model.batch_sizes == [1]
    np.testing.assert_allclose(windowed.numpy(), model(images)[0].numpy(), atol=1e-6)


def test_sliding_window_with_stride_beyond_crop_refuses_uncovered_pixels():
    with pytest.raises(ValueError, match='stride .* is larger than crop_size'):
        infer_logits(PointwiseModel(), random_images(1, 3, 10, 10),
                     opts(is_slide=True, crop_size=(3, 3), stride=(5, 5)))


def test_sliding_window_combines_with_scales_and_flips():
    model = PointwiseModel()
    images = random_images(1, 3, 9, 9)
    expected = infer_logits(model, images, opts(scales=(1.0, 0.5), flip_horizontal=True))
    windowed = infer_logits(model, images, opts(scales=(1.0, 0.5), flip_horizontal=True,
                                                is_slide=True, crop_size=(4, 4), stride=(3, 3)))
    np.testing.assert_allclose(windowed.numpy(), expected.numpy(), atol=1e-6)


def test_a_model_returning_a_bare_tensor_is_refused():
    with pytest.raises(TypeError, match='list of logits'):
        infer_logits(lambda x: x, random_images(2, 3, 4, 4))
