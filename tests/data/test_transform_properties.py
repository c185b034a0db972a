"""Properties of the transforms the configs use, on random shapes and label maps (hypothesis)."""
import numpy as np
import paddle
import paddleseg.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emanet.segmenter import undo_transforms
from emanet.engine.metrics import SegMetrics

IGNORE = 255
shapes = st.tuples(st.integers(4, 40), st.integers(4, 40))


@st.composite
def samples(draw):
    """An image whose first channel encodes its label (10 * class), so alignment can be checked."""
    height, width = draw(shapes)
    label = draw(hnp.arrays(np.uint8, (height, width), elements=st.sampled_from([0, 1, 2, 3, IGNORE])))
    image = np.repeat((label.astype('float32') % 25 * 10)[..., None], 3, axis=2)
    return image, label


def run(transforms, image, label=None):
    """Apply PaddleSeg transforms one by one on [H, W, C] arrays (Compose would also transpose)."""
    data = {'img': image.copy(), 'gt_fields': [], 'trans_info': []}
    if label is not None:
        data['label'] = label.copy()
        data['gt_fields'].append('label')
    for transform in transforms:
        data = transform(data)
    return data


@settings(max_examples=40, deadline=None)
@given(samples())
def test_horizontal_flip_twice_is_the_identity_and_keeps_image_and_label_aligned(sample):
    image, label = sample
    once = run([T.RandomHorizontalFlip(prob=1.0)], image, label)
    assert np.array_equal(once['label'], label[:, ::-1])
    assert np.array_equal(once['img'], image[:, ::-1])
    twice = run([T.RandomHorizontalFlip(prob=1.0)], once['img'], once['label'])
    assert np.array_equal(twice['label'], label) and np.array_equal(twice['img'], image)


@settings(max_examples=40, deadline=None)
@given(samples(), shapes, st.integers(0, 2 ** 31 - 1))
def test_scale_and_crop_give_the_crop_size_and_only_known_label_values(sample, crop, seed):
    image, label = sample
    np.random.seed(seed)
    out = run([T.ResizeStepScaling(0.5, 2.0, 0.25), T.RandomPaddingCrop(crop_size=list(crop))], image, label)
    width, height = crop
    assert out['label'].shape == (height, width) and out['img'].shape[:2] == (height, width)
    assert set(np.unique(out['label'])) <= set(np.unique(label)) | {IGNORE}


@settings(max_examples=40, deadline=None)
@given(samples(), shapes)
def test_padding_then_reverse_transform_restores_the_original_size(sample, target):
    image, label = sample
    target = (max(target[0], image.shape[1]), max(target[1], image.shape[0]))
    out = run([T.Padding(target_size=list(target))], image)
    logits = paddle.to_tensor(out['img'].transpose(2, 0, 1)[None].copy())
    restored = undo_transforms(logits, out['trans_info']).numpy()[0].transpose(1, 2, 0)
    assert np.array_equal(restored, image)


@settings(max_examples=60, deadline=None)
@given(samples())
def test_a_perfect_prediction_scores_one_and_metrics_stay_in_range(sample):
    _, label = sample
    metrics = SegMetrics(4, ignore_index=IGNORE)
    prediction = np.where(label == IGNORE, 0, label)
    metrics.update(prediction, label)
    result = metrics.compute()
    if (label != IGNORE).any():
        assert result['miou'] == 1.0 and result['acc'] == 1.0
    noisy = SegMetrics(4, ignore_index=IGNORE)
    noisy.update((prediction + 1) % 4, label)
    scores = noisy.compute()
    for key in ('miou', 'acc', 'dice'):
        assert np.isnan(scores[key]) or 0.0 <= scores[key] <= 1.0
