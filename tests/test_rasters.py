"""Rasters of any size: a GeoTIFF's labels, read and written window by window, equal the in-memory sliding
window's; the output carries the input's CRS, transform and size, nodata and the palette as its colour table;
16-bit bands are chosen and scaled as the user says; nodata windows never reach the model; a broken TIFF is
one sentence naming it; without rasterio, ordinary images keep their path and a GeoTIFF names the extra."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import run_tool_in_process
from deploy.test_export import TRANSFORMS, tiny_emanet
from emanet.deploy.backends import load_exported
from emanet.deploy.static_graph import export_model
from emanet.engine.inference import ModelSegmenter
from emanet.engine.predict import color_map, predict_images
from emanet.errors import InvalidInput, Unsupported
from emanet.rasters import RasterOptions, is_raster, predict_raster, read_tiff_header
from emanet.test_time import InferenceOptions

rasterio = pytest.importorskip('rasterio', reason='rasterio (the [geo] extra) has no wheel for this Python')
from affine import Affine  # noqa: E402  (rasterio's dependency)

SLIDE = InferenceOptions(is_slide=True, crop_size=(64, 48), stride=(40, 32))
CRS = 'EPSG:32633'
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)  # 10 m pixels, north up


@pytest.fixture(scope='module')
def model():
    return tiny_emanet()


@pytest.fixture(scope='module')
def export_dir(model, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('export'))
    export_model(model, folder, TRANSFORMS)  # logits, any size
    return folder


def write_raster(path, bands, nodata=None, crs=CRS, transform=TRANSFORM, tiled=True):
    """A GeoTIFF of ``bands`` [count, H, W] (16x16 tiles when ``tiled``, as large rasters come)."""
    count, height, width = bands.shape
    extra = dict(tiled=True, blockxsize=16, blockysize=16) if tiled else {}
    with rasterio.open(path, 'w', driver='GTiff', width=width, height=height, count=count, dtype=bands.dtype,
                       crs=crs, transform=transform, nodata=nodata, **extra) as raster:
        raster.write(bands)
    return str(path)


def random_bands(count=3, height=200, width=300, dtype=np.uint8, high=256, seed=0):
    return np.random.RandomState(seed).randint(0, high, (count, height, width)).astype(dtype)


def in_memory_labels(segmenter, bgr):
    """The whole-image sliding window's labels (emanet.test_time.slide_logits): the image and its scores in memory."""
    model_input, trans_info = segmenter.preprocess(bgr)
    return segmenter.labels(model_input[None], trans_info)[0]


def bgr_of(rgb_bands):
    return np.ascontiguousarray(rgb_bands[::-1].transpose(1, 2, 0))


def read_output(path):
    with rasterio.open(path) as raster:
        return raster.read(), raster.profile, raster.colormap(1)


def test_infer_tool_writes_the_in_memory_sliding_window_labels_with_the_inputs_georeference(export_dir, tmp_path):
    bands = random_bands()
    path = write_raster(tmp_path / 'scene.tif', bands)
    run_tool_in_process('infer.py', '--config', export_dir, '--image_path', path, '--save_dir', tmp_path / 'out',
                        '--is_slide', '--crop_size', 64, 48, '--stride', 40, 32, '--confidence')
    written, profile, colormap = read_output(tmp_path / 'out' / 'scene.tif')
    expected = in_memory_labels(load_exported(export_dir, options=SLIDE), bgr_of(bands))
    np.testing.assert_array_equal(written[0], expected)
    assert (profile['width'], profile['height'], profile['count'], profile['dtype']) == (300, 200, 2, 'uint8')
    assert profile['crs'] == rasterio.crs.CRS.from_string(CRS) and profile['transform'] == TRANSFORM
    assert profile['nodata'] == 255 and profile['compress'] == 'deflate' and profile['tiled']
    colors = color_map()
    assert [colormap[index][:3] for index in range(5)] == [tuple(colors[3 * i:3 * i + 3]) for i in range(5)]
    # The top class's probability x 254: at least 1/5 of it for 5 classes, and highest where the model is sure.
    assert written[1].min() >= 254 // 5 and written[1].max() <= 254
    assert not (tmp_path / 'out' / 'pseudo_color_prediction').exists()


