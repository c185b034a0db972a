"""AMP on GPU, its logic checked on CPU: O2 keeps the EM unit in float32, checkpoints hold float32
master weights, half-precision checkpoints load without loss, the loss scale survives a resume.

Paddle's decorate and GradScaler do nothing on a CPU place, so the tests do what they do on a GPU:
cast the layers (``amp_initialize``, the body of ``paddle.amp.decorate``) and enable the scaler.
"""
import json

import numpy as np
import paddle
import pytest
from paddle.amp.auto_cast import amp_initialize
from paddleseg.models.backbones import ResNet18_vd

from emanet.checkpoint import float32_state_dict, load_weights
from emanet.engine import checkpointer, trainer
from emanet.models import EMANet


def small_emanet(seed=0):
    paddle.seed(seed)
    return EMANet(num_classes=3, backbone=ResNet18_vd(output_stride=8), ema_channels=32, gc_channels=16,
                  num_bases=8)


def decorate_as_on_gpu(models, optimizers, level, dtype, master_weight, excluded_layers):
    """What paddle.amp.decorate does past its device check (it returns at once on a CPU place)."""
    assert level == 'O2'
    amp_initialize([models], dtype=dtype, excluded_layers=excluded_layers)
    optimizers._multi_precision = master_weight
    return models, optimizers


def enabled_scaler():
    """A GradScaler as on a GPU (on a CPU place Paddle disables it), with a state a run could reach."""
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024)
    scaler._enable = True
    scaler.load_state_dict({'scale': np.array([4096.0], np.float32), 'incr_ratio': 2.0, 'decr_ratio': 0.5,
                            'incr_every_n_steps': 1000, 'decr_every_n_nan_or_inf': 2, 'incr_count': 17,
                            'decr_count': 1, 'use_dynamic_loss_scaling': True})
    return scaler


@pytest.mark.parametrize('precision, dtype', [('fp16', paddle.float16), ('bf16', paddle.bfloat16)])
def test_o2_casts_the_network_but_not_the_em_unit_or_the_norms(monkeypatch, precision, dtype):
    monkeypatch.setattr(paddle.amp, 'decorate', decorate_as_on_gpu)
    model = small_emanet()
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    autocast, use_scaler = trainer.amp_settings(precision, 'gpu', 'O2')
    assert autocast == {'dtype': 'float16' if precision == 'fp16' else 'bfloat16', 'level': 'O2'}
    assert use_scaler == (precision == 'fp16')
    model, optimizer = trainer.decorate_for_amp(model, optimizer, autocast)
    assert model.head.emau.mu.dtype == paddle.float32
    assert model.head.ema_in_conv._conv.weight.dtype == dtype
    assert model.backbone.conv1_1._conv.weight.dtype == dtype
    assert model.head.ema_in_conv._batch_norm.weight.dtype == paddle.float32
    assert optimizer._multi_precision


def test_o1_and_fp32_leave_the_model_as_it_is():
    model = small_emanet()
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    for autocast in (None, trainer.amp_settings('fp16', 'gpu', 'O1')[0]):
        assert trainer.decorate_for_amp(model, optimizer, autocast) == (model, optimizer)
    assert all(p.dtype == paddle.float32 for p in model.parameters())


def test_checkpoints_hold_the_float32_master_weights_not_the_half_precision_copies(tmp_path):
    model = small_emanet()
    amp_initialize([model], dtype='float16', excluded_layers=[])
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters(), multi_precision=True)
    # Master weights as an O2 optimizer holds them: float32, finer than their float16 copies.
    masters = {param.name: paddle.to_tensor(param.astype('float32').numpy() + 1e-6)
               for param in model.parameters() if param.dtype == paddle.float16}
    optimizer._master_weights = masters
    state = float32_state_dict(model, optimizer)
    assert all(value.dtype in (paddle.float32, paddle.int64) for value in state.values())
    names = {name: param.name for name, param in model.named_parameters()}
    weight = 'head.ema_in_conv._conv.weight'
    np.testing.assert_array_equal(state[weight].numpy(), masters[names[weight]].numpy())
    assert state['head.emau.mu'].dtype == paddle.float32

    checkpointer.save_checkpoint(str(tmp_path / 'iter_1'), model, optimizer, {'iter': 1, 'seed': 0, 'best': {'miou': -1.0, 'iter': -1}})
    restored = small_emanet(seed=1)
    restored_optimizer = paddle.optimizer.Momentum(0.01, parameters=restored.parameters(), multi_precision=True)
    checkpointer.load_checkpoint(str(tmp_path / 'iter_1'), restored, restored_optimizer)
    np.testing.assert_array_equal(restored.state_dict()[weight].numpy(), masters[names[weight]].numpy())
    # The optimizer gets the master weights back under its own parameters' names.
    restored_names = {name: param.name for name, param in restored.named_parameters()}
    np.testing.assert_array_equal(restored_optimizer._master_weights[restored_names[weight]].numpy(),
                                  masters[names[weight]].numpy())


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_a_half_precision_checkpoint_loads_into_a_float32_model_without_loss(tmp_path, dtype):
    half = small_emanet()
    amp_initialize([half], dtype=dtype, excluded_layers=[])
    path = str(tmp_path / 'half.pdparams')
    paddle.save(half.state_dict(), path)  # as an O2 run without master-weight saving writes it
    model = load_weights(small_emanet(seed=1), path)
    for key, value in half.state_dict().items():
        loaded = model.state_dict()[key]
        assert loaded.dtype == (paddle.int64 if value.dtype == paddle.int64 else paddle.float32), key
        np.testing.assert_array_equal(loaded.numpy(), value.astype(loaded.dtype).numpy(), err_msg=key)


def test_the_loss_scale_survives_save_and_resume(tmp_path):
    model = small_emanet()
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    scaler = enabled_scaler()
    checkpointer.save_checkpoint(str(tmp_path / 'iter_5'), model, optimizer, {'iter': 5, 'seed': 0, 'best': {'miou': -1.0, 'iter': -1}}, scaler)
    saved = json.loads((tmp_path / 'iter_5' / 'train_state.json').read_text())['grad_scaler']
    assert saved['scale'] == [4096.0] and saved['incr_count'] == 17

    resumed = paddle.amp.GradScaler(init_loss_scaling=1024)
    resumed._enable = True
    restored = small_emanet(seed=1)
    checkpointer.load_checkpoint(str(tmp_path / 'iter_5'), restored,
                            paddle.optimizer.Momentum(0.01, parameters=restored.parameters()), resumed)
    expected, actual = scaler.state_dict(), resumed.state_dict()
    np.testing.assert_array_equal(actual.pop('scale'), expected.pop('scale'))
    assert actual == expected


def test_without_a_scaler_the_state_has_no_scaler_entry(tmp_path):
    model = small_emanet()
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    checkpointer.save_checkpoint(str(tmp_path / 'iter_1'), model, optimizer, {'iter': 1, 'seed': 0, 'best': {'miou': -1.0, 'iter': -1}},
                            paddle.amp.GradScaler())  # disabled on CPU
    assert 'grad_scaler' not in json.loads((tmp_path / 'iter_1' / 'train_state.json').read_text())
