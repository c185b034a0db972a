"""Losses on Paddle 3 against NumPy, and through PaddleSeg's YAML builder."""
import numpy as np
import paddle
import pytest
from emanet import registry
from emanet.models.losses import CrossEntropyLoss, OhemCrossEntropyLoss

IGNORE = 255


def numpy_pixel_ce(logit, label):
    """Per-pixel cross entropy [N, H, W], 0 on ignored pixels."""
    shifted = logit - logit.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    safe = np.where(label == IGNORE, 0, label)
    picked = np.take_along_axis(log_prob, safe[:, None], axis=1)[:, 0]
    return np.where(label == IGNORE, 0.0, -picked)


@pytest.fixture
def batch():
    rng = np.random.RandomState(0)
    logit = rng.randn(2, 4, 5, 6).astype('float32')
    label = rng.randint(0, 4, size=(2, 5, 6)).astype('int32')
    label[0, :2] = IGNORE
    return logit, label


def test_cross_entropy_averages_over_valid_pixels(batch):
    logit, label = batch
    expected = numpy_pixel_ce(logit, label).sum() / (label != IGNORE).sum()
    actual = float(CrossEntropyLoss()(paddle.to_tensor(logit), paddle.to_tensor(label)))
    assert actual == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_class_weights_weight_the_average(batch):
    logit, label = batch
    weight = np.array([1.0, 2.0, 0.5, 3.0])
    pixel_w = np.where(label == IGNORE, 0.0, weight[np.where(label == IGNORE, 0, label)])
    expected = (numpy_pixel_ce(logit, label) * pixel_w).sum() / pixel_w.sum()
    actual = float(CrossEntropyLoss(weight=weight.tolist())(paddle.to_tensor(logit),
                                                              paddle.to_tensor(label[:, None])))
    assert actual == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_wrong_weight_count_names_both_counts(batch):
    logit, label = batch
    with pytest.raises(ValueError, match='3 class weights but the model predicts 4 classes'):
        CrossEntropyLoss(weight=[1, 1, 1])(paddle.to_tensor(logit), paddle.to_tensor(label))


def test_ohem_keeps_pixels_below_threshold_or_the_min_kept_hardest(batch):
    logit, label = batch
    ce = numpy_pixel_ce(logit, label)
    valid = label != IGNORE
    prob = np.where(valid, np.exp(-ce), 1.0)
    for thresh, min_kept in [(0.7, 5), (0.05, 20), (0.9, 1000)]:
        if min_kept <= valid.sum():
            threshold = max(np.sort(prob.ravel())[min_kept - 1], thresh)
            kept = valid & (prob <= threshold)
        else:
            kept = valid
        expected = (ce * kept).sum() / kept.sum()
        loss = OhemCrossEntropyLoss(thresh=thresh, min_kept=min_kept)
        assert float(loss(paddle.to_tensor(logit), paddle.to_tensor(label))) == pytest.approx(expected, rel=1e-5)


def test_losses_backpropagate_and_replace_paddleseg_entries_in_our_builder(batch):
    logit, label = batch
    x = paddle.to_tensor(logit, stop_gradient=False)
    (CrossEntropyLoss()(x, paddle.to_tensor(label)) + OhemCrossEntropyLoss(min_kept=4)(x, paddle.to_tensor(label))).backward()
    assert np.isfinite(x.grad.numpy()).all() and np.abs(x.grad.numpy()).sum() > 0
    assert registry.component('CrossEntropyLoss') is CrossEntropyLoss
    assert registry.component('OhemCrossEntropyLoss') is OhemCrossEntropyLoss
