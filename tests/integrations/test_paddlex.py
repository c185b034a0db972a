"""EMANet in PaddleX 3: the folder tools/export.py --format paddlex writes, run by real PaddleX (no mock).

The PaddleX tests need PaddleX 3.7.2 (`paddlex[cv,serving]`), which cannot share the project's test
environment: its cv extra pins opencv-contrib-python 4.10.0.84, a second wheel of the cv2 module beside
the project's opencv-python-headless, and it pins PyYAML 6.0.2. `.ci/paddlex_check` runs this file in its
own PaddleX environment; here they skip, and the tests that need no PaddleX run.
"""
import base64
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import paddle
import pytest
import yaml
from PIL import Image

import export
import infer
from conftest import CONFIG, TOOLS, _onnx_export_missing
from emanet.config import build_model, load_config
from emanet.deploy.backends import load_exported
from emanet.errors import InvalidInput, Unsupported
from emanet.integrations import paddlex as emanet_paddlex

HAS_PADDLEX = importlib.util.find_spec('paddlex') is not None
needs_paddlex = pytest.mark.skipif(not HAS_PADDLEX, reason="PaddleX is not installed here; .ci/paddlex_check runs "
                                                           "these tests in its PaddleX 3.7.2 environment")
NAME = 'EMANet-R18'
ONNX_MISSING = _onnx_export_missing()


@pytest.fixture(scope='module')
def folder(tiny_dataset, tmp_path_factory):
    """A small EMANet (ResNet18_vd, random weights) exported by tools/export.py --format paddlex (with
    inference.onnx where paddle2onnx is installed), the images to segment (the val images and one of an odd
    size), and tools/infer.py's labels for them."""
    work = tmp_path_factory.mktemp('paddlex')
    config = work / 'config.yml'
    full = yaml.safe_load(CONFIG.format(root=tiny_dataset))
    config.write_text(yaml.safe_dump({key: full[key] for key in ('model', 'val_dataset')}))
    weights = work / 'model.pdparams'
    paddle.seed(0)
    paddle.save(build_model(load_config(str(config), training=False)).state_dict(), str(weights))
    model_dir = work / 'paddlex_model'
    with_onnx = [] if ONNX_MISSING else ['--paddlex_onnx']
    export.main(export.parse_args(['--config', str(config), '--model_path', str(weights), '--save_dir',
                                   str(model_dir), '--format', 'paddlex', *with_onnx]))
    images = work / 'images'
    images.mkdir()
    for name in ('8.jpg', '9.jpg'):
        (images / name).write_bytes((tiny_dataset / name).read_bytes())
    odd = cv2.resize(cv2.imread(str(tiny_dataset / '8.jpg')), (101, 75))  # not a multiple of the stride
    cv2.imwrite(str(images / 'odd.png'), odd)
    infer.main(infer.parse_args(['--config', str(model_dir), '--image_path', str(images),
                                 '--save_dir', str(work / 'infer')]))
    labels = {path.stem: np.asarray(Image.open(path))
              for path in (work / 'infer' / 'pseudo_color_prediction').glob('*.png')}
    assert sorted(labels) == ['8', '9', 'odd']
    assert len(np.unique(np.concatenate([v.ravel() for v in labels.values()]))) >= 2  # a test that can fail
    return {'model_dir': model_dir, 'images': images, 'labels': labels, 'work': work}


def agreement(results, folder):
    """Share of pixels, over all images, where ``results`` ({name: labels}) equal tools/infer.py's
    (float rounding may flip a near tie: 1 pixel in 20,000 here)."""
    expected = folder['labels']
    assert sorted(results) == sorted(expected)
    equal = sum(int((np.asarray(results[name]).reshape(expected[name].shape) == expected[name]).sum())
                for name in expected)
    return equal / sum(labels.size for labels in expected.values())


