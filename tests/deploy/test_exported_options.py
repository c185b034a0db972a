"""Flips, scales and sliding windows run on exported models exactly as on the dygraph model: the
same windows, the same averaging of logits, in every runtime; exports that give no logits say so."""
import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import ONNX_EXPORT_MISSING, OPENVINO_MISSING, run_tool_in_process
from deploy.test_export import TRANSFORMS, tiny_emanet
from emanet.deploy.backends import load_exported
from emanet.deploy.export import export_checked, preprocessed_images
from emanet.deploy.static_graph import export_model, read_deploy_config
from emanet.engine.inference import ModelSegmenter
from emanet.errors import InvalidInput
from emanet.test_time import InferenceOptions

FLIP = InferenceOptions(aug_eval=True, flip_horizontal=True)
MS_FLIP = InferenceOptions(aug_eval=True, flip_horizontal=True, scales=(0.75, 1.0, 1.25))
SLIDE = InferenceOptions(is_slide=True, crop_size=(48, 40), stride=(32, 24))
MS_FLIP_SLIDE = InferenceOptions(aug_eval=True, flip_horizontal=True, scales=(0.75, 1.25), is_slide=True,
                                 crop_size=(48, 40), stride=(32, 24))

pytestmark = pytest.mark.slow  # exports of a whole model


@pytest.fixture(scope='module')
def model():
    return tiny_emanet()


@pytest.fixture(scope='module')
def images():
    rng = np.random.RandomState(5)
    return [rng.randint(0, 256, size + (3,)).astype(np.uint8) for size in ((64, 96), (71, 53))]


@pytest.fixture(scope='module')
def exports(model, images, tmp_path_factory):
    """The tiny model exported with the default output (logits) as paddle, and as onnx where it can be."""
    check = preprocessed_images(images, TRANSFORMS)
    folders = {}
    for export_format in ('paddle', 'onnx'):
        if export_format == 'onnx' and ONNX_EXPORT_MISSING:
            continue
        folders[export_format] = str(tmp_path_factory.mktemp(export_format))
        export_checked(model, folders[export_format], TRANSFORMS, check, export_format=export_format)
    return folders


def test_exports_give_logits_unless_told(exports):
    assert {read_deploy_config(folder)['output_op'] for folder in exports.values()} == {'none'}


# Every option in Paddle Inference; the runtimes share that code, so one combination each shows their logits fit it.
@pytest.mark.parametrize('export_format, backend, options', [
    ('paddle', None, FLIP), ('paddle', None, MS_FLIP), ('paddle', None, SLIDE),
    ('onnx', None, MS_FLIP), ('onnx', 'openvino', MS_FLIP_SLIDE)],
    ids=['paddle-flip', 'paddle-ms_flip', 'paddle-slide', 'onnxruntime-ms_flip', 'openvino-ms_flip_slide'])
def test_exported_options_label_as_the_dygraph_model(exports, model, images, options, export_format, backend):
    if export_format not in exports:
        pytest.skip(ONNX_EXPORT_MISSING)
    if backend == 'openvino' and OPENVINO_MISSING:
        pytest.skip(OPENVINO_MISSING)
    exported = load_exported(exports[export_format], backend=backend, options=options)
    dygraph = ModelSegmenter(model, TRANSFORMS, options)
    plain = ModelSegmenter(model, TRANSFORMS)
    for image in images:
        expected = dygraph.predict(image)
        assert (expected != plain.predict(image)).any()  # the options change the labels of this model
        np.testing.assert_array_equal(exported.predict(image), expected)


def test_exported_sliding_window_streams_as_the_dygraph_model(exports, model):
    image = np.random.RandomState(6).randint(0, 256, (90, 130, 3)).astype(np.uint8)
    exported = load_exported(exports['paddle'], options=SLIDE)
    assert exported.streams
    np.testing.assert_array_equal(exported.predict(image), ModelSegmenter(model, TRANSFORMS, SLIDE).predict(image))


@pytest.mark.parametrize('output_op', ['argmax', 'softmax'])
def test_an_export_without_logits_refuses_options_in_one_sentence(model, tmp_path, output_op):
    export_model(model, str(tmp_path), TRANSFORMS, output_op=output_op)
    load_exported(str(tmp_path))  # runs as exported
    with pytest.raises(InvalidInput, match=f'exported with --output_op {output_op}.*--output_op none'):
        load_exported(str(tmp_path), options=FLIP)


def test_infer_tool_runs_a_folder_with_a_sliding_window_as_the_segmenter(exports, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.RandomState(7)
    images = {name: rng.randint(0, 256, size + (3,)).astype(np.uint8)
              for name, size in (('a', (70, 110)), ('b', (50, 64)), ('c', (90, 40)))}
    for name, image in images.items():
        cv2.imwrite(str(folder / f'{name}.png'), image)
    run_tool_in_process('infer.py', '--config', exports['paddle'], '--image_path', folder,
                        '--save_dir', tmp_path / 'out', '--is_slide', '--crop_size', 48, 40, '--stride', 32, 24,
                        '--slide_batch', 2)
    segmenter = load_exported(exports['paddle'], options=SLIDE)
    for name, image in images.items():
        saved = np.asarray(Image.open(tmp_path / 'out' / 'pseudo_color_prediction' / f'{name}.png'))
        np.testing.assert_array_equal(saved, segmenter.predict(image))
        assert (tmp_path / 'out' / 'added_prediction' / f'{name}.jpg').is_file()
