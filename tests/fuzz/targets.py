"""The fuzz targets: every parser of bytes this package did not write, one function each.

A target takes the bytes to try and a folder of its own, and must end in success or a ``UserError``,
within the time and memory bounds of ``tests/fuzz/engine.py``. Any other exception is a bug. Each
target also makes its seeds: valid inputs of its kind, which the fuzzers mutate.
"""
import contextlib
import dataclasses
import functools
import io
import json
import os
import socket
import tarfile
import threading
import typing
import zipfile
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    run: typing.Callable  # (data: bytes, folder: Path) -> None
    seeds: typing.Callable  # (folder: Path) -> list of bytes
    what: str


@functools.lru_cache(maxsize=None)
def tiny_model():
    """A model with a convolution, a BatchNorm and a bias (float32 weights and float32 running statistics)."""
    import paddle
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Conv2D(4, 2, 1))


@functools.lru_cache(maxsize=None)
def tiny_optimizer():
    """A momentum optimizer on ``tiny_model`` after one step: velocities and an lr schedule in its state.
    One per process, as in training: Paddle numbers the accumulators of each new optimizer anew."""
    import paddle
    model = tiny_model()
    schedule = paddle.optimizer.lr.PolynomialDecay(0.01, decay_steps=10, power=0.9)
    optimizer = paddle.optimizer.Momentum(schedule, momentum=0.9, parameters=model.parameters())
    model(paddle.ones([1, 3, 8, 8])).mean().backward()
    optimizer.step()
    optimizer.clear_grad()
    return optimizer


def _saved(state, folder, name):
    from emanet.checkpoint import save_state
    path = folder / name
    save_state(state, str(path))
    return path.read_bytes()


# Weights (.pdparams, Paddle's pickle) into a model, as --model_path, pretrained: and resuming read them.
def run_pickle_weights(data, folder):
    from emanet.checkpoint import load_weights
    path = folder / 'model.pdparams'
    path.write_bytes(data)
    load_weights(tiny_model(), str(path), strict=False)


def seed_pickle_weights(folder):
    model = tiny_model()
    nested = {'weights': {k: v.numpy() for k, v in model.state_dict().items()}, 'note': ['a', 1, 2.5, None]}
    return [_saved(model.state_dict(), folder, 'model.pdparams'), _saved(nested, folder, 'nested.pdparams')]


# An optimizer's state (.pdopt) restored into the optimizer, as a resumed run does.
def run_optimizer_state(data, folder):
    from emanet.checkpoint import load_optimizer_state, read_state
    path = folder / 'model.pdopt'
    path.write_bytes(data)
    load_optimizer_state(tiny_model(), tiny_optimizer(), read_state(str(path)), source=str(path))


def seed_optimizer_state(folder):
    from emanet.checkpoint import optimizer_state_by_structure
    return [_saved(optimizer_state_by_structure(tiny_model(), tiny_optimizer()), folder, 'model.pdopt')]


# Weights in .safetensors (a JSON header, then raw tensors).
def run_safetensors(data, folder):
    from emanet.checkpoint import load_weights
    path = folder / 'model.safetensors'
    path.write_bytes(data)
    load_weights(tiny_model(), str(path), strict=False)


def seed_safetensors(folder):
    return [_saved(tiny_model().state_dict(), folder, 'model.safetensors')]


# Archives (PaddleSeg's backbone weights come as .tar.gz): the first byte picks the kind.
ARCHIVE_KINDS = ('.tar', '.tar.gz', '.zip')


def run_archive(data, folder):
    from emanet.download import unpack_archive
    suffix = ARCHIVE_KINDS[data[0] % len(ARCHIVE_KINDS)] if data else '.tar'
    archive = folder / f'weights{suffix}'
    archive.write_bytes(data[1:])
    destination = folder / 'unpacked'
    destination.mkdir()
    unpack_archive(str(archive), str(destination))
    outside = sorted(p.name for p in folder.iterdir()) != sorted([archive.name, destination.name])
    links = [p for p in destination.rglob('*') if p.is_symlink()]
    if outside or links:
        raise AssertionError(f"unpacking wrote outside its folder or made links: {sorted(folder.rglob('*'))}")