@pytest.mark.parametrize('slide_batch, spill', [(1, False), (3, False), (1, True)])
def test_windows_of_a_tiled_raster_give_the_dygraph_models_in_memory_labels(model, tmp_path, request,
                                                                            slide_batch, spill):
    bands = random_bands(height=131, width=157, seed=1)  # edges that no stride reaches evenly
    path = write_raster(tmp_path / 'scene.tif', bands)
    # With spill, every carried score goes through a nameless file in the output's folder.
    spilled_into = request.getfixturevalue('spilled_into') if spill else []
    options = InferenceOptions(is_slide=True, crop_size=(48, 40), stride=(32, 24), slide_batch=slide_batch)
    segmenter = ModelSegmenter(model, TRANSFORMS, options)
    (tmp_path / 'out').mkdir()
    predict_raster(segmenter, path, str(tmp_path / 'out' / 'labels.tif'), color_map())
    written, _, _ = read_output(tmp_path / 'out' / 'labels.tif')
    np.testing.assert_array_equal(written[0], in_memory_labels(segmenter, bgr_of(bands)))
    assert os.listdir(tmp_path / 'out') == ['labels.tif']
    assert set(spilled_into) == ({str(tmp_path / 'out')} if spill else set())


@pytest.mark.parametrize('stretch', ['scale', 'percentile_stretch'])
def test_a_16_bit_four_band_raster_is_read_through_the_chosen_bands_and_scaled(model, tmp_path, stretch):
    bands = random_bands(count=4, dtype=np.uint16, high=12000, seed=2)  # e.g. blue, green, red, near infrared
    path = write_raster(tmp_path / 'multispectral.tif', bands)
    rgb = bands[[2, 1, 0]].astype(np.float64)  # --bands 3 2 1
    if stretch == 'scale':
        options = RasterOptions(bands=(3, 2, 1), scale=(1000, 11000))
        low, high = np.full([3, 1, 1], 1000.0), np.full([3, 1, 1], 11000.0)
    else:
        options = RasterOptions(bands=(3, 2, 1), percentile_stretch=(2, 98))
        low = np.percentile(rgb.reshape(3, -1), 2, axis=1)[:, None, None]
        high = np.percentile(rgb.reshape(3, -1), 98, axis=1)[:, None, None]
    scaled = np.rint(np.clip((rgb - low) * (255 / (high - low)), 0, 255)).astype(np.uint8)
    segmenter = ModelSegmenter(model, TRANSFORMS, SLIDE)
    predict_raster(segmenter, path, str(tmp_path / 'labels.tif'), color_map(), options)
    written, _, _ = read_output(tmp_path / 'labels.tif')
    expected = in_memory_labels(segmenter, bgr_of(scaled))
    # float32 scaling in windows against float64 here: a value on a rounding edge may land one level apart.
    assert (written[0] == expected).mean() > 0.99


def test_a_16_bit_raster_without_a_scale_is_one_sentence_naming_the_flags(model, tmp_path):
    path = write_raster(tmp_path / 'multispectral.tif', random_bands(count=4, dtype=np.uint16, high=12000))
    with pytest.raises(InvalidInput, match='uint16 values.*--scale MIN MAX or --percentile_stretch'):
        predict_raster(ModelSegmenter(model, TRANSFORMS, SLIDE), path, str(tmp_path / 'labels.tif'), color_map())


def test_nodata_windows_skip_the_model_and_nodata_pixels_are_written_as_nodata(model, tmp_path):
    bands = random_bands(seed=3)
    bands[:, :, :150] = 0  # the left half is nodata: windows over columns 0-149 alone never reach the model
    bands[:, 180:, 200:] = 0
    path = write_raster(tmp_path / 'edge_of_swath.tif', bands, nodata=0)
    segmenter = ModelSegmenter(model, TRANSFORMS, SLIDE)
    windows_run = []
    forward = segmenter.forward
    segmenter.forward = lambda batch: windows_run.append(len(batch)) or forward(batch)
    predict_raster(segmenter, path, str(tmp_path / 'labels.tif'), color_map())
    written, profile, _ = read_output(tmp_path / 'labels.tif')
    # Windows start at columns 0, 40, ..., 236 and rows 0, 32, ..., 152: those starting at 0, 40 and 80 end
    # before column 150 (6 rows x 3 columns of 42 windows).
    assert sum(windows_run) == 42 - 18
    nodata = (bands == 0).all(axis=0)
    assert profile['nodata'] == 255 and (written[0][nodata] == 255).all()
    expected = in_memory_labels(segmenter, bgr_of(bands))
    np.testing.assert_array_equal(written[0][~nodata], expected[~nodata])


def test_an_alpha_band_marks_nodata_too(model, tmp_path):
    bands = random_bands(count=4, seed=4)
    bands[3] = 255
    bands[3, :100, :100] = 0
    path = str(tmp_path / 'with_alpha.tif')
    with rasterio.open(path, 'w', driver='GTiff', width=300, height=200, count=4, dtype='uint8', crs=CRS,
                       transform=TRANSFORM, photometric='RGB', alpha='YES') as raster:
        raster.write(bands)
    predict_raster(ModelSegmenter(model, TRANSFORMS, SLIDE), path, str(tmp_path / 'labels.tif'), color_map())
    written, _, _ = read_output(tmp_path / 'labels.tif')
    assert (written[0][:100, :100] == 255).all() and (written[0][100:] != 255).all()


