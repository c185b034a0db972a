"""EMANet: PaddleSeg checkpoint compatibility, outputs per mode, any backbone, the frozen mid conv."""
import logging

import numpy as np
import paddle
import paddleseg.models
import pytest
from paddleseg.models.backbones import ResNet18_vd, ResNet34_vd, ResNet50_vd, ResNet101_vd

from emanet import EMANet
from emanet.checkpoint import CheckpointError, load_weights, save_state

BACKBONES = {'ResNet18_vd': ResNet18_vd, 'ResNet34_vd': ResNet34_vd,
             'ResNet50_vd': ResNet50_vd, 'ResNet101_vd': ResNet101_vd}


def build(cls, backbone='ResNet50_vd', num_classes=19, seed=0, **kwargs):
    paddle.seed(seed)
    return cls(num_classes, BACKBONES[backbone](output_stride=8), **kwargs)


@pytest.mark.parametrize('backbone,num_keys', [('ResNet50_vd', 312), ('ResNet101_vd', 567)])
def test_state_dict_has_paddleseg_names_and_shapes(backbone, num_keys):
    # Names and shapes only: LazyGuard builds layers without drawing their random weights (PaddleSeg's
    # EM unit reads its bases' values when built, so its head is built whole).
    with paddle.LazyGuard():
        ours = {k: list(v.shape) for k, v in build(EMANet, backbone).state_dict().items()}
        their_backbone = BACKBONES[backbone](output_stride=8)
    theirs = {k: list(v.shape) for k, v in paddleseg.models.EMANet(19, their_backbone).state_dict().items()}
    assert ours == theirs
    assert len(ours) == num_keys
    assert ours['head.emau.mu'] == [1, 512, 64]


def test_logits_equal_paddleseg_on_its_saved_weights(tmp_path):
    reference = build(paddleseg.models.EMANet, num_classes=5, seed=1)
    reference.train()
    for _ in range(3):  # move the EM bases and BN statistics away from their initial values
        reference(paddle.rand([2, 3, 64, 64]))
    path = str(tmp_path / 'model.pdparams')
    paddle.save(reference.state_dict(), path)

    ours = build(EMANet, num_classes=5, seed=2)
    load_weights(ours, path)
    np.testing.assert_array_equal(ours.head.emau.mu.numpy(), reference.head.emau.mu.numpy())
    reference.eval()
    ours.eval()
    x = paddle.rand([2, 3, 72, 88])
    expected = reference(x)[0].numpy()
    (actual,) = [logit.numpy() for logit in ours(x)]
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-5


def test_pretrained_argument_loads_whole_model(tmp_path):
    source = build(EMANet, 'ResNet18_vd', num_classes=3, seed=3)
    path = str(tmp_path / 'model.pdparams')
    save_state(source.state_dict(), path)
    loaded = build(EMANet, 'ResNet18_vd', num_classes=3, seed=4, pretrained=path)
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_legacy_bases_key_loads_into_mu_with_a_warning(tmp_path, caplog):
    source = build(EMANet, 'ResNet18_vd', num_classes=3, seed=5)
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    state['head.emau.bases'] = state.pop('head.emau.mu')
    path = str(tmp_path / 'old.pdparams')
    paddle.save(state, path)
    target = build(EMANet, 'ResNet18_vd', num_classes=3, seed=6)
    with caplog.at_level(logging.WARNING, logger='emanet'):
        load_weights(target, path)
    np.testing.assert_array_equal(target.head.emau.mu.numpy(), state['head.emau.bases'])
    assert sum('head.emau.bases' in r.getMessage() for r in caplog.records) == 1


def test_checkpoint_for_another_class_count_is_refused_naming_keys(tmp_path):
    path = str(tmp_path / 'model.pdparams')
    save_state(build(EMANet, 'ResNet18_vd', num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r'head\.cls\.1\.weight: checkpoint \[3, 256, 1, 1\] vs model \[7, 256, 1, 1\]'):
        load_weights(build(EMANet, 'ResNet18_vd', num_classes=7), path)


@pytest.mark.parametrize('backbone', ['ResNet18_vd', 'ResNet50_vd'])  # both kinds of block: basic, bottleneck
def test_train_mode_returns_main_and_aux_eval_mode_main_only(backbone):
    model = build(EMANet, backbone, num_classes=4)
    x = paddle.rand([2, 3, 48, 64])
    model.train()
    logits = model(x)
    assert [list(l.shape) for l in logits] == [[2, 4, 48, 64]] * 2
    model.eval()
    logits = model(x)
    assert [list(l.shape) for l in logits] == [[2, 4, 48, 64]]


def test_eval_does_not_run_the_aux_head():
    model = build(EMANet, 'ResNet18_vd', num_classes=4)
    calls = []
    model.head.aux.register_forward_post_hook(lambda layer, inputs, output: calls.append(1))
    model.eval()
    model(paddle.rand([1, 3, 32, 32]))
    assert calls == []


def test_ema_mid_conv_is_frozen_yet_saved():
    model = build(EMANet, 'ResNet18_vd', num_classes=4)
    model.train()
    before = model.head.ema_mid_conv.weight.numpy().copy()
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, parameters=model.parameters(),
                                          weight_decay=0.1)
    loss = sum(logit.mean() for logit in model(paddle.rand([2, 3, 32, 32])))
    loss.backward()
    assert model.head.ema_mid_conv.weight.grad is None
    assert model.head.ema_in_conv._conv.weight.grad is not None
    assert model.head.aux[2].weight.grad is not None
    optimizer.step()
    np.testing.assert_array_equal(model.head.ema_mid_conv.weight.numpy(), before)
    assert 'head.ema_mid_conv.weight' in model.state_dict()
    assert 'head.ema_mid_conv.bias' in model.state_dict()
