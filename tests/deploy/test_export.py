"""Export and Paddle Inference: with oneDNN on, labels equal the dygraph model's at any image size."""
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle.base import core
from paddleseg.models.backbones import ResNet18_vd
from paddleseg.transforms import Normalize
from PIL import Image

from conftest import TOOLS
from emanet import EMANet
from emanet.checkpoint import save_state
from emanet.config import build_model, load_config
from emanet.deploy.static_graph import export_model, read_deploy_config, resize_bilinear_by_matmul
from emanet.deploy.backends import load_exported
from emanet.deploy.paddle_inference import inference_config
from emanet.models.emanet import resize_bilinear

NUM_CLASSES = 5
TRANSFORMS = [{'type': 'Normalize', 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}]
SIZES = [(64, 96), (80, 48)]  # (height, width): one wider than tall, one taller than wide


def tiny_emanet():
    """A random tiny EMANet whose labels vary over an image: its class biases are set so that every
    class has the same mean logit on a random image (else one class takes nearly every pixel, and
    a comparison of labels would compare almost constant maps)."""
    paddle.seed(0)
    model = EMANet(NUM_CLASSES, ResNet18_vd(output_stride=8), ema_channels=16, gc_channels=16, num_bases=8)
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.uniform([1, 3, 64, 96], min=-1.0, max=1.0))[0]  # as Normalize leaves images
        bias = model.head.cls[1].bias
        paddle.assign(bias - logits.mean(axis=[0, 2, 3]), output=bias)
    model.train()
    return model


def assert_labels_vary(label):
    shares = np.bincount(label.reshape(-1), minlength=NUM_CLASSES) / label.size
    assert (shares > 0).sum() >= 3 and shares.max() < 0.7, shares


def dygraph_label(model, predictor, image):
    """The dygraph model's argmax on the input the predictor feeds its graph."""
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(predictor.preprocess(image)[0][None]))[0]
    return paddle.argmax(logits, axis=1)[0].numpy()


