"""Config mistakes end in one ConfigError naming the file, the key and the closest known name; weights a
config names (``pretrained:``) are read by this package's safe reader, whatever the component."""
import functools
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import paddle
import paddleseg.utils.utils
import pytest
import yaml
from paddleseg.cvlibs import manager
from paddleseg.models.backbones import ResNet18_vd

from conftest import TOOLS
from emanet.checkpoint import CheckpointError
from emanet.config import Builder, ConfigError, build_model, load_config
from emanet.errors import UserError


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


# ---------------------------------------------------------------------------------------------------
# pretrained: of any component goes to this package's reader, never to PaddleSeg's (paddle.load, a plain pickle).

class CreatesAFile:
    """Unpickling this with a plain unpickler (paddle.load) would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.fixture
def crafted_weights(tmp_path):
    """A .pdparams that creates ``marker`` if anything unpickles it with a plain unpickler."""
    marker = tmp_path / 'marker'
    path = tmp_path / 'crafted.pdparams'
    path.write_bytes(pickle.dumps({'weight': CreatesAFile(str(marker))}))
    return str(path), marker


@pytest.fixture
def paddleseg_loaders_refused(monkeypatch):
    """PaddleSeg's and Paddle's pickle loaders raise if called with a file; the files they were called with."""
    calls = []

    def refuse(name):
        def loader(*args, **kwargs):
            if any(isinstance(arg, str) for arg in args):
                calls.append((name, args))
                raise AssertionError(f"{name} was called with {args}")
        return loader
    monkeypatch.setattr(paddle, 'load', refuse('paddle.load'))
    monkeypatch.setattr(paddleseg.utils.utils, 'load_entire_model', refuse('load_entire_model'))
    monkeypatch.setattr(paddleseg.utils.utils, 'load_pretrained_model', refuse('load_pretrained_model'))
    return calls


def types_with_weights():
    """Every model and backbone a config can name, PaddleSeg's own EMANet included."""
    return sorted({*manager.MODELS.components_dict, *manager.BACKBONES.components_dict, 'PaddleSegEMANet'})


def test_pretrained_of_every_model_and_backbone_type_is_kept_from_its_constructor(
        tiny_config, crafted_weights, paddleseg_loaders_refused, monkeypatch):
    """Whatever a constructor would do with ``pretrained`` (PaddleSeg's call paddle.load), it never gets it:
    the builder takes it out, builds, and loads the weights with this package's reader. Constructors are
    stood in for by recorders with their signatures (real ones need per-model arguments); the tests below
    build real ones."""
    path, marker = crafted_weights
    constructed_with = {}
    check_arguments_and_construct = Builder.build_component_impl

    def construct_a_recorder(self, component_class, *args, **kwargs):
        @functools.wraps(component_class)  # the builder checks argument names against the real signature
        def recorder(*args, **kwargs):
            constructed_with[component_class.__name__] = kwargs.get('pretrained')
            return paddle.nn.Layer()
        return check_arguments_and_construct(self, recorder, *args, **kwargs)
    monkeypatch.setattr(Builder, 'build_component_impl', construct_a_recorder)
    builder = Builder(load_config(tiny_config()))
    names = types_with_weights()
    assert len(names) > 150 and {'PSPNet', 'DeepLabV3P', 'FCN', 'PaddleSegEMANet', 'ResNet18_vd'} <= set(names)
    outcomes = {}
    for name in names:
        try:
            builder.build_component({'type': name, 'pretrained': path})
            outcomes[name] = 'built'
        except UserError as err:
            outcomes[name] = str(err)
    refused = f"{path}: refused, not a plain Paddle checkpoint (it would call "
    takes_no_weights = "has no argument 'pretrained'"
    assert {name: outcome for name, outcome in outcomes.items()
            if not (outcome.startswith(refused) or takes_no_weights in outcome)} == {}
    assert sorted(name for name, outcome in outcomes.items() if takes_no_weights in outcome) == ['UNet3Plus']
    assert {name: weights for name, weights in constructed_with.items() if weights is not None} == {}
    assert paddleseg_loaders_refused == [] and not marker.exists()


def config_with_model(tiny_config, tmp_path, model):
    config = yaml.safe_load(open(tiny_config()))
    config['model'] = model
    path = tmp_path / 'model.yml'
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize('model', [
    {'type': 'FCN', 'backbone': {'type': 'ResNet18_vd'}, 'num_classes': 3},
    {'type': 'PaddleSegEMANet', 'backbone': {'type': 'ResNet18_vd', 'output_stride': 8}, 'num_classes': 3,
     'ema_channels': 32, 'gc_channels': 16, 'num_bases': 8},
    {'type': 'BiSeNetV2', 'num_classes': 3},
    {'type': 'EMANet', 'backbone': {'type': 'ResNet18_vd', 'output_stride': 8}, 'num_classes': 3,
     'ema_channels': 32, 'gc_channels': 16, 'num_bases': 8},
], ids=lambda model: model['type'])
def test_a_crafted_pretrained_file_of_a_real_model_ends_in_one_sentence_and_runs_nothing(
        tiny_config, tmp_path, crafted_weights, model):
    """As tools/train.py builds the model: PaddleSeg's models would hand the file to paddle.load."""
    path, marker = crafted_weights
    cfg = load_config(config_with_model(tiny_config, tmp_path, {**model, 'pretrained': path}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: refused, .*'_?io\.open'"):
        Builder(cfg).model
    assert not marker.exists()


def test_pretrained_of_a_paddleseg_model_loads_what_fits_and_warns_of_the_rest(tiny_config, tmp_path, caplog):
    """PaddleSeg's semantics for its models' pretrained: matching keys load, the others are named in a warning."""
    model = {'type': 'BiSeNetV2', 'num_classes': 3}
    source = Builder(load_config(config_with_model(tiny_config, tmp_path, model))).model
    state = {key: value.numpy() for key, value in source.state_dict().items()}
    head = next(key for key in state if key.endswith('weight') and state[key].shape[0] == 3)
    state[head] = state[head][:2]  # as from a checkpoint for another number of classes
    path = str(tmp_path / 'bisenet.pdparams')
    paddle.save(state, path)
    cfg = load_config(config_with_model(tiny_config, tmp_path, {**model, 'pretrained': path}))
    with caplog.at_level(logging.WARNING, logger='emanet'):
        loaded = Builder(cfg).model
    for key, value in state.items():
        if key != head:
            np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value, err_msg=key)
    assert f"{path}: loading the matching weights only; shape mismatch: {head}" in caplog.text


def test_pretrained_of_this_packages_emanet_must_fit_whole(tiny_config, tmp_path):
    """As its constructor's own ``pretrained``: whole-model weights, every key checked."""
    path = str(tmp_path / 'backbone_only.pdparams')
    paddle.save(ResNet18_vd(output_stride=8).state_dict(), path)
    cfg = load_config(tiny_config(), opts=[f'model.pretrained={path!r}'])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)} does not fit EMANet: missing: backbone\.conv1_1"):
        Builder(cfg).model
