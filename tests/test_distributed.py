"""The published recipes' way of running: several processes under paddle.distributed.launch (gloo on CPU).

From an empty weights cache and an empty data root, two processes download the backbone once (from
a file server on 127.0.0.1), draw the scenes once, train to identical weights (EM bases and BatchNorm
statistics too), save each checkpoint once, and evaluate shards whose summed confusion matrix equals
a single process's evaluation of the same checkpoint.
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import paddle
from paddleseg.models.backbones import ResNet18_vd

from conftest import TOOLS, Handler, street_scenes_config

HERE = os.path.dirname(os.path.abspath(__file__))
BACKBONE_URL_PATH = '/backbones/ResNet18_vd_ssld.tar.gz'

pytestmark = pytest.mark.slow  # multi-process launches



def backbone_archive(tmp_path):
    """ResNet18_vd weights packed as PaddleSeg publishes backbones: a .tar.gz holding one .pdparams."""
    paddle.seed(1)
    weights = tmp_path / 'model.pdparams'
    paddle.save(ResNet18_vd(output_stride=8).state_dict(), str(weights))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
        archive.add(weights, arcname='ResNet18_vd_ssld_pretrained/model.pdparams')
    return buffer.getvalue()


def launch(tmp_path, log_name, script, *args, env):
    log_dir = tmp_path / log_name
    result = subprocess.run([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                             '--log_dir', str(log_dir), script, *map(str, args)],
                            capture_output=True, text=True, timeout=900, env=env)
    logs = {path.name: path.read_text() for path in sorted(log_dir.glob('workerlog.*'))}
    assert result.returncode == 0, ''.join(logs.values())[-4000:] + result.stderr[-2000:]
    return logs


def run_tool(name, *args, env):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def comparable(metrics):
    """Metrics as a JSON round trip gives them (NaN equal to NaN), without the time taken."""
    return json.dumps({key: value for key, value in metrics.items() if key != 'seconds'}, sort_keys=True)


def test_two_processes_from_an_empty_cache_train_alike_and_evaluate_as_one(server, tmp_path):
    Handler.files[BACKBONE_URL_PATH] = backbone_archive(tmp_path)
    Handler.delay = 0.5  # both ranks ask for the weights while the first download is under way
    config = street_scenes_config(
        tmp_path / 'config.yml', tmp_path / 'scenes', iters=4, num_val=5, size=(96, 48),
        optimizer='{type: SGD, momentum: 0.9, weight_decay: 4.0e-5}', learning_rate=0.01,
        backbone=f'{{type: ResNet18_vd, output_stride: 8, pretrained: {server}{BACKBONE_URL_PATH}}}',
        extra='test_config: {aug_eval: True, flip_horizontal: True}\n')
    env = dict(os.environ, EMANET_CACHE=str(tmp_path / 'cache'))
    logs = launch(tmp_path, 'train_log', os.path.join(HERE, 'dist_tool_worker.py'), tmp_path,
                  '--config', config, '--save_dir', tmp_path / 'out', '--do_eval', '--save_interval', 2,
                  '--seed', 3, env=env)

    # One download, one drawing; the other rank waited and used them.
    assert Handler.hits == [BACKBONE_URL_PATH]
    assert sum('drawing street scenes' in log for log in logs.values()) == 1
    assert sum('Loaded 115/115 weights of ResNet_vd' in log for log in logs.values()) == 2
    # Identical weights, EM bases and (averaged at each save) BatchNorm statistics on both ranks.
    ranks = [np.load(tmp_path / f'rank{rank}.npz', allow_pickle=True) for rank in range(2)]
    state = [key for key in ranks[0].files if key != 'renamed']
    assert 'head.emau.mu' in state and 'head.bottleneck._batch_norm._variance' in state
    for key in state:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    # Process 0 alone writes the checkpoints (both write the config, which is the same).
    assert sorted(os.listdir(tmp_path / 'out')) == ['best_model', 'config.yml', 'iter_2', 'iter_4']
    assert set(ranks[0]['renamed']) >= {'iter_2', 'iter_4', 'best_model'}
    assert list(ranks[1]['renamed']) == ['config.yml']
    # Rank 0's checkpoint is that model.
    saved = paddle.load(str(tmp_path / 'out' / 'iter_4' / 'model.pdparams'))
    for key in state:
        np.testing.assert_array_equal(saved[key].numpy(), ranks[0][key], err_msg=key)

    # The evaluation during training (each rank half the images) equals one process's val.py.
    during_training = json.loads((tmp_path / 'out' / 'iter_4' / 'train_state.json').read_text())['evaluation']
    assert during_training['num_images'] == 5
    run_tool('val.py', '--config', config, '--model_path', tmp_path / 'out' / 'iter_4' / 'model.pdparams',
             '--save_json', tmp_path / 'one.json', env=env)
    one_process = json.loads((tmp_path / 'one.json').read_text())
    assert one_process['confusion_matrix'] == during_training['confusion_matrix']
    assert sum(map(sum, one_process['confusion_matrix'])) == 5 * 96 * 48 - ignored_pixels(tmp_path / 'scenes')

    # tools/val.py in two processes: the same metrics to the last digit.
    launch(tmp_path, 'val_log', os.path.join(TOOLS, 'val.py'), '--config', config,
           '--model_path', tmp_path / 'out' / 'iter_4' / 'model.pdparams', '--save_json', tmp_path / 'two.json',
           env=env)
    assert comparable(json.loads((tmp_path / 'two.json').read_text())) == comparable(one_process)


def ignored_pixels(root):
    """Pixels of the val labels marked 255 (the ego vehicle's bonnet), which no metric counts."""
    from PIL import Image
    return sum(int((np.asarray(Image.open(path)) == 255).sum())
               for path in root.glob('gtFine/val/*/*_gtFine_labelTrainIds.png'))
