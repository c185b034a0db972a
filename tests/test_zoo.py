"""The model zoo: one table in code, models that fit PaddleSeg's released checkpoints, the README's table."""
import dataclasses
import os
import re
import socket

import numpy as np
import paddle
import paddleseg.models
import pytest
from paddleseg.cvlibs import manager

import emanet
from conftest import Handler
from emanet import zoo
from emanet.config import Builder, load_config
from emanet.download import DownloadError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys of PaddleSeg's released checkpoints (FACTS: R50 312 keys, R101 567).
RELEASED_KEYS = {'ResNet50_vd': 312, 'ResNet101_vd': 567}


def shapes(model):
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def test_the_four_published_models_are_listed():
    assert emanet.list_models() == ['emanet_r101_cityscapes', 'emanet_r101_voc12aug', 'emanet_r50_cityscapes',
                                    'emanet_r50_voc12aug']
    with pytest.raises(KeyError, match="no published model 'emanet_r18'; known: emanet_r101_cityscapes"):
        emanet.create_model('emanet_r18')


@pytest.mark.parametrize('name', sorted(zoo.MODELS))
def test_each_row_builds_the_released_checkpoints_layout_and_its_config_the_same_model(name):
    info = zoo.MODELS[name]
    # Only layouts are compared: LazyGuard builds layers without drawing their random weights.
    with paddle.LazyGuard():
        model = emanet.create_model(name)
        released_backbone = manager.BACKBONES[info.backbone](output_stride=8)
        # The row's config (the training recipe) builds the same model.
        cfg = load_config(os.path.join(REPO, info.config), opts=['model.backbone.pretrained=None'])
        from_config = Builder(cfg).model
    # The layout of PaddleSeg's release: PaddleSeg's own EMANet, whose weights they are (its EM unit
    # reads its bases' values when built, so the head is built whole).
    released = paddleseg.models.EMANet(num_classes=info.num_classes, backbone=released_backbone)
    assert not model.training and model.align_corners is info.align_corners
    assert shapes(model) == shapes(released) and len(shapes(model)) == RELEASED_KEYS[info.backbone]
    assert shapes(from_config) == shapes(model)
    assert from_config.align_corners is info.align_corners
    backbone = cfg.dic['model']['backbone']
    assert (backbone['type'], backbone['output_stride']) == (info.backbone, 8)
    yaml_text = open(os.path.join(REPO, info.config)).read()
    assert info.weights_url in yaml_text  # the config's comment names the same release
    assert f'{info.miou:.2f} ss / {info.miou_flip:.2f} flip / {info.miou_ms_flip:.2f} ms+flip' in yaml_text


def small_row(url):
    """A zoo row of the quick-start size (ResNet18_vd), its weights at ``url``."""
    return dataclasses.replace(zoo.MODELS['emanet_r50_cityscapes'], name='tiny', backbone='ResNet18_vd',
                               weights_url=url)


def test_pretrained_weights_are_downloaded_once_verified_and_loaded(server, tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    url = f'{server}/zoo/tiny/model.pdparams'
    monkeypatch.setitem(zoo.MODELS, 'tiny', small_row(url))
    paddle.seed(5)
    trained = emanet.create_model('tiny')
    weights = tmp_path / 'model.pdparams'
    paddle.save(trained.state_dict(), str(weights))
    Handler.files['/zoo/tiny/model.pdparams'] = weights.read_bytes()
    for _ in range(2):
        paddle.seed(6)  # a different random start, which the weights must replace
        model = emanet.create_model('tiny', pretrained=True)
        for key, value in trained.state_dict().items():
            np.testing.assert_array_equal(model.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    assert Handler.hits == ['/zoo/tiny/model.pdparams']


def test_pretrained_offline_is_one_clear_error_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        url = f'http://127.0.0.1:{probe.getsockname()[1]}/zoo/tiny/model.pdparams'
    monkeypatch.setitem(zoo.MODELS, 'tiny', small_row(url))
    with pytest.raises(DownloadError, match=f'could not download {re.escape(url)}'):
        emanet.create_model('tiny', pretrained=True)


def test_the_readme_zoo_table_is_the_table_in_code():
    readme = open(os.path.join(REPO, 'README.md')).read()
    rows = re.findall(r'^\| \[(\S+?)\.yml\]\(configs/\S+\) \| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| '
                      r'\[model\]\((\S+)\) \|$', readme, re.MULTILINE)
    assert sorted(rows) == sorted(
        (info.name, info.dataset, f'{info.miou:.2f}', f'{info.miou_flip:.2f}', f'{info.miou_ms_flip:.2f}',
         info.weights_url) for info in zoo.MODELS.values())
