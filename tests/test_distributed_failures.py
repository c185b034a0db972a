"""A multi-process run that cannot go on ends everywhere, soon, saying why (paddle.distributed.launch, gloo on CPU).

One process meeting a bad file or a NaN loss ends every process within a minute, and the launcher's
console (what the user sees without opening the worker logs) carries that process's one sentence.
Paddle's multi-node form, two launchers on loopback standing in for two machines, trains to the
weights of one two-process launch; when one node is stopped (SIGTERM) or dies (SIGKILL), the other
ends with a sentence saying so.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import paddle

from conftest import CONFIG, TOOLS
from emanet.config import build_model, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
# A process left waiting for a peer that has stopped must end within this many seconds.
BOUND_SECONDS = 60
# Signs of an ending that is not one sentence: a Python traceback, Paddle's report of a fatal signal.
UNCLEAN = ('Traceback', 'FatalError', 'terminate called')

pytestmark = pytest.mark.slow  # multi-process launches


def dataset_copy(tiny_dataset, tmp_path, iters=4, decay_steps=None):
    """A config on a private copy of the tiny dataset (its files may be damaged); returns (config, root).

    ``decay_steps`` fixes the learning rate's decay, which otherwise spans the run's iterations.
    """
    root = tmp_path / 'data'
    shutil.copytree(tiny_dataset, root)
    text = CONFIG.format(root=root).replace('iters: 6', f'iters: {iters}')
    if decay_steps:
        text = text.replace('end_lr: 0}', f'end_lr: 0, decay_steps: {decay_steps}}}')
    config = tmp_path / 'config.yml'
    config.write_text(text)
    return config, root


def launch(log_dir, script, *args):
    """One launcher with two processes; (exit code, seconds, launcher console, worker logs)."""
    start = time.time()
    result = subprocess.run([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                             '--log_dir', str(log_dir), script, *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    logs = {path.name: path.read_text() for path in sorted(log_dir.glob('workerlog.*'))}
    return result.returncode, time.time() - start, result.stdout + result.stderr, logs


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def start_nodes(tmp_path, *train_args):
    """tools/train.py in Paddle's multi-node form on loopback: two launchers of one process each, as on
    two machines (node N logs to tmp_path/nodeN, its console goes to tmp_path/consoleN.txt)."""
    master = f'127.0.0.1:{free_port()}'
    nodes = []
    for node in range(2):
        with open(tmp_path / f'console{node}.txt', 'w') as console:
            nodes.append(subprocess.Popen(
                [sys.executable, '-m', 'paddle.distributed.launch', '--nnodes', '2', '--master', master,
                 '--nproc_per_node', '1', '--log_dir', str(tmp_path / f'node{node}'), os.path.join(TOOLS, 'train.py'),
                 *map(str, train_args)],
                stdout=console, stderr=subprocess.STDOUT))
    return nodes


def worker_log(tmp_path, node):
    path = tmp_path / f'node{node}' / 'workerlog.0'
    return path.read_text() if path.exists() else ''


def node_of_process_0(tmp_path):
    return next(node for node in range(2) if 'Training EMANet' in worker_log(tmp_path, node))


def wait_until(condition, nodes, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline and all(node.poll() is None for node in nodes), 'training did not get there'
        time.sleep(0.5)


def ending(node):
    """The exit code of a launcher left alone, and the seconds it took to end."""
    start = time.time()
    code = node.wait(timeout=BOUND_SECONDS + 60)
    return code, time.time() - start


def stop_all(launchers):
    """Kill what is left of the launchers and their processes (which a killed launcher leaves running)."""
    for launcher in launchers:
        if launcher.poll() is None:
            workers = subprocess.run(['pgrep', '-P', str(launcher.pid)], capture_output=True, text=True).stdout.split()
            launcher.kill()
            launcher.wait()
            for pid in map(int, workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


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


def test_two_nodes_train_like_one_launch_and_when_one_node_is_stopped_the_other_ends_saying_so(
        tiny_dataset, tmp_path):
    # One learning-rate schedule for both runs: the weights after 4 iterations do not depend on how many follow.
    config, _ = dataset_copy(tiny_dataset, tmp_path, iters=1000, decay_steps=1000)
    code, _, console, _ = launch(tmp_path / 'log', os.path.join(TOOLS, 'train.py'), '--config', config,
                                 '--save_dir', tmp_path / 'one', '--seed', 3, '--iters', 4)
    assert code == 0, console[-3000:]

    nodes = start_nodes(tmp_path, '--config', config, '--save_dir', tmp_path / 'two', '--seed', 3,
                        '--save_interval', 4)
    try:
        wait_until(lambda: (tmp_path / 'two' / 'iter_4' / 'train_state.json').exists(), nodes)
        # The node of process 0 goes: it holds the store the processes met through.
        stopped = node_of_process_0(tmp_path)
        nodes[stopped].send_signal(signal.SIGTERM)  # as Ctrl-C, a scheduler or a shutdown stops a launcher
        code, seconds = ending(nodes[1 - stopped])
    finally:
        stop_all(nodes)

    one = paddle.load(str(tmp_path / 'one' / 'iter_4' / 'model.pdparams'))
    two = paddle.load(str(tmp_path / 'two' / 'iter_4' / 'model.pdparams'))
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_array_equal(one[key].numpy(), two[key].numpy(), err_msg=key)

    console = (tmp_path / f'console{1 - stopped}.txt').read_text()
    assert code != 0
    assert seconds < BOUND_SECONDS
    assert 'error: process 0 of 2 stopped: it received SIGTERM' in console, console[-3000:]
    assert not any(sign in console for sign in UNCLEAN), console[-3000:]


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
