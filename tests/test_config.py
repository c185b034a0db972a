"""Config mistakes end in one ConfigError naming the file, the key and the closest known name."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml
from paddleseg.models.backbones import ResNet18_vd

from conftest import TOOLS
from emanet.config import Builder, ConfigError, build_model, load_config


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match='config file not found: .*nope.yml'):
        load_config(str(tmp_path / 'nope.yml'))


def test_unknown_top_level_key_suggests_the_closest(tiny_config):
    with pytest.raises(ConfigError, match="config.yml: unknown key 'val_datset' \\(did you mean 'val_dataset'\\?\\)"):
        load_config(tiny_config('val_datset: {}\n'))


def test_unknown_component_type_suggests_the_closest(tiny_config):
    cfg = load_config(tiny_config(), opts=['model.type=EMANett'])
    with pytest.raises(ConfigError, match="unknown type 'EMANett' \\(did you mean 'EMANet'\\?\\)"):
        Builder(cfg).model


def test_unknown_argument_suggests_the_closest(tiny_config):
    cfg = load_config(tiny_config(), opts=['model.num_base=4'])
    with pytest.raises(ConfigError, match="EMANet has no argument 'num_base' \\(did you mean 'num_bases'\\?\\)"):
        Builder(cfg).model
    cfg = load_config(tiny_config(), opts=['model.backbone.output_strid=8'])
    with pytest.raises(ConfigError, match="has no argument 'output_strid' \\(did you mean 'output_stride'\\?\\)"):
        Builder(cfg).model


def test_backbone_pretrained_weights_load_through_the_safe_loader(tiny_config, tmp_path):
    paddle.seed(3)
    source = ResNet18_vd(output_stride=8)
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    state['fc.weight'] = np.zeros([2, 2], 'float32')  # ImageNet heads are not part of the backbone
    path = tmp_path / 'backbone.pdparams'
    paddle.save(state, str(path))
    cfg = load_config(tiny_config(), opts=[f'model.backbone.pretrained={str(path)!r}'])
    model = Builder(cfg).model
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(model.backbone.state_dict()[key].numpy(), value.numpy())


def test_build_model_with_weights_skips_the_backbone_download(tiny_config, tmp_path):
    cfg = load_config(tiny_config(), opts=["model.backbone.pretrained='http://127.0.0.1:9/never.tar.gz'"])
    path = str(tmp_path / 'model.pdparams')
    paddle.save(Builder(load_config(tiny_config())).model.state_dict(), path)
    model = build_model(cfg, weights=path)
    assert model.head.emau.mu.shape == [1, 32, 8]


def test_tools_print_one_line_for_a_bad_config(tiny_config, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'train.py'), '--config', tiny_config(),
                             '--opts', 'model.num_base=4', '--save_dir', str(tmp_path / 'out')],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: ") and "EMANet has no argument 'num_base' (did you mean 'num_bases'?)" in result.stderr


def test_a_misspelt_key_is_named_before_paddleseg_asks_for_the_key_it_misses(tiny_config, tmp_path):
    path = tmp_path / 'typo.yml'
    path.write_text(open(tiny_config()).read().replace('batch_size:', 'batch_sise:'))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == f"{path}: unknown key 'batch_sise' (did you mean 'batch_size'?)"
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'train.py'), '--config', str(path),
                             '--save_dir', str(tmp_path / 'out')], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [  # one line: no warning of Paddle's before it either
        f"error: {path}: unknown key 'batch_sise' (did you mean 'batch_size'?)"]


def _without(path, *keys):
    """The config at ``path`` rewritten without the top-level ``keys``."""
    dic = yaml.safe_load(open(path))
    with open(path, 'w') as f:
        yaml.safe_dump({key: value for key, value in dic.items() if key not in keys}, f)
    return path


def test_a_key_training_needs_is_named_when_missing(tiny_config):
    with pytest.raises(ConfigError, match=r"config.yml: missing key 'optimizer' \(training needs batch_size, "
                                          r"iters, train_dataset, optimizer, lr_scheduler, loss, model\)$"):
        load_config(_without(tiny_config(), 'optimizer'))


def test_without_training_model_and_val_dataset_are_enough(tiny_config):
    path = _without(tiny_config(), 'batch_size', 'iters', 'train_dataset', 'optimizer', 'lr_scheduler', 'loss')
    with pytest.raises(ConfigError, match="missing key 'batch_size'"):
        load_config(path)
    model = build_model(load_config(path, training=False))
    model.eval()
    logits, = model(paddle.zeros([1, 3, 32, 32]))
    assert logits.shape == [1, 3, 32, 32]  # num_classes 3 from the val set
    with pytest.raises(ConfigError, match=r"missing key 'val_dataset' \(export, evaluation and prediction "
                                          r"need model, val_dataset\)"):
        load_config(_without(path, 'val_dataset'), training=False)
