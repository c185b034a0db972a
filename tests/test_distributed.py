"""The published recipes' way of running: several processes under paddle.distributed.launch (gloo on CPU).

From an empty weights cache and an empty data root, two processes download the backbone once (from
a file server on 127.0.0.1), draw the scenes once, train to identical weights (EM bases and BatchNorm
statistics too), save each checkpoint once, and evaluate shards whose summed confusion matrix equals
a single process's evaluation of the same checkpoint. Paddle's multi-node form (two launchers of one process
each) trains to the same weights, and when one node is stopped the other ends saying so.
"""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import paddle
from paddleseg.models.backbones import ResNet18_vd

from conftest import TOOLS, Handler, serving, street_scenes_config
from launchers import (BOUND_SECONDS, UNCLEAN, ending, launch, node_of_process_0, start_nodes, stop_all,
                       wait_until)

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


def launched(log_dir, script, *args, env):
    """The worker logs of a two-process launch, which must succeed."""
    code, _, console, logs = launch(log_dir, script, *args, env=env, timeout=900)
    assert code == 0, ''.join(logs.values())[-4000:] + console[-2000:]
    return logs


def run_tool(name, *args, env):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def comparable(metrics):
    """Metrics as a JSON round trip gives them (NaN equal to NaN), without the time taken."""
    return json.dumps({key: value for key, value in metrics.items() if key != 'seconds'}, sort_keys=True)


# What both training runs are given besides their config, iterations and folder (the weights at a save depend on
# where the saves were: each one averages the BatchNorm statistics of the processes).
TRAIN_ARGS = ('--save_interval', 2, '--seed', 3)


@pytest.fixture(scope='module')
def one_launch(tmp_path_factory):
    """tools/train.py (through dist_tool_worker.py) in one launch of two processes, from an empty weights cache
    and an empty data root, for 4 of the config's 1000 iterations: {'work', 'config', 'env', 'logs', 'hits'}."""
    work = tmp_path_factory.mktemp('one_launch')
    with serving() as server:
        Handler.files[BACKBONE_URL_PATH] = backbone_archive(work)
        Handler.delay = 0.5  # both ranks ask for the weights while the first download is under way
        # One learning-rate schedule for every run: the weights after 4 iterations do not depend on how many follow.
        config = street_scenes_config(
            work / 'config.yml', work / 'scenes', iters=1000, decay_steps=1000, num_val=5, size=(96, 48),
            optimizer='{type: SGD, momentum: 0.9, weight_decay: 4.0e-5}', learning_rate=0.01,
            backbone=f'{{type: ResNet18_vd, output_stride: 8, pretrained: {server}{BACKBONE_URL_PATH}}}',
            extra='test_config: {aug_eval: True, flip_horizontal: True}\n')
        env = dict(os.environ, EMANET_CACHE=str(work / 'cache'))
        logs = launched(work / 'train_log', os.path.join(HERE, 'dist_tool_worker.py'), work,
                        '--config', config, '--iters', 4, '--save_dir', work / 'out', '--do_eval', *TRAIN_ARGS,
                        env=env)
        hits = list(Handler.hits)
    return {'work': work, 'config': config, 'env': env, 'logs': logs, 'hits': hits}


def test_two_processes_from_an_empty_cache_train_alike_and_evaluate_as_one(one_launch):
    work, config, env, logs = (one_launch[key] for key in ('work', 'config', 'env', 'logs'))
    # One download, one drawing; the other rank waited and used them.
    assert one_launch['hits'] == [BACKBONE_URL_PATH]
    assert sum('drawing street scenes' in log for log in logs.values()) == 1
    assert sum('Loaded 115/115 weights of ResNet_vd' in log for log in logs.values()) == 2
    # Identical weights, EM bases and (averaged at each save) BatchNorm statistics on both ranks.
    ranks = [np.load(work / f'rank{rank}.npz', allow_pickle=True) for rank in range(2)]
    state = [key for key in ranks[0].files if key != 'renamed']
    assert 'head.emau.mu' in state and 'head.bottleneck._batch_norm._variance' in state
    for key in state:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    # Process 0 alone writes the checkpoints (both write the config, which is the same).
    assert sorted(os.listdir(work / 'out')) == ['best_model', 'config.yml', 'iter_2', 'iter_4']
    assert set(ranks[0]['renamed']) >= {'iter_2', 'iter_4', 'best_model'}
    assert list(ranks[1]['renamed']) == ['config.yml']
    # Rank 0's checkpoint is that model.
    saved = paddle.load(str(work / 'out' / 'iter_4' / 'model.pdparams'))
    for key in state:
        np.testing.assert_array_equal(saved[key].numpy(), ranks[0][key], err_msg=key)

    # The evaluation during training (each rank half the images) equals one process's val.py.
    during_training = json.loads((work / 'out' / 'iter_4' / 'train_state.json').read_text())['evaluation']
    assert during_training['num_images'] == 5
    run_tool('val.py', '--config', config, '--model_path', work / 'out' / 'iter_4' / 'model.pdparams',
             '--save_json', work / 'one.json', env=env)
    one_process = json.loads((work / 'one.json').read_text())
    assert one_process['confusion_matrix'] == during_training['confusion_matrix']
    assert sum(map(sum, one_process['confusion_matrix'])) == 5 * 96 * 48 - ignored_pixels(work / 'scenes')

    # tools/val.py in two processes: the same metrics to the last digit.
    launched(work / 'val_log', os.path.join(TOOLS, 'val.py'), '--config', config,
             '--model_path', work / 'out' / 'iter_4' / 'model.pdparams', '--save_json', work / 'two.json',
             env=env)
    assert comparable(json.loads((work / 'two.json').read_text())) == comparable(one_process)


def test_two_nodes_train_like_one_launch_and_when_one_node_is_stopped_the_other_ends_saying_so(
        one_launch, tmp_path):
    """Paddle's multi-node form, two launchers of one process on loopback standing in for two machines."""
    # The backbone's weights come from the cache the launch filled (its server has stopped).
    nodes = start_nodes(tmp_path, '--config', one_launch['config'], '--save_dir', tmp_path / 'two', *TRAIN_ARGS,
                        env=one_launch['env'])
    try:
        wait_until(lambda: (tmp_path / 'two' / 'iter_4' / 'train_state.json').exists(), nodes)
        # The node of process 0 goes: it holds the store the processes met through.
        stopped = node_of_process_0(tmp_path)
        nodes[stopped].send_signal(signal.SIGTERM)  # as Ctrl-C, a scheduler or a shutdown stops a launcher
        code, seconds = ending(nodes[1 - stopped])
    finally:
        stop_all(nodes)

    one = paddle.load(str(one_launch['work'] / 'out' / 'iter_4' / 'model.pdparams'))
    two = paddle.load(str(tmp_path / 'two' / 'iter_4' / 'model.pdparams'))
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_array_equal(one[key].numpy(), two[key].numpy(), err_msg=key)

    console = (tmp_path / f'console{1 - stopped}.txt').read_text()
    assert code != 0
    assert seconds < BOUND_SECONDS
    assert 'error: process 0 of 2 stopped: it received SIGTERM' in console, console[-3000:]
    assert not any(sign in console for sign in UNCLEAN), console[-3000:]


def ignored_pixels(root):
    """Pixels of the val labels marked 255 (the ego vehicle's bonnet), which no metric counts."""
    from PIL import Image
    return sum(int((np.asarray(Image.open(path)) == 255).sum())
               for path in root.glob('gtFine/val/*/*_gtFine_labelTrainIds.png'))
