"""Shared fixtures: a tiny generic dataset and a config writer (no downloads, a few seconds to train)."""
import contextlib
import http.server
import importlib
import logging
import os
import sys
import textwrap
import threading
import time

import cv2
import numpy as np
import pytest

# Two test processes share the cores, and many tests start more (tools, launches, the benchmark's workers):
# OpenMP threads that wait for work yield their core instead of spinning on it (the suite is CPU-bound; it
# took 349 s with spinning, 306 s without). Set before any test process loads Paddle's math libraries, and
# inherited by every process the tests start; a value the caller set is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
os.environ.setdefault('KMP_BLOCKTIME', '0')

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
# The tools' shared modules (cli.py, perf/) are imported by the tests as the tools import them.
sys.path.insert(0, TOOLS)


def run_tool_in_process(name, *args):
    """What tools/<name>'s main logs, one line per record as the tool prints it, when it runs in this process.

    For tests of what a tool computes or writes; a test of the process itself (exit code, the one-line
    error, what reaches stdout and stderr) starts one.
    """
    tool = importlib.import_module(name[:-len('.py')] if name.endswith('.py') else name)
    lines = []
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter('[%(levelname)s] %(message)s'))
    handler.emit = lambda record: lines.append(handler.format(record))
    package_logger = logging.getLogger('emanet')
    level = package_logger.level
    package_logger.setLevel(logging.INFO)  # as the tool's own process does (cli.run_cli)
    package_logger.addHandler(handler)
    try:
        tool.main(tool.parse_args([str(arg) for arg in args]))
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
    return '\n'.join(lines) + '\n'


def _onnx_export_missing():
    from emanet.deploy.export import onnx_converter
    from emanet.errors import Unsupported
    try:
        onnx_converter()
    except Unsupported as error:
        return str(error)
    return None


def _openvino_missing():
    from emanet.deploy.runtimes import require
    from emanet.errors import Unsupported
    try:
        require('openvino', 'OpenVINO export and inference')
    except Unsupported as error:
        return str(error)
    return None


# Why ONNX and OpenVINO exports cannot be made here (the sentence the export says), or None; the tests
# of those formats skip with it (paddle2onnx has no wheel for Python 3.13, OpenVINO none that reads
# this model's graph for 3.9). Found on first use: the process that hands tests to pytest-xdist's
# workers loads this file too, and has no need of Paddle.
_LAZY = {
    'ONNX_EXPORT_MISSING': _onnx_export_missing,
    'OPENVINO_MISSING': _openvino_missing,
    'needs_onnx_export': lambda: _skip_with(__getattr__('ONNX_EXPORT_MISSING')),
    'needs_openvino': lambda: _skip_with(__getattr__('OPENVINO_MISSING')),
}


def _skip_with(reason):
    return pytest.mark.skipif(reason is not None, reason=reason or '')


def __getattr__(name):
    if name in globals():  # found already
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'conftest' has no attribute '{name}'")
    globals()[name] = value = _LAZY[name]()
    return value


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes) with their size and optional MD5 ETags, recording each request.

    ``redirects`` (path -> URL) answer 302 to that URL; ``endless`` paths stream zeros without a
    Content-Length until the client hangs up (at most 256 MiB).
    """

    files = {}
    etags = {}
    redirects = {}
    endless = set()
    hits = []
    delay = 0.0  # seconds before answering, so that concurrent requests overlap

    def do_GET(self):
        self.hits.append(self.path)
        time.sleep(self.delay)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header('Location', self.redirects[self.path])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if self.path in self.endless:
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(1 << 12):
                    self.wfile.write(bytes(1 << 16))
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        if self.path in self.etags:
            self.send_header('ETag', f'"{self.etags[self.path]}"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving_with(handler):
    """A server on 127.0.0.1 answering with ``handler`` while the block runs; its base URL."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    # shutdown() waits for serve_forever's next poll: a short interval spares each test half a second
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}'
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def serving():
    """A file server on 127.0.0.1 (``Handler``'s files, its records cleared) while the block runs; its base URL."""
    Handler.hits.clear()
    Handler.redirects.clear()
    Handler.endless.clear()
    Handler.delay = 0.0
    with serving_with(Handler) as url:
        yield url


@pytest.fixture
def server():
    """A file server on 127.0.0.1 for the test's duration; its base URL (no outside network)."""
    with serving() as url:
        yield url


