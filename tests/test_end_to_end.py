"""train -> val (flip, multi-scale, sliding window) -> predict, through the tools, on a Cityscapes-layout set.

The tools' main functions run in this process (what they compute and write is the subject here;
tests/test_tools.py and tests/test_cli.py start processes to check what a user sees of one).
"""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import needs_onnx_export, needs_openvino, run_tool_in_process as run_tool, street_scenes_config
from cityscapes_eval import official_miou

EVAL_LINE = re.compile(r'\[EVAL\] #Images: 3 mIoU: (0\.\d{4}) Acc: 0\.\d{4} Kappa: -?\d\.\d{4} Dice: 0\.\d{4}')

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A config, its dataset root and a checkpoint after a short training run with evaluation."""
    work = tmp_path_factory.mktemp('e2e')
    config = street_scenes_config(work / 'config.yml', work / 'scenes', iters=8, num_val=3, size=(128, 64))
    out = run_tool('train.py', '--config', config, '--save_dir', work / 'out', '--do_eval',
                   '--save_interval', 4, '--log_iters', 4, '--seed', 0)
    assert re.search(r'\[TRAIN\] epoch: 2, iter: 8/8, loss: \d+\.\d{4}, lr: ', out)
    assert len(EVAL_LINE.findall(out)) == 2
    assert (work / 'out' / 'best_model' / 'model.pdparams').is_file()
    return {'config': config, 'root': work / 'scenes', 'model': work / 'out' / 'iter_8' / 'model.pdparams',
            'work': work}


@pytest.fixture(scope='module')
def dygraph(trained):
    """What val.py and predict.py give for the trained model without test-time flags (compared against by
    several tests): the [EVAL] line, the saved metrics, and predict.py's save_dir."""
    metrics, out = val_metrics(trained, 'dygraph')
    predicted = trained['work'] / 'dygraph'
    run_tool('predict.py', '--config', trained['config'], '--model_path', trained['model'],
             '--image_path', trained['root'] / 'leftImg8bit' / 'val', '--save_dir', predicted)
    return {'eval_line': EVAL_LINE.search(out).group(0), 'metrics': metrics,
            'predicted': predicted, 'masks': sorted((predicted / 'pseudo_color_prediction').rglob('*.png'))}


def val_metrics(trained, name, *flags):
    """The metrics val.py saves for the trained model with these test-time flags, and its log."""
    metrics_file = trained['work'] / f'{name}.json'
    out = run_tool('val.py', '--config', trained['config'], '--model_path', trained['model'],
                   '--save_json', metrics_file, *flags)
    return json.loads(metrics_file.read_text()), out


def confusion_matrix(trained, name, *flags):
    """The confusion matrix val.py saves for the trained model with these test-time flags, and its log."""
    metrics, out = val_metrics(trained, name, *flags)
    return metrics['confusion_matrix'], out


def test_val_with_flip_and_scales_and_with_sliding_window(trained, dygraph):
    plain = dygraph['metrics']['confusion_matrix']
    augmented, out = confusion_matrix(trained, 'augmented', '--aug_eval', '--scales', 0.75, 1.0, '--flip_horizontal')
    assert EVAL_LINE.search(out)
    slid, out = confusion_matrix(trained, 'slid', '--is_slide', '--crop_size', 64, 64, '--stride', 48, 48)
    assert EVAL_LINE.search(out)
    # The flags change the labels (the same pixels, counted otherwise): they were applied.
    assert np.sum(augmented) == np.sum(slid) == np.sum(plain)
    assert augmented != plain and slid != plain and augmented != slid
    assert re.search(r'^\s*0\s+road\s+\d\.\d{4}\s+', out, re.M)  # the per-class table names classes
    # Only 7 of the 19 classes are drawn: classes neither labelled nor predicted are marked, not NaN.
    assert 'nan' not in out and re.search(r'^\s*\d+\s+\w.*\s-\s+-\s+-\s+absent$', out, re.M)


def test_predict_writes_a_mask_and_an_overlay_per_image(trained, dygraph):
    images = trained['root'] / 'leftImg8bit' / 'val'
    save_dir = dygraph['predicted']
    names = sorted(os.path.relpath(p, images)[:-4] for p in images.rglob('*.png'))
    masks = sorted(os.path.relpath(p, save_dir / 'pseudo_color_prediction')[:-4]
                   for p in (save_dir / 'pseudo_color_prediction').rglob('*.png'))
    assert masks == names and len(names) == 3
    mask = Image.open(save_dir / 'pseudo_color_prediction' / (names[0] + '.png'))
    assert mask.mode == 'P' and mask.size == (128, 64)
    assert (save_dir / 'added_prediction' / (names[0] + '.jpg')).is_file()