def seed_archive(folder):
    members = {'resnet/model.pdparams': _saved(tiny_model().state_dict(), folder, 'model.pdparams'),
               'resnet/README': b'weights\n'}
    seeds = []
    for kind, mode in ((0, 'w'), (1, 'w:gz')):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as archive:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
        seeds.append(bytes([kind]) + buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    seeds.append(bytes([2]) + buffer.getvalue())
    return seeds


# A training or evaluation sample: the first byte picks the file (image or label) and its format;
# the other file of the pair is a valid 16x12 image or label.
SAMPLE_KINDS = (('image', '.jpg'), ('image', '.png'), ('label', '.png'), ('image', '.bmp'), ('label', '.tif'))


def run_sample(data, folder):
    from emanet.data.dataset import Dataset
    from emanet.data.loading import load_sample
    import paddleseg.transforms as T
    role, suffix = SAMPLE_KINDS[data[0] % len(SAMPLE_KINDS)] if data else SAMPLE_KINDS[0]
    image, label = folder / f'image{suffix if role == "image" else ".png"}', folder / f'label{suffix if role == "label" else ".png"}'
    fuzzed, valid = (image, label) if role == 'image' else (label, image)
    fuzzed.write_bytes(data[1:])
    _write_valid_sample_file(valid, role == 'image')
    (folder / 'val.txt').write_text(f'{image.name} {label.name}\n')
    dataset = Dataset(mode='val', dataset_root=str(folder), val_path=str(folder / 'val.txt'), num_classes=3,
                      transforms=[T.Normalize()])
    load_sample(dataset, 0)


def _write_valid_sample_file(path, is_label):
    import cv2
    rng = np.random.default_rng(0)
    array = rng.integers(0, 3, (12, 16), np.uint8) if is_label else rng.integers(0, 256, (12, 16, 3), np.uint8)
    cv2.imwrite(str(path), array)


def seed_sample(folder):
    import cv2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3), np.uint8)
    label = rng.integers(0, 3, (12, 16), np.uint8)
    seeds = []
    for kind, (role, suffix) in enumerate(SAMPLE_KINDS):
        ok, encoded = cv2.imencode(suffix, image if role == 'image' else label)
        seeds.append(bytes([kind]) + encoded.tobytes())
    return seeds


# A training config (YAML with a _base_ file), read as every tool reads --config.
BASE_CONFIG = """\
batch_size: 2
iters: 4
train_dataset: {type: Dataset, dataset_root: data, train_path: data/train.txt, num_classes: 3, mode: train,
                transforms: [{type: RandomHorizontalFlip}, {type: Normalize}]}
val_dataset: {type: Dataset, dataset_root: data, val_path: data/val.txt, num_classes: 3, mode: val,
              transforms: [{type: Normalize}]}
optimizer: {type: SGD, momentum: 0.9, weight_decay: 0.0005}
lr_scheduler: {type: PolynomialDecay, learning_rate: 0.01, end_lr: 0, power: 0.9}
loss: {types: [{type: CrossEntropyLoss}, {type: CrossEntropyLoss}], coef: [1, 0.4]}
"""
CONFIG = """\
_base_: base.yml
model:
  type: EMANet
  num_classes: 3
  backbone: {type: ResNet18_vd, output_stride: 8}
  ema_channels: 16
  gc_channels: 8
  num_bases: 4
"""


def run_config(data, folder):
    from emanet.config import load_config
    (folder / 'base.yml').write_text(BASE_CONFIG)
    path = folder / 'config.yml'
    path.write_bytes(data)
    load_config(str(path))


def seed_config(folder):
    return [CONFIG.encode(), (CONFIG + "test_config: {aug_eval: true, flip_horizontal: true, scales: [0.75, 1.0]}\n"
                              "export: {transforms: [{type: Normalize}]}\n").encode()]


# An exported folder's deploy.yaml, read by every runtime and by tools/infer.py.
DEPLOY = """\
Deploy:
  model: model.json
  params: model.pdiparams
  transforms:
  - type: Normalize
    mean: [0.5, 0.5, 0.5]
    std: [0.5, 0.5, 0.5]
  - type: Resize
    target_size: [64, 32]
  input_shape: [null, 3, null, null]
  output_op: none
  output_dtype: float32
  num_classes: 3
"""


def run_deploy(data, folder):
    from emanet.deploy.static_graph import read_deploy_config
    from emanet.segmenter import build_transforms
    for name in ('model.json', 'model.pdiparams', 'model.onnx'):
        (folder / name).write_bytes(b'')
    (folder / 'deploy.yaml').write_bytes(data)
    build_transforms(read_deploy_config(str(folder))['transforms'])


def seed_deploy(folder):
    return [DEPLOY.encode(), DEPLOY.replace('  params: model.pdiparams\n', '').replace('model.json', 'model.onnx')
            .replace('  output_op: none', '  format: onnx\n  output_op: argmax').encode()]


# A checkpoint's train_state.json, read by --resume_model and by the Checkpointer's listing.
def run_train_state(data, folder):
    from emanet.engine.checkpointer import Checkpointer, read_train_state
    checkpoint = folder / 'iter_4'
    checkpoint.mkdir()
    (checkpoint / 'train_state.json').write_bytes(data)
    read_train_state(str(checkpoint))
    Checkpointer(str(folder)).latest()


