"""tools/infer.py --ray on a real Ray cluster of two nodes (one CPU each, on 127.0.0.1): the files tools/infer.py
writes, byte for byte; every image written once, whole, when a node dies mid-run; a rerun that writes only what is
missing; a file that is no image listed by name while the others go on, or stopping the run with --fail_fast."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import numpy as np
import pytest

ray = pytest.importorskip('ray', reason="Ray has no wheel for this Python (none for 3.9)")

from conftest import run_tool_in_process  # noqa: E402
from deploy.test_export import TRANSFORMS, tiny_emanet  # noqa: E402
from emanet.deploy.export import export_checked, preprocessed_images  # noqa: E402
from emanet.errors import InvalidInput, Unsupported  # noqa: E402
from emanet.integrations import ray as emanet_ray  # noqa: E402
from emanet.test_time import InferenceOptions  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster of two nodes, and an export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLIDE_FLAGS = ('--is_slide', '--crop_size', 48, 40, '--stride', 32, 24)
SLIDE = InferenceOptions(is_slide=True, crop_size=(48, 40), stride=(32, 24))
NUM_IMAGES = 16
STARTUP_SECONDS = 90  # bound of every wait on the cluster: a stuck cluster fails the test


class Cluster:
    """A head node and a second node, each `ray start --block` in a process group of its own."""

    def __init__(self, temp_dir):
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f'127.0.0.1:{self.port}'
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0',
                        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
        self.processes = []
        self.second_node_id = None

    def start_node(self, *args):
        ray_command = os.path.join(os.path.dirname(sys.executable), 'ray')
        log = open(os.path.join(self.temp_dir, f'node{len(self.processes)}.log'), 'wb')
        process = subprocess.Popen(
            [ray_command, 'start', '--block', '--num-cpus', '1', '--node-ip-address', '127.0.0.1',
             '--object-store-memory', str(200 << 20), '--disable-usage-stats', *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def start(self):
        head = self.start_node('--head', '--port', str(self.port), '--include-dashboard', 'false',
                               '--temp-dir', self.temp_dir)
        _wait_for(lambda: self.running(head) and _accepts(self.port), 'the head node to listen')
        second = self.start_node('--address', self.address)
        ray.init(address=self.address, logging_level='warning')
        try:
            _wait_for(lambda: self.running(second) and len(emanet_ray._alive_node_cpus(ray)) == 2,
                      'the second node to join')
            head_node = ray.get_runtime_context().get_node_id()
            self.second_node_id, = [node for node in emanet_ray._alive_node_cpus(ray) if node != head_node]
        finally:
            ray.shutdown()

    def running(self, process):
        """True while ``process`` runs; its log in an error when it has ended."""
        if process.poll() is None:
            return True
        index = self.processes.index(process)
        with open(os.path.join(self.temp_dir, f'node{index}.log'), errors='replace') as log:
            raise RuntimeError(f"ray start of node {index} ended with {process.returncode}: {log.read()[-2000:]}")

    def kill_second_node(self):
        """SIGKILL the second node's raylet and services (its workers exit with their raylet)."""
        os.killpg(self.processes[1].pid, signal.SIGKILL)
        self.processes[1].wait(timeout=STARTUP_SECONDS)

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STARTUP_SECONDS)


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _accepts(port):
    with socket.socket() as sock:
        return sock.connect_ex(('127.0.0.1', port)) == 0


def _wait_for(condition, what, seconds=STARTUP_SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.2)


