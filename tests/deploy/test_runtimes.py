"""Every export format in every runtime: labels equal the dygraph model's, int8 close to them, and a
corrupted conversion is refused by the export's own check."""
import os
import re
import sys

import numpy as np
import pytest

from emanet.deploy import export, runtimes
from emanet.deploy.export import ExportCheckError, export_checked, preprocessed_images
from emanet.deploy.backends import load_exported
from emanet.deploy.runtimes import OnnxRuntimeSegmenter, OpenVINOSegmenter, require
from emanet.device import bf16_kind
from emanet.errors import Unsupported

from conftest import ONNX_EXPORT_MISSING, OPENVINO_MISSING, needs_onnx_export
from deploy.test_export import TRANSFORMS, assert_labels_vary, dygraph_label, tiny_emanet

SIZES = [(64, 96), (80, 48), (64, 96), (48, 64)]


@pytest.fixture(scope='module')
def images():
    rng = np.random.RandomState(1)
    return [rng.randint(0, 256, (height, width, 3)).astype(np.uint8) for height, width in SIZES]


@pytest.fixture(scope='module')
def model():
    return tiny_emanet()


@pytest.fixture(scope='module')
def exports(model, images, tmp_path_factory):
    """The tiny model exported (and checked) as onnx, openvino fp32 and openvino int8."""
    if ONNX_EXPORT_MISSING or OPENVINO_MISSING:
        pytest.skip(ONNX_EXPORT_MISSING or OPENVINO_MISSING)
    check = preprocessed_images(images, TRANSFORMS)
    folders = {}
    for name, export_format, calibration in (('onnx', 'onnx', None), ('openvino', 'openvino', None),
                                             ('openvino_int8', 'openvino', check)):
        folders[name] = str(tmp_path_factory.mktemp(name))
        _, agreement, _ = export_checked(model, folders[name], TRANSFORMS, check, export_format=export_format,
                                      calibration=calibration, min_agreement=0.9 if calibration else None)
        folders[name + '_agreement'] = agreement
    return folders


@pytest.mark.parametrize('folder, backend, runtime', [('onnx', None, OnnxRuntimeSegmenter),
                                                      ('onnx', 'openvino', OpenVINOSegmenter),
                                                      ('openvino', None, OpenVINOSegmenter)])
@pytest.mark.slow
def test_fp32_exports_label_every_image_as_the_dygraph_model(exports, model, images, folder, backend, runtime):
    segmenter = load_exported(exports[folder], backend=backend)
    assert type(segmenter) is runtime
    for image in images:
        label = segmenter.predict(image)
        assert label.shape == image.shape[:2] and label.dtype == np.int32
        assert_labels_vary(label)
        np.testing.assert_array_equal(label, dygraph_label(model, segmenter, image))
    assert exports[folder + '_agreement'] == 1.0  # what the export's own check measured


@pytest.mark.slow
def test_int8_agrees_with_the_dygraph_model_on_most_pixels(exports, model, images):
    segmenter = load_exported(exports['openvino_int8'])
    assert segmenter.deploy['quantization'] == 'int8'
    equal = sum(int((segmenter.predict(image) == dygraph_label(model, segmenter, image)).sum()) for image in images)
    assert equal / sum(image.shape[0] * image.shape[1] for image in images) == exports['openvino_int8_agreement']
    assert exports['openvino_int8_agreement'] >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(bf16_kind() != 'native', reason='the CPU has no bf16')
def test_openvino_bf16_stays_close_to_fp32(exports, images):
    fp32, bf16 = load_exported(exports['openvino']), load_exported(exports['openvino'], precision='bf16')
    assert np.mean([np.mean(bf16.predict(image) == fp32.predict(image)) for image in images]) >= 0.95


@pytest.mark.slow
def test_a_runtime_that_cannot_read_a_format_is_one_clear_error(exports):
    with pytest.raises(ValueError, match='holds a openvino model, which onnxruntime does not run'):
        load_exported(exports['openvino'], backend='onnxruntime')
    with pytest.raises(ValueError, match='ONNX Runtime runs this model in fp32 only'):
        load_exported(exports['onnx'], precision='bf16')


@needs_onnx_export
@pytest.mark.slow
def test_a_corrupted_conversion_is_refused_and_removed(model, images, tmp_path, monkeypatch):
    import onnx  # installed with paddle2onnx only
    real_to_onnx = export.to_onnx

    def to_onnx_misreading_epsilon(paddle_dir, save_dir):
        """As paddle2onnx's bug reads PIR float attributes: every BatchNorm epsilon wrong."""
        path = real_to_onnx(paddle_dir, save_dir)
        onnx_path = os.path.join(save_dir, 'model.onnx')
        graph = onnx.load(onnx_path)
        changed = 0
        for node in graph.graph.node:
            for attribute in node.attribute:
                if node.op_type == 'BatchNormalization' and attribute.name == 'epsilon':
                    attribute.f = 10.0
                    changed += 1
        assert changed > 0
        onnx.save(graph, onnx_path)
        return path

    monkeypatch.setattr(export, 'to_onnx', to_onnx_misreading_epsilon)
    save_dir = tmp_path / 'onnx'
    with pytest.raises(ExportCheckError, match=r'the onnx fp32 export labels \d+\.\d+% of the pixels'):
        export_checked(model, str(save_dir), TRANSFORMS, preprocessed_images(images, TRANSFORMS),
                       export_format='onnx')
    assert not save_dir.exists()


def test_a_missing_runtime_package_is_one_sentence_saying_how_to_install_it():
    with pytest.raises(Unsupported, match=r"^ONNX Runtime inference needs the 'no_such_runtime' package: "
                                          r"pip install -r requirements-deploy\.txt$"):
        require('no_such_runtime', 'ONNX Runtime inference')


def test_a_package_without_a_wheel_for_this_python_names_the_pythons_it_has(monkeypatch):
    python = '.'.join(map(str, sys.version_info[:2]))
    monkeypatch.setitem(runtimes.WHEEL_PYTHONS, 'no_such_converter', ((2, 6), (2, 7), ''))
    with pytest.raises(Unsupported, match=r"^Exporting to ONNX or OpenVINO needs the 'no_such_converter' package, "
                                          rf"which has wheels for Python 2\.6 to 2\.7 only, not for this Python "
                                          rf"{re.escape(python)}$"):
        require('no_such_converter', 'Exporting to ONNX or OpenVINO')


@pytest.mark.parametrize('export_format', ['onnx', 'openvino'])
def test_without_a_paddle2onnx_wheel_onnx_and_openvino_exports_say_so_before_any_work(
        model, images, tmp_path, monkeypatch, export_format):
    monkeypatch.setitem(sys.modules, 'paddle2onnx', None)  # as on a Python it has no wheel for
    monkeypatch.setitem(runtimes.WHEEL_PYTHONS, 'paddle2onnx', ((2, 6), (2, 7), ''))
    monkeypatch.setattr(export, 'export_model', lambda *args, **kwargs: pytest.fail('the export started'))
    with pytest.raises(Unsupported, match=r"^Exporting to ONNX or OpenVINO needs the 'paddle2onnx' package, "
                                          r"which has wheels for Python 2\.6 to 2\.7 only"):
        export_checked(model, str(tmp_path / 'export'), TRANSFORMS, preprocessed_images(images, TRANSFORMS),
                       export_format=export_format)
    assert not (tmp_path / 'export').exists()
