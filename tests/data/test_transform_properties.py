"""Properties of this package's own data handling on random sizes (hypothesis): sliding windows, the
resumable sampler, undoing transforms on scores and labels, metrics."""
import cv2
import numpy as np
import paddle
import paddleseg.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emanet.data.loading import ResumableBatchSampler
from emanet.test_time import window_starts
from emanet.engine.metrics import SegMetrics
from emanet.segmenter import undo_transforms

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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 120), st.integers(1, 120))
def test_sliding_windows_cover_every_pixel_and_end_at_the_edge(length, window, step):
    step = min(step, window)  # a stride beyond the window is refused before any window runs
    starts = window_starts(length, window, step)
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start:start + window] = True
    assert covered.all() and starts[0] == 0 and min(starts[-1] + window, length) == length
    assert starts == sorted(set(starts))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, 3), st.integers(0, 30), st.integers(0, 2 ** 31 - 1))
def test_batches_split_over_ranks_are_disjoint_and_a_resumed_sampler_continues_the_same_order(
        dataset_size, batch_size, world_size, start_iter, seed):
    if dataset_size < batch_size * world_size:
        return  # fewer images than one global batch is refused (tested elsewhere)
    iters = start_iter + 5
    ranks = [list(ResumableBatchSampler(dataset_size, batch_size, iters, seed, rank=r, world_size=world_size))
             for r in range(world_size)]
    for step in range(iters):
        indices = [index for rank in ranks for _, index in rank[step]]
        assert len(indices) == len(set(indices)) == batch_size * world_size
        assert all(0 <= index < dataset_size for index in indices)
    resumed = list(ResumableBatchSampler(dataset_size, batch_size, iters, seed, start_iter=start_iter, rank=0,
                                         world_size=world_size))
    assert resumed == ranks[0][start_iter:]


@settings(max_examples=40, deadline=None)
@given(samples(), shapes)
def test_labels_resized_back_come_back_at_their_size_with_only_their_own_values(sample, target):
    _, label = sample
    out = run([T.Resize(target_size=list(target))], np.zeros(label.shape + (3,), 'float32'))
    width, height = target
    # Labels as a model would give them at the resized size.
    small = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST).astype('float32')
    restored = undo_transforms(paddle.to_tensor(small[None, None]), out['trans_info'], labels=True).numpy()[0, 0]
    assert restored.shape == label.shape
    assert set(np.unique(restored)) <= set(np.unique(label).astype('float32'))


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
