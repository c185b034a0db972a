"""paddle.distributed.launch for the distributed tests: one launcher of two processes, or Paddle's multi-node
form on loopback (two launchers of one process each, as on two machines), and how a launcher left alone ends."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import TOOLS

# A process left waiting for a peer that has stopped must end within this many seconds.
BOUND_SECONDS = 60
# Signs of an ending that is not one sentence: a Python traceback, Paddle's report of a fatal signal.
UNCLEAN = ('Traceback', 'FatalError', 'terminate called')


def launch(log_dir, script, *args, env=None, timeout=300):
    """One launcher with two processes; (exit code, seconds, launcher console, worker logs).

    A launch still running after ``timeout`` seconds raises subprocess.TimeoutExpired, once it and its
    processes are killed (the processes run in sessions of their own: killing the launcher leaves them running).
    """
    start = time.time()
    launcher = subprocess.Popen([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
                                 '--log_dir', str(log_dir), script, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        console, _ = launcher.communicate(timeout=timeout)
    finally:
        stop_all([launcher])
    logs = {path.name: path.read_text() for path in sorted(log_dir.glob('workerlog.*'))}
    return launcher.returncode, time.time() - start, console, logs


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def start_nodes(tmp_path, *train_args, env=None):
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
                stdout=console, stderr=subprocess.STDOUT, env=env))
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
