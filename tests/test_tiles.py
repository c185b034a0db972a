"""Streamed sliding windows: the labels of the whole-image sliding window, in memory bounded by the
window and the image width (or by the window, with the carried scores in a file); overlays blended band by
band with PaddleSeg's pixels."""
import os
import tracemalloc

import numpy as np
import paddle
import pytest
from paddleseg.utils.visualize import get_color_map_list, visualize

import cv2
from deploy.test_export import TRANSFORMS, tiny_emanet
from emanet.engine.inference import ModelSegmenter
from emanet.errors import InvalidInput
from emanet.test_time import InferenceOptions
from emanet.tiles import first_max_index, overlay, stream_labels


def slide(crop_size, stride, slide_batch=1):
    return InferenceOptions(is_slide=True, crop_size=crop_size, stride=stride, slide_batch=slide_batch)


def whole_image_labels(segmenter, image):
    model_input, trans_info = segmenter.preprocess(image)
    return segmenter.labels(model_input[None], trans_info)[0]


@pytest.fixture(scope='module')
def model():
    return tiny_emanet()


@pytest.fixture(scope='module')
def image():
    return np.random.RandomState(3).randint(0, 256, (77, 101, 3)).astype(np.uint8)


@pytest.mark.parametrize('crop_size, stride, slide_batch', [
    ((40, 32), (24, 20), 1),   # overlaps in both directions, the last windows on the edges
    ((40, 32), (24, 20), 3),   # batches that span rows of windows
    ((64, 48), (64, 48), 2),   # no overlap
    ((128, 24), (100, 16), 1),  # windows wider than the image
])
def test_streamed_labels_equal_the_whole_image_sliding_window(model, image, crop_size, stride, slide_batch):
    segmenter = ModelSegmenter(model, TRANSFORMS, slide(crop_size, stride, slide_batch))
    assert segmenter.streams
    streamed = segmenter.predict(image)
    assert streamed.dtype == np.uint8 and streamed.shape == image.shape[:2]
    assert len(np.unique(streamed)) >= 2
    np.testing.assert_array_equal(streamed, whole_image_labels(segmenter, image))


@pytest.mark.parametrize('crop_size, stride', [
    ((40, 32), (24, 20)),  # overlaps in both directions
    ((40, 32), (40, 9)),   # overlaps of rows only, the last row of windows moved up far
])
def test_carried_scores_in_a_file_give_the_same_labels_and_leave_nothing(model, image, spilled_into, tmp_path,
                                                                        crop_size, stride):
    segmenter = ModelSegmenter(model, TRANSFORMS, slide(crop_size, stride))
    labels = stream_labels(image, segmenter.prepare_window, segmenter.forward, crop_size, stride,
                           spill_dir=str(tmp_path))
    assert spilled_into and set(spilled_into) == {str(tmp_path)}
    np.testing.assert_array_equal(labels, whole_image_labels(segmenter, image))
    assert os.listdir(tmp_path) == []  # the files had no name


def test_windows_differ_from_one_pass_so_the_comparison_means_something(model, image):
    """A sliding window of this model labels differently from one pass over the image."""
    windowed = ModelSegmenter(model, TRANSFORMS, slide((40, 32), (24, 20))).predict(image)
    whole = ModelSegmenter(model, TRANSFORMS).predict(image)
    assert (windowed != whole).mean() > 0.01


def test_flips_or_resizing_transforms_run_on_the_whole_image(model, image):
    flipped = InferenceOptions(aug_eval=True, flip_horizontal=True, is_slide=True, crop_size=(40, 32), stride=(24, 20))
    assert not ModelSegmenter(model, TRANSFORMS, flipped).streams
    resized = TRANSFORMS + [{'type': 'Resize', 'target_size': [64, 48]}]
    segmenter = ModelSegmenter(model, resized, slide((40, 32), (24, 20)))
    assert not segmenter.streams
    assert segmenter.predict(image).shape == image.shape[:2]


class PixelwiseClassifier:
    """Logits of 19 classes as a fixed linear map of each pixel, in numpy: streaming is under test."""

    def __init__(self):
        self.weights = np.random.RandomState(0).randn(19, 3).astype(np.float32)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return np.einsum('kc,nchw->nkhw', self.weights, batch)


def prepare(window):
    return (window.astype(np.float32).transpose(2, 0, 1) - 127.5) / 127.5


def streamed_peak(height, width):
    """(labels, peak bytes numpy allocated) of streaming a random image through ``PixelwiseClassifier``."""
    image = np.random.RandomState(0).randint(0, 256, (height, width, 3)).astype(np.uint8)
    classifier = PixelwiseClassifier()
    tracemalloc.start()
    labels = stream_labels(image, prepare, classifier, crop_size=(128, 128), stride=(96, 96))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    expected = np.argmax(classifier(prepare(image)[None])[0], axis=0)  # a pixelwise model: windows change nothing
    assert (labels == expected).mean() > 0.9999
    return peak


def test_peak_memory_depends_on_the_window_and_width_not_the_area():
    width, classes, window_scores = 1200, 19, 19 * 128 * 128 * 4
    overlap_rows = classes * (128 - 96) * width * 4  # scores of the rows the next row of windows adds to
    budget = 3 * overlap_rows + 8 * window_scores  # carried rows and a few windows, whatever the height
    for height in (600, 2400):
        assert streamed_peak(height, width) - height * width < budget  # beyond the uint8 labels
    assert budget < 0.1 * classes * 2400 * width * 4  # the whole image's scores: 219 MB


def test_a_stride_beyond_the_window_is_refused_before_any_work():
    classifier = PixelwiseClassifier()
    with pytest.raises(InvalidInput, match='stride .* is larger than crop_size'):
        stream_labels(np.zeros((64, 64, 3), np.uint8), prepare, classifier, crop_size=(16, 16), stride=(20, 8))
    assert classifier.calls == 0


def test_overlay_blends_band_by_band_as_paddleseg_visualize(tmp_path):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (300, 170, 3)).astype(np.uint8)
    labels = rng.randint(0, 19, (300, 170)).astype(np.uint8)
    path = str(tmp_path / 'image.png')
    cv2.imwrite(path, image)
    colors = get_color_map_list(256)
    np.testing.assert_array_equal(overlay(image.copy(), labels, colors, band_rows=64),
                                  visualize(path, labels, colors, weight=0.6))


@pytest.mark.parametrize('classes', [1, 19, 300])
def test_first_max_index_is_numpy_argmax_with_ties_and_nan(classes):
    scores = np.round(np.random.RandomState(classes).randn(classes, 33, 45)).astype(np.float32)  # many ties
    scores[classes // 2, 0, :3] = np.nan  # numpy: the first NaN wins
    np.testing.assert_array_equal(first_max_index(scores), np.argmax(scores, axis=0))