@pytest.mark.slow
def test_the_folder_holds_what_paddlex_reads_and_runs_in_tools_infer(folder):
    model_dir = folder['model_dir']
    assert sorted(os.listdir(model_dir)) == ['README.md', 'deploy.yaml', 'inference.json'] + (
        [] if ONNX_MISSING else ['inference.onnx']) + ['inference.pdiparams', 'inference.yml']
    config = yaml.safe_load((model_dir / 'inference.yml').read_text())
    assert config['Global'] == {'model_name': NAME}
    assert config['Deploy'] == {'model': 'inference.json', 'params': 'inference.pdiparams',
                                'transforms': [{'type': 'Normalize', 'mean': [0.5] * 3, 'std': [0.5] * 3}]}
    assert emanet_paddlex.model_name_of(model_dir) == NAME
    assert load_exported(str(model_dir)).backend == 'paddle'


def test_names_and_transforms_paddlex_cannot_take_are_refused_in_one_sentence():
    for name in ('PP-LiteSeg-T', 'emanet-r50', 'EMANet-', 'EMANet-R50/../x', None):
        with pytest.raises(InvalidInput, match="must start with 'EMANet-'"):
            emanet_paddlex.check_model_name(name)
    with pytest.raises(InvalidInput, match="'ResizeByShort': PaddleX's segmentation predictor applies only"):
        emanet_paddlex.paddlex_transforms([{'type': 'ResizeByShort', 'short_size': 512}, {'type': 'Normalize'}])
    kept, dropped = emanet_paddlex.paddlex_transforms([{'type': 'Padding', 'target_size': [512, 512]},
                                                       {'type': 'Normalize', 'mean': [0.4] * 3}])
    assert kept == [{'type': 'Normalize', 'mean': [0.4] * 3, 'std': [0.5] * 3}] and dropped == ['Padding']
    assert emanet_paddlex.default_model_name({'backbone': {'type': 'ResNet101_vd'}}) == 'EMANet-R101'
    assert emanet_paddlex.default_model_name({'backbone': {'type': 'HRNet_W18'}}) == 'EMANet-HRNet_W18'


@pytest.mark.slow
def test_an_export_with_another_models_name_is_refused_before_any_work(folder, tmp_path):
    args = export.parse_args(['--config', str(folder['work'] / 'config.yml'), '--model_path',
                              str(folder['work'] / 'model.pdparams'), '--save_dir', str(tmp_path / 'out'),
                              '--format', 'paddlex', '--paddlex_name', 'PP-LiteSeg-T'])
    with pytest.raises(InvalidInput, match="'PP-LiteSeg-T'"):
        export.main(args)
    assert not (tmp_path / 'out').exists()


def test_without_paddlex_or_with_another_version_one_sentence_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, 'version', missing)
    with pytest.raises(Unsupported, match=r"^PaddleX is not installed: pip install 'emanet-paddle\[paddlex\]'"):
        emanet_paddlex.register()
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: '3.0.0')
    with pytest.raises(Unsupported, match="PaddleX 3.0.0 is installed; .* tested with PaddleX 3.7.2 only"):
        emanet_paddlex.register()


@pytest.mark.slow
def test_the_tool_writes_the_pipeline_config_and_without_paddlex_says_so_in_one_line(folder, tmp_path):
    tool = [sys.executable, os.path.join(TOOLS, 'paddlex_pipeline.py'), '--model_dir', str(folder['model_dir'])]
    subprocess.run(tool + ['--write_config', str(tmp_path / 'pipeline.yaml')], check=True, timeout=300)
    module = yaml.safe_load((tmp_path / 'pipeline.yaml').read_text())['SubModules']['SemanticSegmentation']
    assert module['model_name'] == NAME and module['model_dir'] == str(folder['model_dir'].resolve())
    if not HAS_PADDLEX:
        result = subprocess.run(tool + ['--input', str(folder['images'])], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
            "PaddleX is not installed: pip install 'emanet-paddle[paddlex]' (PaddleX 3.7.2 with its cv and "
            "serving extras)"), result.stderr[-2000:]


