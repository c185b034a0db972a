"""What the tools log: the lines a user acts on, and none of Paddle's or PaddleSeg's notes.

Each tool runs in its own process, as a user runs it, on the tiny dataset of conftest.py.
"""
import os
import re
import subprocess
import sys

import paddle
import pytest
import yaml

from conftest import CONFIG, TOOLS
from emanet.config import build_model, load_config

# Notes of Paddle and PaddleSeg that no tool should pass on to the user.
NOISE = ('ccache', 'will be trained from scratch', 'Add the `', 'Use the following config',
         'not support input out tensor', "'place' interface", 'track global mean and variance')
TRAIN_LINE = re.compile(r'\[TRAIN\] epoch: \d+, iter: (\d+)/(\d+), loss: .* \| ETA \d+:\d\d:\d\d$', re.M)
EVAL_LINE = re.compile(r'^.*\[EVAL\] #Images: 2 mIoU: .*$', re.M)

pytestmark = pytest.mark.slow  # a process per tool run


def run_tool(name, *args):
    """stdout and stderr of tools/<name>, which must succeed."""
    result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope='module')
def minimal(tiny_dataset, tmp_path_factory):
    """A config with only model and val_dataset, one that adds a flip test_config, and weights for the model."""
    work = tmp_path_factory.mktemp('tools')
    full = yaml.safe_load(CONFIG.format(root=tiny_dataset))
    config = work / 'minimal.yml'
    config.write_text(yaml.safe_dump({key: full[key] for key in ('model', 'val_dataset')}))
    with_flip = work / 'with_flip.yml'
    with_flip.write_text(config.read_text() + 'test_config: {aug_eval: True, flip_horizontal: True}\n')
    weights = work / 'model.pdparams'
    paddle.seed(0)
    paddle.save(build_model(load_config(str(config), training=False)).state_dict(), str(weights))
    return {'config': config, 'with_flip': with_flip, 'weights': weights, 'work': work, 'images': tiny_dataset}


@pytest.fixture(scope='module')
def logs(minimal):
    """What export, val (of the weights and of the export) and predict print from the minimal config."""
    exported = minimal['work'] / 'exported'
    return {
        'export': run_tool('export.py', '--config', minimal['config'], '--model_path', minimal['weights'],
                           '--save_dir', exported),
        'val': run_tool('val.py', '--config', minimal['config'], '--model_path', minimal['weights']),
        'val_exported': run_tool('val.py', '--config', minimal['with_flip'], '--model_path', exported),
        'val_flip': run_tool('val.py', '--config', minimal['with_flip'], '--model_path', minimal['weights']),
        'predict': run_tool('predict.py', '--config', minimal['config'], '--model_path', minimal['weights'],
                            '--image_path', minimal['images'] / '8.jpg', '--save_dir', minimal['work'] / 'pred'),
    }


def test_export_val_and_predict_need_only_model_and_val_dataset(minimal, logs):
    assert (minimal['work'] / 'exported' / 'deploy.yaml').is_file()
    assert EVAL_LINE.search(logs['val']) and EVAL_LINE.search(logs['val_exported'])
    assert (minimal['work'] / 'pred' / 'pseudo_color_prediction' / '8.png').is_file()


def test_export_val_and_predict_pass_on_no_notes_of_paddle_or_paddleseg(logs):
    for tool, log in logs.items():
        assert not [note for note in NOISE if note in log], tool
    for tool in ('export', 'val', 'predict'):  # what was loaded, instead of "trained from scratch"
        assert 'Loaded 152/152 weights of EMANet from' in logs[tool]


def test_val_of_an_exported_model_with_flip_gives_the_dygraph_models_metrics(logs):
    exported, dygraph = (EVAL_LINE.search(logs[run]).group(0).split('[EVAL]')[1] for run in ('val_exported', 'val_flip'))
    assert exported == dygraph and '[WARNING]' not in logs['val_exported']
    assert exported != EVAL_LINE.search(logs['val']).group(0).split('[EVAL]')[1]  # the flip changed the figures


@pytest.fixture(scope='module')
def training(tiny_dataset, tmp_path_factory):
    """The logs of a short training run, and of one with --verbose and PaddleSeg's flags, and the first's save_dir."""
    work = tmp_path_factory.mktemp('train')
    config = work / 'config.yml'
    config.write_text(CONFIG.format(root=tiny_dataset))
    plain = run_tool('train.py', '--config', config, '--save_dir', work / 'plain', '--iters', 6, '--log_iters', 5,
                     '--save_interval', 6, '--seed', 0)
    verbose = run_tool('train.py', '--config', config, '--save_dir', work / 'verbose', '--iters', 1, '--verbose',
                       '--use_ema', '--data_format', 'NHWC', '--repeats', 1, '--seed', 0)
    return {'plain': plain, 'verbose': verbose, 'save_dir': work / 'plain'}


def test_the_first_training_line_comes_after_one_iteration_with_the_eta(training):
    lines = TRAIN_LINE.findall(training['plain'])
    assert [(int(it), int(total)) for it, total in lines] == [(1, 6), (5, 6), (6, 6)]


def test_the_config_goes_to_save_dir_and_to_the_log_only_with_verbose(training):
    saved = yaml.safe_load((training['save_dir'] / 'config.yml').read_text())
    assert saved['iters'] == 6 and saved['model']['num_bases'] == 8  # as loaded, with --iters applied
    assert 'num_bases' not in training['plain']
    assert re.search(r'Config .*config.yml as loaded:\n(.*\n)*  num_bases: 8\n', training['verbose'])


def test_training_passes_on_no_notes_of_paddle_or_paddleseg(training):
    assert not [note for note in NOISE if note in training['plain']]


def test_paddleseg_flags_without_effect_get_one_warning_each(training):
    assert '[WARNING]' not in training['plain']  # PaddleSeg's own warnings are gone too
    warnings = re.findall(r'\[WARNING\] (.*)', training['verbose'])
    assert [line.split(' ')[0] for line in warnings] == ['--use_ema', '--data_format']
