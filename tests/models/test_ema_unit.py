"""EMAU against a float64 NumPy implementation of the paper's EM algorithm."""
import numpy as np
import paddle
import pytest

from paddle.amp.auto_cast import amp_initialize

from emanet.models import EMAU
from emanet.models.ema_unit import em_iterations


def reference_em(x, mu, stage_num):
    """The paper's EM attention in float64: returns (reconstruction [B,C,H,W], final bases [B,C,K])."""
    b, c, h, w = x.shape
    feats = x.reshape(b, c, h * w).astype(np.float64)
    bases = np.repeat(mu.astype(np.float64), b, axis=0)
    for _ in range(stage_num):
        logits = np.einsum('bcn,bck->bnk', feats, bases)
        logits -= logits.max(axis=2, keepdims=True)
        resp = np.exp(logits)
        resp /= resp.sum(axis=2, keepdims=True)
        resp_over_pixels = resp / resp.sum(axis=1, keepdims=True)
        bases = np.einsum('bcn,bnk->bck', feats, resp_over_pixels)
        bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    recon = np.einsum('bck,bnk->bcn', bases, resp)
    return recon.reshape(b, c, h, w), bases


def make_unit(channels, num_bases, stage_num, momentum=0.1, seed=0):
    paddle.seed(seed)
    return EMAU(channels, num_bases, stage_num, momentum)


def rel_err(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize('num_bases,stage_num,shape', [
    (8, 1, (1, 16, 5, 7)),
    (16, 3, (2, 32, 8, 8)),
    (64, 3, (2, 64, 12, 10)),
    (32, 5, (3, 24, 6, 9)),
])
def test_matches_float64_reference(num_bases, stage_num, shape):
    unit = make_unit(shape[1], num_bases, stage_num)
    unit.eval()
    x = np.random.RandomState(1).randn(*shape).astype('float32')
    expected, _ = reference_em(x, unit.mu.numpy(), stage_num)
    actual = unit(paddle.to_tensor(x)).numpy()
    assert actual.shape == shape
    assert rel_err(actual, expected) < 1e-5


def test_bases_are_unit_norm_over_channels_after_em():
    unit = make_unit(32, 16, 3)
    feats = paddle.randn([2, 32, 50])
    bases, resp = em_iterations(feats, unit.mu.astype('float32'), unit.stage_num)
    np.testing.assert_allclose(np.linalg.norm(bases.numpy(), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(resp.numpy().sum(axis=2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit.mu.numpy(), axis=1), 1.0, rtol=1e-5)


def test_eval_mode_leaves_bases_untouched():
    unit = make_unit(16, 8, 3)
    unit.eval()
    before = unit.mu.numpy().copy()
    for _ in range(3):
        unit(paddle.randn([2, 16, 6, 6]))
    np.testing.assert_array_equal(unit.mu.numpy(), before)


def test_training_moves_bases_by_the_momentum_rule():
    momentum = 0.25
    unit = make_unit(16, 8, 2, momentum=momentum)
    unit.train()
    x = np.random.RandomState(2).randn(3, 16, 5, 5).astype('float32')
    before = unit.mu.numpy().copy()
    _, final_bases = reference_em(x, before, 2)
    batch_bases = final_bases.mean(axis=0, keepdims=True)
    batch_bases /= np.linalg.norm(batch_bases, axis=1, keepdims=True)
    expected = (1 - momentum) * before + momentum * batch_bases
    unit(paddle.to_tensor(x))
    assert rel_err(unit.mu.numpy(), expected) < 1e-5


def test_no_gradient_reaches_the_input():
    unit = make_unit(8, 4, 3)
    x = paddle.randn([1, 8, 4, 4])
    x.stop_gradient = False
    out = unit(x)
    assert out.stop_gradient


def per_pixel_norm(recon):
    """Each output pixel is a convex combination of unit-norm bases, so its norm is at most 1."""
    return np.linalg.norm(recon, axis=1)


@pytest.mark.parametrize('scale', [1.0, 100.0, 1e4])
def test_em_runs_in_float32_for_bf16_input(scale):
    unit = make_unit(32, 16, 3)
    unit.eval()
    x = (paddle.randn([2, 32, 8, 8]) * scale).astype('bfloat16')
    # On CPU auto_cast is a no-op; on GPU it would otherwise run the products in bf16.
    with paddle.amp.auto_cast(dtype='bfloat16', level='O2'):
        out = unit(x)
    assert out.dtype == paddle.bfloat16
    out32 = out.astype('float32').numpy()
    assert np.isfinite(out32).all()
    assert per_pixel_norm(out32).max() <= 1.01
    if scale <= 100:
        # Beyond that the responsibilities are nearly one-hot and ties flip between
        # float32 and float64, so only boundedness is a fair check.
        expected, _ = reference_em(x.astype('float32').numpy(), unit.mu.numpy(), 3)
        # Only the final cast to bf16 (8 mantissa bits) separates it from the reference.
        assert rel_err(out32, expected) < 1e-2


@pytest.mark.parametrize('scale', [100.0, 1e4])
def test_large_activations_give_finite_output_and_bases(scale):
    unit = make_unit(32, 16, 3)
    unit.train()
    out = unit(paddle.randn([2, 32, 8, 8]) * scale).numpy()
    assert np.isfinite(out).all()
    assert per_pixel_norm(out).max() <= 1.0 + 1e-5
    assert np.isfinite(unit.mu.numpy()).all()


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('training', [False, True])
def test_a_unit_cast_as_amp_o2_does_still_runs_em_in_float32(dtype, training):
    momentum = 0.25
    unit = make_unit(32, 16, 3, momentum=momentum)
    # What paddle.amp.decorate(level='O2') does on a GPU to every layer it does not exclude.
    amp_initialize([unit], dtype=dtype, excluded_layers=[])
    assert unit.mu.dtype == getattr(paddle, dtype)
    unit.train() if training else unit.eval()
    x = (paddle.randn([2, 32, 6, 8]) * 4).astype(dtype)
    mu_before = unit.mu.astype('float32').numpy()
    out = unit(x)
    assert out.dtype == x.dtype and unit.mu.dtype == getattr(paddle, dtype)
    out32 = out.astype('float32').numpy()
    assert np.isfinite(out32).all()
    expected, final_bases = reference_em(x.astype('float32').numpy(), mu_before, 3)
    # Float32 EM, then one rounding of the output to the low-precision dtype.
    assert rel_err(out32, expected) < (1e-2 if dtype == 'bfloat16' else 2e-3)
    mu_after = unit.mu.astype('float32').numpy()
    if training:
        batch_bases = final_bases.mean(axis=0, keepdims=True)
        batch_bases /= np.linalg.norm(batch_bases, axis=1, keepdims=True)
        expected_mu = (1 - momentum) * mu_before + momentum * batch_bases
        assert rel_err(mu_after, expected_mu) < (1e-2 if dtype == 'bfloat16' else 2e-3)
        assert not np.array_equal(mu_after, mu_before)
    else:
        np.testing.assert_array_equal(mu_after, mu_before)