@needs_paddlex
def test_create_model_labels_equal_tools_infer(folder):
    import paddlex
    assert emanet_paddlex.register() == ('EMANet-R18', 'EMANet-R50', 'EMANet-R101')
    model = paddlex.create_model(model_name=NAME, model_dir=str(folder['model_dir']))
    out = folder['work'] / 'create_model'
    results = {}
    for path in sorted(folder['images'].iterdir()):
        result = next(iter(model.predict(str(path))))
        results[path.stem] = result['pred']
        result.save_to_img(str(out))
        result.save_to_json(str(out))
    assert agreement(results, folder) >= 0.9999
    assert sorted(path.name for path in out.iterdir()) == ['8_res.jpg', '8_res.json', '9_res.jpg', '9_res.json',
                                                           'odd_res.json', 'odd_res.png']
    saved = json.loads((out / 'odd_res.json').read_text())['pred']
    assert np.array_equal(np.asarray(saved)[0], np.asarray(results['odd'])[0])


@needs_paddlex
@pytest.mark.skipif(bool(ONNX_MISSING), reason=str(ONNX_MISSING))
def test_paddlex_onnxruntime_engine_labels_equal_tools_infer(folder):
    import paddlex
    emanet_paddlex.register()
    model = paddlex.create_model(model_name=NAME, model_dir=str(folder['model_dir']), engine='onnxruntime')
    results = {path.stem: next(iter(model.predict(str(path))))['pred'] for path in sorted(folder['images'].iterdir())}
    assert agreement(results, folder) >= 0.9999


@needs_paddlex
def test_a_name_of_its_own_runs_once_registered_and_another_models_name_is_not_taken(folder, tmp_path):
    import paddlex
    custom = tmp_path / 'custom'
    shutil.copytree(folder['model_dir'], custom)
    config = yaml.safe_load((custom / 'inference.yml').read_text())
    config['Global']['model_name'] = 'EMANet-Custom'
    (custom / 'inference.yml').write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="No engine bindings registered for model 'EMANet-Custom'"):
        paddlex.create_model(model_name='EMANet-Custom', model_dir=str(custom))
    assert emanet_paddlex.register(emanet_paddlex.model_name_of(custom)) == ('EMANet-Custom',)
    image = folder['images'] / 'odd.png'
    labels = next(iter(paddlex.create_model(model_name='EMANet-Custom', model_dir=str(custom)).predict(str(image))))
    assert agreement({'odd': labels['pred'], '8': folder['labels']['8'], '9': folder['labels']['9']},
                     folder) >= 0.9999
    with pytest.raises(InvalidInput, match="must start with 'EMANet-'"):
        emanet_paddlex.register('PP-LiteSeg-T')


@needs_paddlex
def test_the_pipeline_labels_equal_tools_infer(folder):
    pipeline_yaml = folder['work'] / 'semantic_segmentation.yaml'
    subprocess.run([sys.executable, os.path.join(TOOLS, 'paddlex_pipeline.py'), '--model_dir',
                    str(folder['model_dir']), '--write_config', str(pipeline_yaml)], check=True, timeout=300)
    pipeline, _ = emanet_paddlex.create_pipeline(config=str(pipeline_yaml), device='cpu')
    results = {path.stem: next(iter(pipeline.predict(str(path))))['pred']
               for path in sorted(folder['images'].iterdir())}
    assert agreement(results, folder) >= 0.9999


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@needs_paddlex
def test_paddlex_serving_started_by_our_command_answers_with_the_same_label_map(folder):
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(TOOLS, 'paddlex_pipeline.py'), '--model_dir',
                               str(folder['model_dir']), '--serve', '--host', '127.0.0.1', '--port', str(port),
                               '--device', 'cpu'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        labels = {}
        for path in sorted(folder['images'].iterdir()):
            answer = post_image(port, path, server)
            assert answer['errorCode'] == 0, answer
            size = answer['result']['size']
            labels[path.stem] = np.reshape(answer['result']['labelMap'], size)
        assert agreement(labels, folder) >= 0.9999
    finally:
        server.terminate()
        server.wait(timeout=30)


def post_image(port, path, server):
    """PaddleX's answer to one POST /semantic-segmentation, waiting up to 180 s for the server to listen."""
    body = json.dumps({'image': base64.b64encode(path.read_bytes()).decode(), 'visualize': False}).encode()
    request = urllib.request.Request(f'http://127.0.0.1:{port}/semantic-segmentation', data=body,
                                     headers={'Content-Type': 'application/json'})
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, server.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the server did not answer within 180 s"
            time.sleep(1)
