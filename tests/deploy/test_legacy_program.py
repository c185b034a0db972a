"""The legacy program format (model.pdmodel): exported by tools/export.py --legacy_program and run the way
PaddleSeg 2.8.0's deploy/python/infer.py runs a model, with the labels of the dygraph model."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from paddle.inference import Config as PredictConfig
from paddle.inference import create_predictor
from paddleseg.deploy.infer import DeployConfig

from conftest import TOOLS
from deploy.test_export import NUM_CLASSES, assert_labels_vary, dygraph_label, tiny_emanet
from emanet.checkpoint import save_state
from emanet.deploy.backends import load_exported

pytestmark = pytest.mark.slow  # the tool exports in a process of its own


@pytest.fixture(scope='module')
def legacy_export(tiny_dataset, tmp_path_factory):
    """A random tiny EMANet, its legacy export made by the tool, and images on which its labels vary."""
    work = tmp_path_factory.mktemp('legacy')
    model = tiny_emanet()
    save_state(model.state_dict(), str(work / 'model.pdparams'))
    config = work / 'config.yml'
    config.write_text(f'''
val_dataset:
  type: Dataset
  dataset_root: {tiny_dataset}
  val_path: {tiny_dataset}/val.txt
  num_classes: {NUM_CLASSES}
  mode: val
  transforms: [{{type: Normalize, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}]
model:
  type: EMANet
  num_classes: {NUM_CLASSES}
  backbone: {{type: ResNet18_vd, output_stride: 8}}
  ema_channels: 16
  gc_channels: 16
  num_bases: 8
''')
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'export.py'), '--config', str(config),
                             '--model_path', str(work / 'model.pdparams'), '--save_dir', str(work / 'export'),
                             '--legacy_program'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Checked the paddle fp32 export against the dygraph model: 100.0000% of the labels equal' in result.stdout
    assert result.stderr == ''  # Paddle's notes while it traces a legacy program are not passed on
    rng = np.random.RandomState(2)
    images = []
    for index, (height, width) in enumerate([(64, 96), (80, 48)]):
        images.append(str(work / f'{index}.png'))
        cv2.imwrite(images[-1], rng.randint(0, 256, (height, width, 3)).astype(np.uint8))
    return model, work / 'export', images


def test_the_export_holds_a_legacy_program(legacy_export):
    _, folder, _ = legacy_export
    assert sorted(name for name in os.listdir(folder) if name.startswith('model.')) == [
        'model.pdiparams', 'model.pdiparams.info', 'model.pdmodel']


@pytest.mark.parametrize('enable_mkldnn', [False, True])
def test_paddleseg_deploy_scripts_predictor_gives_the_dygraph_labels(legacy_export, enable_mkldnn):
    model, folder, images = legacy_export
    # The calls of PaddleSeg 2.8.0's deploy/python/infer.py on CPU, in its order (memory_optim
    # is what fails on Paddle 3's model.json), with --with_argmax off as our model gives labels.
    cfg = DeployConfig(str(folder / 'deploy.yaml'))
    pred_cfg = PredictConfig(cfg.model, cfg.params)
    pred_cfg.enable_memory_optim()
    pred_cfg.switch_ir_optim(True)
    pred_cfg.disable_gpu()
    if enable_mkldnn:
        pred_cfg.set_mkldnn_cache_capacity(10)
        pred_cfg.enable_mkldnn()
    pred_cfg.set_cpu_math_library_num_threads(2)
    predictor = create_predictor(pred_cfg)
    input_handle = predictor.get_input_handle(predictor.get_input_names()[0])
    output_handle = predictor.get_output_handle(predictor.get_output_names()[0])
    ours = load_exported(str(folder))
    for image in images:
        data = np.array([cfg.transforms({'img': image})['img']])
        input_handle.reshape(data.shape)
        input_handle.copy_from_cpu(data)
        predictor.run()
        label = output_handle.copy_to_cpu()[0]
        assert_labels_vary(label)
        np.testing.assert_array_equal(label, dygraph_label(model, ours, image))
        np.testing.assert_array_equal(ours.predict(image), label)  # our own tools run it too


def test_bf16_of_a_legacy_program_is_one_clear_error(legacy_export):
    _, folder, _ = legacy_export
    with pytest.raises(ValueError, match='bf16 needs the model.json export'):
        load_exported(str(folder), precision='bf16')