def seed_train_state(folder):
    state = {'iter': 4, 'seed': 7, 'best_score': 0.25, 'best_iter': 2, 'run_id': '0123456789abcdef' * 2,
             'data_order': {'train_images': 8, 'batch_size': 2, 'processes': 1, 'iters': 8},
             'evaluation': {'mIoU': 0.25, 'class_iou': [0.5, 0.25, 0.0]}, 'grad_scaler': {}}
    return [json.dumps(state, indent=2).encode()]


# An HTTP response (status line, headers, body) from a server on 127.0.0.1, downloaded as a URL in a config.
class _RawResponseServer:
    """A loopback server answering every request with the same raw bytes, then closing the connection."""

    def __init__(self):
        self.response = b''
        self.socket = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.socket.getsockname()[1]}'
        threading.Thread(target=self._serve, daemon=True, name='fuzz-http').start()

    def _serve(self):
        while True:
            connection, _ = self.socket.accept()
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    request = b''
                    while b'\r\n\r\n' not in request and len(request) < 65536:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    connection.sendall(self.response)


@functools.lru_cache(maxsize=None)
def _server():
    return _RawResponseServer()


def run_http(data, folder):
    from emanet.download import cached_path
    server = _server()
    server.response = data
    # Short waits: this server answers at once, then closes; a response that lies about its length ends there.
    with _environment(EMANET_DOWNLOAD_TIMEOUT='2', EMANET_DOWNLOAD_DEADLINE='5', EMANET_DOWNLOAD_LOCK_WAIT='5'):
        cached_path(f'{server.url}/weights/model.pdparams', cache_dir=str(folder / 'cache'))


def seed_http(folder):
    body = _saved(tiny_model().state_dict(), folder, 'model.pdparams')
    ok = (b'HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n'
          b'Connection: close\r\n\r\n' % len(body)) + body
    chunked = (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
               + b'%x\r\n' % len(body) + body + b'\r\n0\r\n\r\n')
    redirect = b'HTTP/1.1 302 Found\r\nLocation: /weights/other.pdparams\r\nContent-Length: 0\r\n\r\n'
    missing = b'HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found'
    etag = ok.replace(b'Connection: close', b'ETag: "0123456789abcdef0123456789abcdef"\r\nConnection: close')
    return [ok, chunked, redirect, missing, etag]


# A TIFF's first directory, read to decide whether an image is a raster (emanet.rasters.read_tiff_header).
def run_tiff_header(data, folder):
    from emanet.rasters import read_tiff_header
    path = folder / 'image.tif'
    path.write_bytes(data)
    read_tiff_header(str(path))


def seed_tiff_header(folder):
    import struct
    from PIL import Image
    seeds = []
    for name, options in [('plain.tif', {}), ('deflate.tif', {'compression': 'tiff_adobe_deflate'})]:
        Image.new('RGB', (40, 30)).save(folder / name, **options)
        seeds.append((folder / name).read_bytes())
    # A BigTIFF with a width, a height (LONG8) and a GeoKeyDirectory entry, big-endian.
    entries = [struct.pack('>HHQQ', 256, 16, 1, 70000), struct.pack('>HHQQ', 257, 16, 1, 50000),
               struct.pack('>HHQHHHH', 34735, 3, 4, 1, 1, 0, 0)]
    seeds.append(b'MM\x00+' + struct.pack('>HHQ', 8, 0, 16) + struct.pack('>Q', len(entries)) + b''.join(entries)
                 + struct.pack('>Q', 0))
    return seeds


@contextlib.contextmanager
def _environment(**values):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


TARGETS = {target.name: target for target in [
    Target('pickle', run_pickle_weights, seed_pickle_weights, '.pdparams weights into a model (emanet.safe_pickle)'),
    Target('optimizer', run_optimizer_state, seed_optimizer_state, '.pdopt optimizer state into an optimizer'),
    Target('safetensors', run_safetensors, seed_safetensors, '.safetensors weights into a model'),
    Target('archive', run_archive, seed_archive, '.tar, .tar.gz and .zip unpacking (emanet.download)'),
    Target('sample', run_sample, seed_sample, 'images and labels, from header checks to the label values'),
    Target('config', run_config, seed_config, 'a YAML config with a _base_ file (emanet.config)'),
    Target('deploy', run_deploy, seed_deploy, "an exported folder's deploy.yaml and its transforms"),
    Target('train_state', run_train_state, seed_train_state, "a checkpoint's train_state.json"),
    Target('http', run_http, seed_http, 'HTTP responses from a loopback server (emanet.download)'),
    Target('tiff_header', run_tiff_header, seed_tiff_header, "a TIFF's first directory (emanet.rasters)"),
]}
