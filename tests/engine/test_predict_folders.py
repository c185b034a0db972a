"""Any image, any folder: a folder predicted through the reading and writing threads gives the files of predicting
each image alone with PaddleSeg's writers, and tools/infer.py streams a large image in memory that grows with
its pixels' bytes, not with float copies or scores of them."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from paddleseg.utils.visualize import get_color_map_list, get_pseudo_color_map, visualize

from conftest import TOOLS
from deploy.test_export import TRANSFORMS, tiny_emanet
from emanet.deploy.static_graph import export_model
from emanet.engine.inference import ModelSegmenter
from emanet.engine.predict import predict_images
from emanet.test_time import InferenceOptions

SLIDE = InferenceOptions(is_slide=True, crop_size=(48, 40), stride=(32, 24))


@pytest.fixture(scope='module')
def model():
    return tiny_emanet()


def write_folder(folder, sizes):
    rng = np.random.RandomState(7)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, (height, width) in enumerate(sizes):
        paths.append(os.path.join(folder, f'image_{index}.png'))
        cv2.imwrite(paths[-1], rng.randint(0, 256, (height, width, 3)).astype(np.uint8))
    return paths


@pytest.mark.parametrize('options', [InferenceOptions(), SLIDE], ids=['whole_image', 'streamed_windows'])
def test_a_folder_writes_what_each_image_predicted_alone_writes_with_paddleseg(model, tmp_path, options):
    paths = write_folder(str(tmp_path / 'images'), [(64, 96), (71, 53), (40, 120), (64, 96), (33, 47)])
    segmenter = ModelSegmenter(model, TRANSFORMS, options)
    assert predict_images(segmenter, str(tmp_path / 'images'), str(tmp_path / 'out')) == len(paths)
    colors = get_color_map_list(256)
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        labels = segmenter.predict(path).astype(np.uint8)  # one image, no threads
        get_pseudo_color_map(labels, colors).save(str(tmp_path / 'expected.png'))
        cv2.imwrite(str(tmp_path / 'expected.jpg'), visualize(path, labels, colors, weight=0.6))
        with open(tmp_path / 'out' / 'pseudo_color_prediction' / f'{name}.png', 'rb') as written, \
                open(tmp_path / 'expected.png', 'rb') as expected:
            assert written.read() == expected.read(), name
        with open(tmp_path / 'out' / 'added_prediction' / f'{name}.jpg', 'rb') as written, \
                open(tmp_path / 'expected.jpg', 'rb') as expected:
            assert written.read() == expected.read(), name


def infer_peak_mb(export_dir, image_path, save_dir):
    """Peak RSS (VmHWM) of a tools/infer.py process streaming ``image_path`` with 256x256 windows."""
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    process = subprocess.run(
        [sys.executable, '-c', code, TOOLS, os.path.join(TOOLS, 'infer.py'), '--config', export_dir,
         '--image_path', image_path, '--save_dir', save_dir, '--is_slide', '--crop_size', '256', '256',
         '--stride', '256', '256'], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    return int(process.stdout.split('VmHWM')[-1].split()[0]) / 1024


@pytest.mark.slow
def test_infer_tool_streams_a_large_image_in_fewer_bytes_per_pixel_than_the_whole_image_path(model, tmp_path):
    export_dir = str(tmp_path / 'export')
    export_model(model, export_dir, TRANSFORMS)  # logits, any size
    # Of the same width, so that the rows of scores carried from one row of windows to the next are the same
    small, large = write_folder(str(tmp_path / 'images'), [(256, 1024), (1536, 1024)])
    small_peak = infer_peak_mb(export_dir, small, str(tmp_path / 'small'))
    large_peak = infer_peak_mb(export_dir, large, str(tmp_path / 'large'))
    # Streamed, each pixel costs its decoded bytes (3, and 3 more while OpenCV hands the image to numpy) and its
    # label (1); the whole-image path adds a float copy of the image (12) and 5 classes' scores (20).
    added_pixels = (1536 - 256) * 1024
    assert large_peak - small_peak < 16 * added_pixels / 2 ** 20, (small_peak, large_peak)
    assert os.path.exists(tmp_path / 'large' / 'pseudo_color_prediction' / 'image_1.png')
