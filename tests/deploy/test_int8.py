"""int8 calibration: training-size crops of the calibration images, read one at a time, and an int8 export
calibrated on them still passes its check against the dygraph model."""
import re
import weakref

import cv2
import numpy as np
import pytest

from conftest import needs_onnx_export, needs_openvino, run_tool_in_process
from deploy.test_export import TRANSFORMS
from emanet.checkpoint import save_state
from emanet.config import ConfigError, build_model, load_config
from emanet.deploy import export
from emanet.deploy.export import CalibrationImages, preprocessed_images, train_crop_size
from emanet.errors import InvalidInput

CROP = (48, 32)  # (width, height)


@pytest.fixture(scope='module')
def image_paths(tmp_path_factory):
    """Four 64x96 images (height x width) whose pixels all differ, so that a crop shows where it was cut."""
    folder = tmp_path_factory.mktemp('calibration')
    rng = np.random.RandomState(0)
    paths = []
    for index in range(4):
        path = str(folder / f'{index}.png')
        cv2.imwrite(path, rng.randint(0, 256, (64, 96, 3)).astype(np.uint8))
        paths.append(path)
    return paths


def crop_place(crop, image):
    """(top, left) where ``crop`` [3, h, w] lies in ``image`` [3, H, W]."""
    height, width = crop.shape[1:]
    for top in range(image.shape[1] - height + 1):
        for left in range(image.shape[2] - width + 1):
            if np.array_equal(image[:, top:top + height, left:left + width], crop):
                return top, left
    raise AssertionError('the crop is no window of its image')


def test_calibration_images_are_crops_of_the_asked_size_cut_at_spread_places(image_paths):
    crops = CalibrationImages(image_paths, TRANSFORMS, CROP)
    whole = preprocessed_images(image_paths, TRANSFORMS)
    assert len(crops) == 4
    places = []
    for crop, image in zip(crops, whole):
        assert crop.shape == (3, 32, 48) and crop.dtype == np.float32
        places.append(crop_place(crop, image))
    assert len(set(places)) > 1, places  # not one corner of every image
    again = CalibrationImages(image_paths, TRANSFORMS, CROP)
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))  # the same crops every export


def test_images_smaller_than_the_crop_are_padded_with_zeros(image_paths):
    crop = CalibrationImages(image_paths[:1], TRANSFORMS, (128, 40))[0]
    image = preprocessed_images(image_paths[:1], TRANSFORMS)[0]
    assert crop.shape == (3, 40, 128)
    assert not crop[:, :, 96:].any()
    top, _ = crop_place(crop[:, :, :96], image)
    assert 0 <= top <= 64 - 40


def test_without_a_crop_size_the_images_are_whole(image_paths):
    whole = CalibrationImages(image_paths, TRANSFORMS)
    assert all(np.array_equal(a, b) for a, b in zip(whole, preprocessed_images(image_paths, TRANSFORMS)))


def test_images_are_read_only_when_asked_for(image_paths, monkeypatch):
    reads = []
    read_image = export.read_image
    monkeypatch.setattr(export, 'read_image', lambda path: reads.append(path) or read_image(path))
    crops = CalibrationImages(image_paths, TRANSFORMS, CROP)
    assert reads == []
    crops[2]
    assert reads == [image_paths[2]]
    with pytest.raises(IndexError):
        crops[4]


@pytest.mark.parametrize('crop_size', [(0, 32), (48,)])
def test_a_crop_size_must_be_width_and_height_both_positive(image_paths, crop_size):
    with pytest.raises(InvalidInput, match='width height, both positive'):
        CalibrationImages(image_paths, TRANSFORMS, crop_size)


@pytest.mark.parametrize('config, crop', [('configs/emanet_r50_cityscapes.yml', (1024, 512)),
                                          ('configs/emanet_r101_voc12aug.yml', (512, 512)),
                                          ('configs/quickstart.yml', None)])
def test_the_train_crop_is_read_from_the_train_transforms(config, crop):
    assert train_crop_size(load_config(config).dic['train_dataset']['transforms']) == crop


class HeldCrops(CalibrationImages):
    """Calibration crops that count how many of those handed out are still held when the next is asked for;
    ``made`` lists every instance."""
    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed_out, self.shapes, self.most_held = [], [], 0
        self.made.append(self)

    def __getitem__(self, index):
        self.most_held = max(self.most_held, sum(ref() is not None for ref in self.handed_out))
        crop = super().__getitem__(index)
        self.handed_out.append(weakref.ref(crop))
        self.shapes.append(crop.shape)
        return crop


