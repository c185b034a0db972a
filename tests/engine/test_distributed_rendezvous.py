"""The peer watch meets where paddle.distributed.launch meets, and its own trouble never stops or hangs a run.

Cluster schedulers and PyTorch set-ups export MASTER_ADDR and MASTER_PORT; Paddle's launcher passes them
through untouched and its processes meet at PADDLE_MASTER whatever they say. A two-process evaluation
under the launcher gives the same metrics with them pointing at a closed port or at a port that accepts
and never answers. A watch that cannot reach its store, or whose peer never joins, says so once and lets
the run go on.
"""
import json
import logging
import os
import socket
import threading
import time

import paddle
import pytest
from paddle.base import core

from conftest import CONFIG, TOOLS
from launchers import free_port, launch
from emanet.config import build_model, load_config
from emanet.engine import distributed
from emanet.engine.distributed import PeerWatch

# A launch that would hang fails the test after this many seconds instead of holding up the suite.
LAUNCH_TIMEOUT = 120


@pytest.fixture(scope='module')
def evaluation(tiny_dataset, tmp_path_factory):
    """tools/val.py's arguments for a small model on the tiny dataset, and its metrics under a plain launch."""
    work = tmp_path_factory.mktemp('rendezvous')
    config = work / 'config.yml'
    config.write_text(CONFIG.format(root=tiny_dataset))
    weights = work / 'model.pdparams'
    paddle.seed(1)
    paddle.save(build_model(load_config(str(config), training=False)).state_dict(), str(weights))
    args = (os.path.join(TOOLS, 'val.py'), '--config', config, '--model_path', weights)
    code, _, console, _ = launch(work / 'plain_log', *args, '--save_json', work / 'plain.json',
                                 timeout=LAUNCH_TIMEOUT)
    assert code == 0, console[-3000:]
    return {'args': args, 'metrics': metrics_of(work / 'plain.json')}


def metrics_of(path):
    return {key: value for key, value in json.loads(path.read_text()).items() if key != 'seconds'}


def evaluate_with_master(evaluation, tmp_path, port):
    """tools/val.py in two processes with MASTER_ADDR=127.0.0.1 and MASTER_PORT=port; its metrics."""
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    code, _, console, logs = launch(tmp_path / 'log', *evaluation['args'], '--save_json', tmp_path / 'metrics.json',
                                    env=env, timeout=LAUNCH_TIMEOUT)
    assert code == 0, console[-3000:]
    # Both watches met where the processes did: neither gave up.
    assert not any('peer watch' in log for log in logs.values()), ''.join(logs.values())[-3000:]
    return metrics_of(tmp_path / 'metrics.json')


@pytest.mark.slow
def test_master_addr_and_port_of_a_closed_port_change_nothing(evaluation, tmp_path):
    assert evaluate_with_master(evaluation, tmp_path, free_port()) == evaluation['metrics']


@pytest.mark.slow
def test_master_addr_and_port_of_a_port_that_never_answers_change_nothing(evaluation, tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as silent:  # the kernel completes the connections; no reply
        assert evaluate_with_master(evaluation, tmp_path, silent.getsockname()[1]) == evaluation['metrics']


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def joined_watch(monkeypatch):
    """Start a PeerWatch as in a process that has joined a run (short deadlines); the exit codes it asked
    for (none, if it behaves) and its warnings are recorded instead of ending this process."""
    monkeypatch.setattr(distributed, 'CONNECT_SECONDS', 2)
    monkeypatch.setattr(distributed, 'JOIN_SECONDS', 4)
    monkeypatch.setattr(distributed, 'SILENCE_SECONDS', 2)
    monkeypatch.setattr(distributed, 'SILENCE_CHECK_SECONDS', 0.5)
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: True)
    exits = []
    monkeypatch.setattr(distributed, 'exit_now', lambda sentence, code: exits.append(code))
    recorder = Recorder()
    logging.getLogger('emanet').addHandler(recorder)
    watches = []

    def start(rank, address):
        watch = PeerWatch(rank, 2, address, prefix='test')
        watches.append(watch)
        watch.start()
        return watch

    yield start, exits, recorder.lines
    for watch in watches:
        watch.close()
    logging.getLogger('emanet').removeHandler(recorder)


def returns_within(seconds, call):
    done = threading.Thread(target=call, daemon=True)
    done.start()
    done.join(seconds)
    return not done.is_alive()


@pytest.mark.parametrize('store', ['closed port', 'silent port'])
def test_a_watch_that_cannot_reach_its_store_says_so_once_and_the_run_goes_on(joined_watch, store):
    start, exits, warnings = joined_watch
    with socket.create_server(('127.0.0.1', 0)) as silent:
        port = free_port() if store == 'closed port' else silent.getsockname()[1]
        watch = start(1, ('127.0.0.1', port))
        began = time.monotonic()
        while not warnings and time.monotonic() - began < distributed.CONNECT_SECONDS + 3:
            time.sleep(0.1)
        time.sleep(distributed.SILENCE_SECONDS + 1)  # time for the guard to have ended the process, were it to

    assert len(warnings) == 1, warnings
    assert f'the store at 127.0.0.1:{port}' in warnings[0]
    assert warnings[0].endswith('the run goes on, but if a process fails the others cannot be told why')
    assert exits == []
    assert returns_within(1, watch.meet)  # wait_for_peers no longer waits for the others
    assert returns_within(1, watch.leave)


def test_a_watch_whose_peer_never_joins_waits_for_it_a_bounded_time_and_never_ends_the_run(joined_watch):
    start, exits, warnings = joined_watch
    port = free_port()
    store = core.TCPStore('127.0.0.1', port, True, 0)  # process 0's store; process 1's watch never comes
    watch = start(0, ('127.0.0.1', port))
    began = time.monotonic()

    assert returns_within(distributed.JOIN_SECONDS + 5, watch.meet)
    assert time.monotonic() - began >= distributed.JOIN_SECONDS - 1  # it waited for process 1 to join first
    time.sleep(distributed.SILENCE_SECONDS + 1)
    assert exits == []
    assert warnings == []
    assert returns_within(1, watch.leave)
    del store
