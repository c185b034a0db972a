"""A multi-process run that cannot go on ends everywhere, soon, saying why (paddle.distributed.launch, gloo on CPU).

One process meeting a bad file or a NaN loss ends every process within a minute, and the launcher's
console (what the user sees without opening the worker logs) carries that process's one sentence.
In Paddle's multi-node form, two launchers on loopback standing in for two machines, when one node dies
(SIGKILL) the other ends with a sentence saying so (test_distributed.py stops one with SIGTERM).
"""
import os
import shutil
import signal
import subprocess

import pytest
import paddle

from conftest import CONFIG, TOOLS
from launchers import (BOUND_SECONDS, UNCLEAN, ending, launch, node_of_process_0, start_nodes, stop_all,
                       wait_until, worker_log)
from emanet.config import build_model, load_config

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.slow  # multi-process launches


def dataset_copy(tiny_dataset, tmp_path, iters=4):
    """A config on a private copy of the tiny dataset (its files may be damaged); returns (config, root)."""
    root = tmp_path / 'data'
    shutil.copytree(tiny_dataset, root)
    text = CONFIG.format(root=root).replace('iters: 6', f'iters: {iters}')
    config = tmp_path / 'config.yml'
    config.write_text(text)
    return config, root


def test_a_bad_file_in_one_process_evaluation_ends_both_and_the_console_names_it(tiny_dataset, tmp_path):
    config, root = dataset_copy(tiny_dataset, tmp_path)
    weights = tmp_path / 'model.pdparams'
    paddle.save(build_model(load_config(str(config), training=False)).state_dict(), str(weights))
    # val.txt lists 8.jpg and 9.jpg; process 1 evaluates the second.
    (root / '9.jpg').write_bytes((root / '9.jpg').read_bytes()[:300])

    code, seconds, console, logs = launch(tmp_path / 'log', os.path.join(TOOLS, 'val.py'), '--config', config,
                                          '--model_path', weights)

    assert code != 0
    assert seconds < BOUND_SECONDS
    bad_file = str(root / '9.jpg')
    # The launcher's console carries process 0's log: the other process's sentence is there.
    assert any(line.startswith('error: process 1 of 2 stopped: ') and bad_file in line
               for line in console.splitlines()), console[-3000:]
    assert not any(sign in console for sign in UNCLEAN), console[-3000:]
    # Each process ends with one sentence: its own error, or the other's.
    last_lines = {name: log.rstrip().splitlines()[-1] for name, log in logs.items()}
    assert last_lines['workerlog.1'].startswith('error: ') and bad_file in last_lines['workerlog.1']
    assert last_lines['workerlog.0'] == 'error: process 1 of 2 stopped: ' + last_lines['workerlog.1'][len('error: '):]


def test_a_nan_loss_in_one_process_ends_both_and_the_console_says_so(tiny_dataset, tmp_path):
    config, _ = dataset_copy(tiny_dataset, tmp_path)

    code, seconds, console, logs = launch(tmp_path / 'log', os.path.join(HERE, 'dist_nan_loss_worker.py'),
                                          '--config', config, '--save_dir', tmp_path / 'out', '--seed', 3)

    assert code != 0
    assert seconds < BOUND_SECONDS
    assert 'loss is nan at iteration 2' in console, console[-3000:]
    assert not any(sign in console for sign in UNCLEAN), console[-3000:]
    assert logs['workerlog.0'].rstrip().splitlines()[-1].startswith(
        'error: process 1 of 2 stopped: loss is nan at iteration 2')


def test_when_one_node_dies_without_a_word_the_other_ends_saying_so(tiny_dataset, tmp_path):
    config, _ = dataset_copy(tiny_dataset, tmp_path, iters=1000)
    nodes = start_nodes(tmp_path, '--config', config, '--save_dir', tmp_path / 'out', '--seed', 3, '--log_iters', 1)
    try:
        wait_until(lambda: any('iter: 3/' in worker_log(tmp_path, node) for node in range(2)), nodes)
        dies = 1 - node_of_process_0(tmp_path)
        worker = next(int(pid) for pid in subprocess.check_output(['pgrep', '-P', str(nodes[dies].pid)]).split()
                      if b'PADDLE_TRAINER_ID=' in open(f'/proc/{int(pid)}/environ', 'rb').read())
        nodes[dies].kill()  # the machine is gone: its launcher and its process with it
        os.kill(worker, signal.SIGKILL)
        code, seconds = ending(nodes[1 - dies])
    finally:
        stop_all(nodes)

    console = (tmp_path / f'console{1 - dies}.txt').read_text()
    assert code != 0
    assert seconds < BOUND_SECONDS
    assert 'error: lost contact with process 1 of 2: it stopped without a word' in console, console[-3000:]
    assert not any(sign in console for sign in UNCLEAN), console[-3000:]