CONFIG = '''
train_dataset:
  type: StreetScenes
  dataset_root: {root}
  num_train: 4
  num_val: 2
  size: [512, 256]
  mode: train
  transforms:
    - type: RandomPaddingCrop
      crop_size: [256, 128]
    - type: Normalize
val_dataset:
  type: StreetScenes
  dataset_root: {root}
  num_train: 4
  num_val: 2
  size: [512, 256]
  mode: val
  transforms:
    - type: Normalize
model:
  type: EMANet
  backbone: {{type: ResNet18_vd, output_stride: 8}}
  num_classes: 19
  ema_channels: 16
  gc_channels: 16
  num_bases: 8
'''


@pytest.fixture(scope='module')
def tool_config(tmp_path_factory):
    """A config whose model trains on 256x128 crops of 512x256 images, and random weights for it."""
    work = tmp_path_factory.mktemp('int8_tool')
    config = work / 'config.yml'
    config.write_text(CONFIG.format(root=work / 'data'))
    weights = work / 'model.pdparams'
    save_state(build_model(load_config(str(config), training=False)).state_dict(), str(weights))
    return str(config), str(weights), work


@pytest.mark.parametrize('flags, calibrated_on', [([], 'crops of 256x128'),
                                                  (['--calibration_crop', 64, 48], 'crops of 64x48'),
                                                  (['--calibration_crop', 0, 0], 'whole'),
                                                  (['--input_shape', 1, 3, 40, 56], 'crops of 56x40')])
def test_export_tool_calibrates_on_the_train_crop_unless_told(tool_config, flags, calibrated_on, monkeypatch):
    import export as export_tool  # tools/export.py
    seen, checked = [], []  # what the export would be calibrated on, and checked on

    def export_checked(model, save_dir, transforms, check_images, calibration, **kwargs):
        seen.extend(calibration)
        checked.extend(check_images)
    monkeypatch.setattr(export_tool, 'export_checked', export_checked)
    config, weights, work = tool_config
    out = run_tool_in_process('export.py', '--config', config, '--model_path', weights, '--save_dir', work / 'out',
                              '--format', 'openvino', '--precision', 'int8', '--calibration_images', 4, *flags)
    assert f'int8: calibrating on 4 images, {calibrated_on}' in out
    sizes = {image.shape[1:] for image in seen}
    expected = {(256, 512)} if calibrated_on == 'whole' else {tuple(map(int, re.findall(r'\d+', calibrated_on)[::-1]))}
    assert sizes == expected
    assert {image.shape[1:] for image in checked} == expected and len(checked) == 2  # the check's crops too


def test_a_calibration_crop_other_than_the_fixed_input_shape_is_refused(tool_config):
    config, weights, work = tool_config
    with pytest.raises(ConfigError, match='--calibration_crop 64 48 differs from the fixed --input_shape'):
        run_tool_in_process('export.py', '--config', config, '--model_path', weights, '--save_dir', work / 'out',
                            '--format', 'openvino', '--precision', 'int8', '--calibration_crop', 64, 48,
                            '--input_shape', 1, 3, 40, 56)


@needs_onnx_export
@needs_openvino
@pytest.mark.slow
def test_export_tool_int8_on_train_crops_read_one_at_a_time_passes_its_check(tool_config, monkeypatch):
    import export as export_tool  # tools/export.py
    HeldCrops.made.clear()
    monkeypatch.setattr(export_tool, 'CalibrationImages', HeldCrops)
    config, weights, work = tool_config
    out = run_tool_in_process('export.py', '--config', config, '--model_path', weights, '--save_dir', work / 'int8',
                              '--format', 'openvino', '--precision', 'int8', '--calibration_images', 4,
                              '--miou_images', 0, '--min_agreement', 0.9)  # as for the random model in test_runtimes
    assert 'int8: calibrating on 4 images, crops of 256x128' in out
    assert re.search(r'Checked the openvino int8 export against the dygraph model: \d+\.\d{4}% of the labels '
                     r'equal on 2 images', out)
    crops = HeldCrops.made[0]  # the calibration images (the check's crops come next)
    assert set(crops.shapes) == {(3, 128, 256)} and len(crops.shapes) >= len(crops) == 4  # NNCF saw every crop
    assert crops.most_held <= 1  # never a list of all the images