@pytest.fixture(scope='module')
def images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (height, width, 3)).astype(np.uint8) for height, width in SIZES]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A random tiny EMANet (left in training mode) and the folder it was exported to (argmax, any size)."""
    model = tiny_emanet()
    save_dir = str(tmp_path_factory.mktemp('export'))
    export_model(model, save_dir, TRANSFORMS)
    return model, save_dir


@pytest.mark.parametrize('align_corners', [False, True])
def test_matmul_resize_equals_bilinear_interp(align_corners):
    logits = paddle.randn([2, 3, 9, 13])
    for size in ([72, 104], [65, 99], [1, 5], [9, 13]):
        expected = F.interpolate(logits, size, mode='bilinear', align_corners=align_corners)
        actual = resize_bilinear_by_matmul(logits, paddle.to_tensor(size), align_corners)
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5, err_msg=str(size))


def test_export_leaves_the_model_as_it_was(exported):
    model, _ = exported
    assert model.training
    assert model.resize_logits is resize_bilinear


def test_labels_equal_dygraph_with_onednn_at_two_sizes(exported, images):
    model, save_dir = exported
    deploy = read_deploy_config(save_dir)
    assert inference_config(deploy['model'], deploy['params']).mkldnn_enabled()  # the default config
    predictor = load_exported(save_dir)
    for image in images:
        label = predictor.predict(image)
        assert label.shape == image.shape[:2] and label.dtype == np.int32
        assert_labels_vary(label)
        np.testing.assert_array_equal(label, dygraph_label(model, predictor, image))


def test_deploy_yaml_round_trip(exported):
    _, save_dir = exported
    deploy = read_deploy_config(os.path.join(save_dir, 'deploy.yaml'))
    assert deploy == read_deploy_config(save_dir)
    assert os.path.isfile(deploy['model']) and os.path.isfile(deploy['params'])
    assert deploy['transforms'] == TRANSFORMS
    assert deploy['output_op'] == 'none' and deploy['output_dtype'] == 'float32'  # logits: options can average them
    assert deploy['num_classes'] == NUM_CLASSES
    assert deploy['input_shape'] == [None, 3, None, None]
    (normalize,) = load_exported(save_dir).transforms.transforms
    assert isinstance(normalize, Normalize) and list(normalize.mean) == [0.5, 0.5, 0.5]


@pytest.mark.skipif(not core.supports_bfloat16(), reason="this CPU has no AVX-512, so oneDNN has no bf16 kernels")
def test_bf16_agrees_with_fp32(exported, images):
    _, save_dir = exported
    fp32, bf16 = load_exported(save_dir), load_exported(save_dir, precision='bf16')
    for image in images:
        assert (bf16.predict(image) == fp32.predict(image)).mean() >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize('output_op', ['softmax', 'none'])
def test_score_outputs_give_the_same_labels(output_op, tmp_path, images):
    model = tiny_emanet()
    export_model(model, str(tmp_path), TRANSFORMS, output_op=output_op)
    predictor = load_exported(str(tmp_path))
    image = images[1]
    scores = predictor.run(predictor.preprocess(image)[0][None])
    assert scores.shape == (1, NUM_CLASSES) + image.shape[:2]
    if output_op == 'softmax':
        np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(predictor.predict(image), dygraph_label(model, predictor, image))


def test_impossible_device_or_precision_is_one_clear_error(exported):
    _, save_dir = exported
    with pytest.raises(ValueError, match='fp16 runs on GPU only'):
        load_exported(save_dir, precision='fp16')
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(RuntimeError, match='needs PaddlePaddle built with CUDA'):
            load_exported(save_dir, device='gpu')


def run_tool(name, *args, cwd):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                            capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_export_and_infer_tools_end_to_end(tiny_config, tiny_dataset, tmp_path, images):
    config = tiny_config()
    paddle.seed(0)
    model = build_model(load_config(config))
    save_state(model.state_dict(), str(tmp_path / 'model.pdparams'))

    run_tool('export.py', '--config', config, '--model_path', tmp_path / 'model.pdparams',
             '--save_dir', tmp_path / 'inference', '--input_shape', 1, 3, 32, 48, cwd=tmp_path)
    result = run_tool('infer.py', '--config', tmp_path / 'inference' / 'deploy.yaml',
                      '--image_path', tiny_dataset / 'val.txt', '--save_dir', tmp_path / 'out', cwd=tmp_path)
    assert 'Predicted 2 images' in result.stdout

    predictor = load_exported(str(tmp_path / 'inference'))
    for name in ('8', '9'):
        mask = np.array(Image.open(tmp_path / 'out' / 'pseudo_color_prediction' / f'{name}.png'))
        np.testing.assert_array_equal(mask, dygraph_label(model, predictor, str(tiny_dataset / f'{name}.jpg')))
        assert (tmp_path / 'out' / 'added_prediction' / f'{name}.jpg').is_file()
    with pytest.raises(ValueError, match=r'exported for input \[1, 3, 32, 48\]'):
        predictor.predict(images[1])


def folder_contents(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob('*')) if path.is_file()}


@pytest.mark.slow
def test_an_export_that_fails_its_check_leaves_the_earlier_export_untouched(tmp_path, images):
    from emanet.deploy.export import ExportCheckError, export_checked, preprocessed_images
    check = preprocessed_images(images, TRANSFORMS)
    save_dir = tmp_path / 'inference'
    export_checked(tiny_emanet(), str(save_dir), TRANSFORMS, check)
    before = folder_contents(save_dir)
    assert sorted(before) == ['README.md', 'deploy.yaml', 'model.json', 'model.pdiparams']
    os.mkdir(tmp_path / 'ordinary')
    assert save_dir.stat().st_mode == (tmp_path / 'ordinary').stat().st_mode  # not a private temporary folder
    os.rmdir(tmp_path / 'ordinary')

    paddle.seed(7)
    other = EMANet(NUM_CLASSES, ResNet18_vd(output_stride=8), ema_channels=16, gc_channels=16, num_bases=8)
    with pytest.raises(ExportCheckError, match=rf'below 101\.00%; it was not written to {save_dir}'):
        export_checked(other, str(save_dir), TRANSFORMS, check, min_agreement=1.01)  # no export can pass
    assert folder_contents(save_dir) == before
    assert sorted(os.listdir(tmp_path)) == ['inference']  # no staging folder left beside it

    export_checked(other, str(save_dir), TRANSFORMS, check, output_op='softmax')  # a passing one replaces it
    assert read_deploy_config(str(save_dir))['output_op'] == 'softmax'
    assert sorted(os.listdir(tmp_path)) == ['inference']


def test_a_folder_that_is_not_an_export_is_refused_before_any_work(tmp_path, images, monkeypatch):
    from emanet.deploy import export
    run = tmp_path / 'output'  # a training run's folder, as `--save_dir output` would name it
    (run / 'iter_2').mkdir(parents=True)
    (run / 'iter_2' / 'model.pdparams').write_bytes(b'weights of a long training run')
    (run / 'config.yml').write_text('batch_size: 2\n')
    before = folder_contents(run)
    monkeypatch.setattr(export, 'export_model', lambda *args, **kwargs: pytest.fail('the export started'))
    with pytest.raises(export.ExportFolderError, match=rf'--save_dir {run} is not empty and is not an earlier '
                                                        r'export \(it holds config\.yml, iter_2\)'):
        export.export_checked(tiny_emanet(), str(run), TRANSFORMS, export.preprocessed_images(images, TRANSFORMS))
    assert folder_contents(run) == before
    assert sorted(os.listdir(tmp_path)) == ['output']


@pytest.mark.parametrize('model_file', ['../outside/model.json', '/etc/hostname', '..', 'sub/model.json'])
def test_a_deploy_config_names_only_files_of_its_own_folder(tmp_path, model_file):
    import yaml
    (tmp_path / 'deploy.yaml').write_text(yaml.safe_dump({'Deploy': {
        'model': model_file, 'params': 'model.pdiparams', 'transforms': TRANSFORMS, 'output_op': 'argmax'}}))
    with pytest.raises(ValueError, match=r"deploy\.yaml: model must be a file name in the deploy config's folder"):
        read_deploy_config(str(tmp_path))
