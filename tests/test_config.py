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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_training_tool_says_only_that_a_key_is_misspelt(tiny_config, tmp_path):
    path = tmp_path / 'typo.yml'
    path.write_text(open(tiny_config()).read().replace('batch_size:', 'batch_sise:'))
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


def test_a_base_that_does_not_exist_is_named_with_the_file_naming_it(tmp_path):
    (tmp_path / 'child.yml').write_text('_base_: ../nowhere/base.yml\nbatch_size: 2\n')
    with pytest.raises(ConfigError, match=r"child\.yml: its _base_ file .*nowhere/base\.yml does not exist"):
        load_config(str(tmp_path / 'child.yml'))


def test_a_cycle_of_bases_is_named_file_by_file(tmp_path):
    (tmp_path / 'a.yml').write_text('_base_: b.yml\nbatch_size: 2\n')
    (tmp_path / 'b.yml').write_text('_base_: [c.yml]\n')
    (tmp_path / 'c.yml').write_text('_base_: ./a.yml\n')
    with pytest.raises(ConfigError, match=r"a\.yml: its _base_ files form a cycle "
                                          r"\(.*a\.yml -> .*b\.yml -> .*c\.yml -> .*a\.yml\)"):
        load_config(str(tmp_path / 'a.yml'))


def test_a_config_cannot_build_python_objects(tmp_path):
    victim = tmp_path / 'pwned'
    (tmp_path / 'evil.yml').write_text(f'model: !!python/object/apply:os.system ["touch {victim}"]\n')
    with pytest.raises(ConfigError, match=r"evil\.yml: not valid YAML .*python/object/apply"):
        load_config(str(tmp_path / 'evil.yml'))
    assert not victim.exists()


def test_aliases_that_would_expand_to_billions_of_values_are_refused(tmp_path):
    lines = ['a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]']
    lines += [f'a{i}: &a{i} [{", ".join([f"*a{i - 1}"] * 9)}]' for i in range(1, 9)]  # 9^9 values
    (tmp_path / 'laughs.yml').write_text('\n'.join(lines) + '\n')
    with pytest.raises(ConfigError, match=r"laughs\.yml: its aliases expand to more than 100000 values"):
        load_config(str(tmp_path / 'laughs.yml'))


@pytest.mark.parametrize('content, found', [('- a\n- b\n', 'list'), ('just words\n', 'str')])
def test_a_config_that_is_not_a_mapping_is_named(tmp_path, content, found):
    (tmp_path / 'odd.yml').write_text(content)
    with pytest.raises(ConfigError, match=rf"odd\.yml: a config is a mapping of keys .*this file holds a {found}"):
        load_config(str(tmp_path / 'odd.yml'))