def truncated_copy(path, keep_fraction):
    data = open(path, 'rb').read()
    broken = path.replace('.tif', '_broken.tif')
    with open(broken, 'wb') as file:
        file.write(data[:int(len(data) * keep_fraction)])
    return broken


@pytest.mark.parametrize('damage', ['truncated', 'directory_past_the_end', 'tags_past_the_budget'])
def test_a_truncated_or_lying_tiff_is_one_sentence_naming_the_file(model, tmp_path, damage):
    path = write_raster(tmp_path / 'scene.tif', random_bands(height=120, width=160), tiled=False)
    data = bytearray(open(path, 'rb').read())
    if damage == 'truncated':
        broken = truncated_copy(path, 0.5)
    else:
        offset = int.from_bytes(data[4:8], 'little')
        if damage == 'directory_past_the_end':
            data[4:8] = (len(data) + 1000).to_bytes(4, 'little')
        else:
            data[offset:offset + 2] = (60000).to_bytes(2, 'little')
        broken = str(tmp_path / 'scene_broken.tif')
        open(broken, 'wb').write(bytes(data))
    with pytest.raises(InvalidInput) as raised:
        predict_images(ModelSegmenter(model, TRANSFORMS, SLIDE), broken, str(tmp_path / 'out'))
    message = str(raised.value)
    assert broken in message and '\n' not in message
    assert (os.listdir(tmp_path / 'out') if os.path.exists(tmp_path / 'out') else []) == []  # no partial file left


def test_the_header_says_which_tiffs_are_rasters(tmp_path):
    geotiff = write_raster(tmp_path / 'geo.tif', random_bands(height=20, width=30))
    plain = str(tmp_path / 'plain.tif')
    cv2.imwrite(plain, np.zeros([20, 30, 3], np.uint8))
    assert read_tiff_header(geotiff).georeferenced and (read_tiff_header(geotiff).width, read_tiff_header(
        geotiff).height) == (30, 20)
    assert is_raster(geotiff) and not is_raster(plain)
    assert is_raster(plain, 'geotiff') and not is_raster(geotiff, 'png')
    # A BigTIFF claiming more pixels than OpenCV decodes goes window by window, georeferenced or not.
    huge = str(tmp_path / 'huge.tif')
    with rasterio.open(huge, 'w', driver='GTiff', width=40000, height=30000, count=1, dtype='uint8', tiled=True,
                       sparse_ok=True, BIGTIFF='YES') as raster:
        raster.write(np.zeros([1, 16, 16], np.uint8), window=rasterio.windows.Window(0, 0, 16, 16))
    assert not read_tiff_header(huge).georeferenced and is_raster(huge)


def test_without_rasterio_images_keep_their_path_and_a_geotiff_names_the_extra(model, tmp_path, monkeypatch):
    geotiff = write_raster(tmp_path / 'scene.tif', random_bands(height=60, width=80))
    os.makedirs(tmp_path / 'images')
    cv2.imwrite(str(tmp_path / 'images' / 'photo.png'), random_bands(height=60, width=80).transpose(1, 2, 0))
    monkeypatch.setitem(sys.modules, 'rasterio', None)  # import rasterio raises ImportError
    segmenter = ModelSegmenter(model, TRANSFORMS, SLIDE)
    assert predict_images(segmenter, str(tmp_path / 'images'), str(tmp_path / 'out')) == 1
    assert (tmp_path / 'out' / 'pseudo_color_prediction' / 'photo.png').exists()
    with pytest.raises(Unsupported, match=r'needs rasterio: pip install emanet-paddle\[geo\]$'):
        predict_images(segmenter, geotiff, str(tmp_path / 'out'))


def test_a_raster_needs_the_sliding_window(model, tmp_path):
    path = write_raster(tmp_path / 'scene.tif', random_bands(height=60, width=80))
    with pytest.raises(InvalidInput, match='--is_slide --crop_size W H --stride W H'):
        predict_images(ModelSegmenter(model, TRANSFORMS), path, str(tmp_path / 'out'))


@pytest.mark.slow
def test_importing_the_package_and_its_raster_module_does_not_import_rasterio():
    code = "import sys, emanet, emanet.rasters, emanet.engine.predict; print('rasterio' in sys.modules)"
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == 'False'