def draw_sample(rng, height=32, width=48):
    """Three classes: background, a vertical band (class 1) and a box (class 2), each with its own tint.
    Small, because a training step's time grows with the pixels and most tests train a few steps."""
    label = np.zeros((height, width), np.uint8)
    label[:, rng.randint(width * 5 // 12, width * 5 // 8):] = 1
    top, left = rng.randint(2, height // 2), rng.randint(2, height // 2)
    label[top:top + height // 3, left:left + height // 3] = 2
    tints = np.array([[40, 90, 40], [150, 60, 60], [60, 60, 200]], np.float32)
    image = tints[label] + rng.randn(height, width, 3) * 12
    return np.clip(image, 0, 255).astype(np.uint8), label


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_dataset')
    rng = np.random.RandomState(0)
    lines = []
    for i in range(10):
        image, label = draw_sample(rng)
        cv2.imwrite(str(root / f'{i}.jpg'), image)
        cv2.imwrite(str(root / f'{i}_label.png'), label)
        lines.append(f'{i}.jpg {i}_label.png')
    (root / 'train.txt').write_text('\n'.join(lines[:8]) + '\n')
    (root / 'val.txt').write_text('\n'.join(lines[8:]) + '\n')
    return root


CONFIG = '''
batch_size: 2
iters: 6
train_dataset:
  type: Dataset
  dataset_root: {root}
  train_path: {root}/train.txt
  num_classes: 3
  mode: train
  transforms:
    - type: RandomHorizontalFlip
    - type: Normalize
val_dataset:
  type: Dataset
  dataset_root: {root}
  val_path: {root}/val.txt
  num_classes: 3
  mode: val
  transforms:
    - type: Normalize
optimizer: {{type: SGD, momentum: 0.9, weight_decay: 4.0e-5}}
lr_scheduler: {{type: PolynomialDecay, learning_rate: 0.01, power: 0.9, end_lr: 0}}
loss:
  types: [{{type: CrossEntropyLoss}}]
  coef: [1, 0.4]
model:
  type: EMANet
  backbone: {{type: ResNet18_vd, output_stride: 8}}
  ema_channels: 32
  gc_channels: 16
  num_bases: 8
'''


@pytest.fixture
def tiny_config(tiny_dataset, tmp_path):
    """Path of a complete config training a small EMANet on ``tiny_dataset``; extra YAML may be appended."""
    def write(extra=''):
        path = tmp_path / 'config.yml'
        path.write_text(CONFIG.format(root=tiny_dataset) + textwrap.dedent(extra))
        return str(path)
    return write


STREET_SCENES_CONFIG = '''
batch_size: 2
iters: {iters}
train_dataset:
  type: StreetScenes
  dataset_root: {root}
  num_train: 8
  num_val: {num_val}
  size: {size}
  mode: train
  transforms:
    - type: RandomHorizontalFlip
    - type: Normalize
val_dataset:
  type: StreetScenes
  dataset_root: {root}
  num_train: 8
  num_val: {num_val}
  size: {size}
  mode: val
  transforms:
    - type: Normalize
optimizer: {optimizer}
lr_scheduler: {{type: PolynomialDecay, learning_rate: {learning_rate}, power: 0.9, end_lr: 0{decay_steps}}}
loss:
  types: [{{type: CrossEntropyLoss}}]
  coef: [1, 0.4]
model:
  type: EMANet
  backbone: {backbone}
  num_classes: 19
  ema_channels: 32
  gc_channels: 16
  num_bases: 8
'''


def street_scenes_config(path, root, iters, num_val, size, optimizer='{type: AdamW, weight_decay: 0.0001}',
                         learning_rate=0.002, backbone='{type: ResNet18_vd, output_stride: 8}', extra='',
                         decay_steps=None):
    """Write a config training a small EMANet on 8 drawn street scenes (drawn into ``root`` on first use).

    ``decay_steps`` fixes the learning rate's decay, which otherwise spans the run's iterations.
    """
    path.write_text(STREET_SCENES_CONFIG.format(root=root, iters=iters, num_val=num_val, size=list(size),
                                                optimizer=optimizer, learning_rate=learning_rate, backbone=backbone,
                                                decay_steps=f', decay_steps: {decay_steps}' if decay_steps else '')
                    + textwrap.dedent(extra))
    return path


@pytest.fixture
def log_lines():
    """The messages the package logs (at INFO and above) during the test."""
    messages, emanet_logger = [], logging.getLogger('emanet')
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    level = emanet_logger.level
    emanet_logger.setLevel(logging.INFO)
    emanet_logger.addHandler(handler)
    yield messages
    emanet_logger.removeHandler(handler)
    emanet_logger.setLevel(level)


@pytest.fixture
def spilled_into(monkeypatch):
    """Every score carry of ``emanet.tiles`` goes to a file; the folders its files were made in, as they come."""
    from emanet import tiles
    folders, make_file = [], tiles.tempfile.TemporaryFile
    monkeypatch.setattr(tiles, 'SPILL_BYTES', 0)
    monkeypatch.setattr(tiles.tempfile, 'TemporaryFile', lambda dir: folders.append(dir) or make_file(dir=dir))
    return folders


# The files that take longest (in seconds on 2 cores, from `--durations=0`), in that order: each file's tests run
# in one test process, so the longest go first and the short ones fill in, and both processes end together.
LONGEST_FILES = ('test_benchmark.py', 'test_docs.py', 'integrations/test_ray.py', 'test_distributed.py',
                 'test_end_to_end.py', 'deploy/test_export.py', 'test_tools.py', 'test_distributed_failures.py', 'deploy/test_runtimes.py',
                 'deploy/test_exported_options.py', 'engine/test_interruption.py', 'engine/test_predict_folders.py',
                 'engine/test_trainer.py', 'integrations/test_paddlex.py', 'engine/test_bad_input.py',
                 'deploy/test_int8.py')


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    rank = {os.path.join(here, name): index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))