def test_val_miou_equals_the_official_cityscapes_evaluator(trained, dygraph):
    prediction_dir = trained['work'] / 'label_ids'
    run_tool('predict.py', '--config', trained['config'], '--model_path', trained['model'],
             '--image_path', trained['root'] / 'leftImg8bit' / 'val', '--save_dir', prediction_dir,
             '--save_format', 'cityscapes')
    ours = dygraph['metrics']['miou']
    assert ours == pytest.approx(official_miou(prediction_dir, trained['root']), abs=1e-4)


def test_export_then_infer_and_val_give_the_dygraph_results(trained, dygraph):
    work, images = trained['work'], trained['root'] / 'leftImg8bit' / 'val'
    run_tool('export.py', '--config', trained['config'], '--model_path', trained['model'],
             '--save_dir', work / 'exported')
    run_tool('infer.py', '--config', work / 'exported' / 'deploy.yaml', '--image_path', images,
             '--save_dir', work / 'inferred')
    assert len(dygraph['masks']) == 3
    for mask in dygraph['masks']:
        inferred = work / 'inferred' / mask.relative_to(dygraph['predicted'])
        assert np.array_equal(np.asarray(Image.open(inferred)), np.asarray(Image.open(mask))), mask.name
    exported = EVAL_LINE.search(run_tool('val.py', '--config', trained['config'],
                                         '--model_path', work / 'exported'))
    assert exported.group(0) == dygraph['eval_line']


@needs_onnx_export
@pytest.mark.parametrize('export_format, precision, backend', [
    ('onnx', 'fp32', None), pytest.param('onnx', 'fp32', 'openvino', marks=needs_openvino),
    pytest.param('openvino', 'fp32', None, marks=needs_openvino), pytest.param('openvino', 'int8', None, marks=needs_openvino)])
def test_every_format_exports_checked_and_runs_through_infer_and_val(trained, dygraph, export_format, precision,
                                                                     backend):
    work, images = trained['work'], trained['root'] / 'leftImg8bit' / 'val'
    folder = work / f'{export_format}_{precision}'
    if not folder.exists():  # the same export serves two backends
        out = run_tool('export.py', '--config', trained['config'], '--model_path', trained['model'], '--save_dir', folder,
                       '--format', export_format, '--precision', precision, '--calibration_images', 4)
        assert re.search(rf'Checked the {export_format} {precision} export against the dygraph model: '
                         r'\d+\.\d{4}% of the labels equal on 3 images', out)
        int8_report = re.search(r'int8 quantization: mIoU (\d\.\d{4}) against (\d\.\d{4}) in fp32 '
                                r'\([+-]\d\.\d{4}\) on 3 val images', out)
        assert bool(int8_report) == (precision == 'int8')
        if int8_report:  # each mIoU as the evaluation of that model reports it
            assert re.search(rf'\[EVAL\] #Images: 3 mIoU: {int8_report.group(1)} .*\(OpenVINO int8\)', out)
            assert re.search(rf'\[EVAL\] #Images: 3 mIoU: {int8_report.group(2)} .*\(OpenVINO fp32\)', out)
    backend_flag = ['--backend', backend] if backend else []
    run_tool('infer.py', '--config', folder, '--image_path', images, '--save_dir', work / f'inferred_{folder.name}',
             *backend_flag)
    exported = EVAL_LINE.search(run_tool('val.py', '--config', trained['config'], '--model_path', folder,
                                         *backend_flag))
    if precision == 'int8':  # the int8 model's mIoU, as the export reported it
        assert f'mIoU: {int8_report.group(1)} ' in exported.group(0)
        return
    assert exported.group(0) == dygraph['eval_line']
    assert len(dygraph['masks']) == 3
    for mask in dygraph['masks']:
        inferred = work / f'inferred_{folder.name}' / mask.relative_to(dygraph['predicted'])
        assert np.array_equal(np.asarray(Image.open(inferred)), np.asarray(Image.open(mask))), mask.name