@pytest.fixture(scope='module')
def cluster():
    # A short folder of its own: Ray's socket paths under it must stay within the 107 bytes a Unix socket allows.
    temp_dir = tempfile.mkdtemp(prefix='ray')
    running = Cluster(temp_dir)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('export'))
    rng = np.random.RandomState(0)
    check_images = [rng.randint(0, 256, (64, 96, 3)).astype(np.uint8) for _ in range(2)]
    export_checked(tiny_emanet(), folder, TRANSFORMS, preprocessed_images(check_images, TRANSFORMS))
    return folder


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A folder of images of different sizes, two of them in a subfolder, and a list file naming them all."""
    folder = tmp_path_factory.mktemp('images')
    (folder / 'city').mkdir()
    rng = np.random.RandomState(3)
    names = [f'city/image_{index:02d}' if index < 2 else f'image_{index:02d}' for index in range(NUM_IMAGES)]
    for index, name in enumerate(names):
        size = (160 + 8 * index, 192)
        cv2.imwrite(str(folder / f'{name}.png'), rng.randint(0, 256, size + (3,)).astype(np.uint8))
    (folder / 'list.txt').write_text(''.join(f'{name}.png\n' for name in names))
    return folder


@pytest.fixture(scope='module')
def reference(export, images, tmp_path_factory):
    """What tools/infer.py writes for the images, {relative path: bytes}."""
    save_dir = tmp_path_factory.mktemp('reference')
    run_tool_in_process('infer.py', '--config', export, '--image_path', images, '--save_dir', save_dir, *SLIDE_FLAGS)
    return written_files(save_dir)


def written_files(save_dir):
    return {os.path.relpath(os.path.join(folder, name), save_dir): open(os.path.join(folder, name), 'rb').read()
            for folder, _, names in os.walk(save_dir) for name in names}


def test_a_two_node_run_writes_the_files_of_infer_py_byte_for_byte(cluster, export, images, reference, tmp_path):
    log = run_tool_in_process('infer.py', '--config', export, '--image_path', images / 'list.txt', '--save_dir',
                              tmp_path / 'out', '--ray', cluster.address, *SLIDE_FLAGS)
    assert len(reference) == 2 * NUM_IMAGES
    assert written_files(tmp_path / 'out') == reference  # same names, same masks and overlays, no temporary file
    final = [line for line in log.splitlines() if '[RAY] Predicted' in line]
    assert final and f'Predicted {NUM_IMAGES} images' in final[0] and 'with 2 actors on 2 nodes' in final[0], log
    assert f"/{cluster.second_node_id[:8]}: " in final[0]


def test_a_rerun_after_an_interrupted_run_writes_only_the_missing_images_and_lists_a_bad_file(
        cluster, export, images, reference, tmp_path):
    folder = tmp_path / 'images'
    shutil.copytree(images, folder)
    (folder / 'a_broken.png').write_bytes(b'not an image')  # listed first, so --fail_fast stops the run early
    save_dir = tmp_path / 'out'
    with pytest.raises(InvalidInput, match='a_broken.png: .*fail_fast'):
        run_tool_in_process('infer.py', '--config', export, '--image_path', f'file://{folder}', '--save_dir',
                            save_dir, '--ray', cluster.address, '--fail_fast', *SLIDE_FLAGS)
    first_run = {path: os.stat(save_dir / path).st_mtime_ns for path in written_files(save_dir)}
    assert not any(path.endswith('.tmp') for path in first_run)

    report = emanet_ray.infer_on_ray(export, f'file://{folder}', str(save_dir), address=cluster.address,
                                     options=SLIDE)
    assert report.failed == [(f'file://{folder}/a_broken.png', 'InvalidInput: not an image OpenCV can decode')]
    assert written_files(save_dir) == reference
    rewritten = [path for path, mtime in first_run.items() if os.stat(save_dir / path).st_mtime_ns != mtime]
    assert rewritten == []
    complete_before = [path for path in first_run if path.startswith('pseudo_color_prediction')
                       and os.path.join('added_prediction', path.split(os.sep, 1)[1][:-len('png')] + 'jpg') in first_run]
    assert report.skipped == len(complete_before) < NUM_IMAGES
    assert report.done == NUM_IMAGES - len(complete_before)


def test_killing_the_second_node_mid_run_still_writes_every_image_once(cluster, export, images, reference, tmp_path,
                                                                       log_lines):
    outcome = {}

    def run():
        try:
            outcome['report'] = emanet_ray.infer_on_ray(export, str(images), str(tmp_path / 'out'),
                                                        address=cluster.address, options=SLIDE,
                                                        progress_seconds=0.1)
        except Exception as error:  # handed to the test's thread
            outcome['error'] = error

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    second_node = f"/{cluster.second_node_id[:8]}: "
    _wait_for(lambda: any(second_node in line for line in log_lines) or not runner.is_alive(),
              'the second node to label an image')
    assert runner.is_alive(), outcome  # the run was still going when the node died
    cluster.kill_second_node()
    runner.join(timeout=2 * STARTUP_SECONDS)
    assert not runner.is_alive(), 'the run did not end after the second node died'
    assert 'error' not in outcome, outcome['error']
    report = outcome['report']
    assert report.rounds >= 2  # the lost node ended a round, and the missing images ran again
    assert report.done == NUM_IMAGES and report.failed == []
    assert written_files(tmp_path / 'out') == reference  # each file once, whole; no temporary file left


def test_without_ray_one_sentence_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'ray', None)
    with pytest.raises(Unsupported, match=r"pip install 'emanet-paddle\[ray\]'"):
        emanet_ray.require_ray()
