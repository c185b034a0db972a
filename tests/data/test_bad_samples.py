"""Every kind of bad sample ends training and evaluation in one SampleError naming its file, with and
without loader workers, within seconds: never a hang, never a message lost on the way out of a worker."""
import faulthandler
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import threading
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIG
import emanet.data.dataset
from emanet.config import Builder, load_config
from emanet.data.loading import MAX_PIXELS_VARIABLE, EvalSamples, ResumableBatchSampler, SampleError, load_sample
from emanet.engine.evaluate import evaluate
from emanet.engine.inference import ModelSegmenter
from emanet.engine.trainer import train
from emanet.errors import InvalidInput

# Samples of the tiny dataset (tests/conftest.py): 0-7 train, 8 and 9 val; all 48x32.
VAL_SAMPLE = 9
# The sample of the first training batch (seed 0), so that a run stops at its first iteration.
FIRST_TRAIN_SAMPLE = next(iter(ResumableBatchSampler(8, 2, 1, seed=0)))[0][1]
HANG_SECONDS = 60


@pytest.fixture(autouse=True)
def hang_is_a_failure(request):
    """A hang fails instead of blocking: after HANG_SECONDS the loader workers are killed, the test's
    name and stacks printed, and the test process ends (as pytest-timeout's thread method does)."""
    def give_up():
        request.config.pluginmanager.getplugin('capturemanager').suspend_global_capture(in_=True)
        for worker in multiprocessing.active_children():
            worker.kill()
        print(f'\n{request.node.nodeid} did not end within {HANG_SECONDS} s', file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr)
        os._exit(1)
    watchdog = threading.Timer(HANG_SECONDS, give_up)
    watchdog.start()
    yield
    watchdog.cancel()


def rewrite_label(root, sample, convert):
    path = root / f'{sample}_label.png'
    label = np.asarray(Image.open(path))
    convert(label).save(path)
    return path


def rgb_label(root, sample):
    return rewrite_label(root, sample, lambda label: Image.fromarray(np.stack([label] * 3, axis=-1)))


def rgba_label(root, sample):
    return rewrite_label(root, sample, lambda label: Image.fromarray(np.stack([label] * 4, axis=-1)))


def sixteen_bit_label(root, sample):
    path = root / f'{sample}_label.png'
    label = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(path), label.astype(np.uint16))  # the same class indices, in 16 bits
    return path


def small_label(root, sample):
    cv2.imwrite(str(root / f'{sample}_label.png'), np.zeros((10, 12), np.uint8))
    return f"{root / f'{sample}.jpg'} (label {root / f'{sample}_label.png'})"


def png_header(width, height):
    """A valid PNG of a few bytes that declares ``width`` x ``height`` 1-bit pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
            + chunk(b'IEND', b''))


def png_bomb(root, sample, side):
    """Sample ``sample``'s image replaced by a PNG of a few bytes declaring ``side`` x ``side`` pixels."""
    path = root / f'{sample}.png'
    path.write_bytes(png_header(side, side))
    for split in ('train.txt', 'val.txt'):
        listing = root / split
        listing.write_text(listing.read_text().replace(f'{sample}.jpg', f'{sample}.png'))
    return path


def bomb_image(root, sample):
    return png_bomb(root, sample, 40000)


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def truncated_png_label(root, sample):
    return cut_in_half(root / f'{sample}_label.png')


def truncated_jpeg_image(root, sample):
    return cut_in_half(root / f'{sample}.jpg')  # cv2 decodes the rest as grey, with no error


def broken_symlink_image(root, sample):
    path = root / f'{sample}.jpg'
    path.unlink()
    path.symlink_to(root / 'moved-away' / f'{sample}.jpg')
    return path


# kind: (spoil(dataset root, sample number) -> the file the error names first, the rest of the sentence)
KINDS = {
    'RGB label': (rgb_label, r'the label has 3 channels \(RGB\); labels are single-channel class indices '
                             r'\(a grayscale or palette PNG\)'),
    'RGBA label': (rgba_label, r'the label has 4 channels \(RGBA\); labels are single-channel class indices '
                               r'\(a grayscale or palette PNG\)'),
    '16-bit label': (sixteen_bit_label, r'the label is 16-bit \(PIL mode I;16\); labels are 8-bit class indices'),
    'size mismatch': (small_label, r'the image is 48x32 but its label is 12x10'),
    'decompression bomb': (bomb_image, r'declares more than the 178,956,970 pixels PIL will open '
                                       r'\(PIL\.Image\.MAX_IMAGE_PIXELS\); not decoded'),
    'truncated PNG': (truncated_png_label, r'the file is cut short or damaged \(.+\)'),
    'truncated JPEG': (truncated_jpeg_image, r'the file is cut short or damaged \(.+\)'),
    'broken symlink': (broken_symlink_image, r'missing: a symbolic link to .*moved-away/\d\.jpg, '
                                             r'which does not exist'),
}


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path, monkeypatch):
    """(root, config path): a writable copy of the tiny dataset. The datasets' start-up check that every
    listed file exists is off, so that the loader alone meets a bad file, as when a file goes bad
    after the start (a broken link to a network drive, a file replaced mid-run)."""
    root = tmp_path / 'data'
    shutil.copytree(tiny_dataset, root)
    monkeypatch.setattr(emanet.data.dataset, 'require_files', lambda paths, description: None)
    config = tmp_path / 'copy.yml'
    config.write_text(CONFIG.format(root=root))
    return root, str(config)


def spoil(root, kind, sample):
    """Spoil ``sample`` as ``kind`` says; the message expected, as a regular expression."""
    make_bad, says = KINDS[kind]
    return re.escape(str(make_bad(root, sample))) + ': ' + says


def assert_nothing_outlives_the_run(sigchld_handler):
    """No loader worker survives the failed run, and Paddle's SIGCHLD handler is gone again."""
    assert multiprocessing.active_children() == []
    assert signal.getsignal(signal.SIGCHLD) is sigchld_handler


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('kind', KINDS)
def test_evaluation_stops_at_a_bad_sample_naming_it(dataset_copy, kind, num_workers):
    root, config = dataset_copy
    message = spoil(root, kind, VAL_SAMPLE)
    builder = Builder(load_config(config))
    sigchld_handler = signal.getsignal(signal.SIGCHLD)
    with pytest.raises(SampleError) as raised:
        evaluate(ModelSegmenter(builder.model), builder.val_dataset, num_workers=num_workers)
    assert re.fullmatch(message, str(raised.value))
    assert_nothing_outlives_the_run(sigchld_handler)


# Every kind without workers; with workers, one kind of each check (header, decoding, file system),
# since the way out of a worker is the same for all.
@pytest.mark.parametrize('kind, num_workers', [(kind, 0) for kind in KINDS] +
                         [('RGB label', 2), ('truncated JPEG', 2), ('broken symlink', 2)])
def test_training_stops_at_a_bad_sample_naming_it(dataset_copy, tmp_path, kind, num_workers):
    root, config = dataset_copy
    message = spoil(root, kind, FIRST_TRAIN_SAMPLE)
    sigchld_handler = signal.getsignal(signal.SIGCHLD)
    with pytest.raises(SampleError) as raised:
        train(load_config(config, iters=4), save_dir=str(tmp_path / 'out'), seed=0, num_workers=num_workers)
    assert re.fullmatch(message, str(raised.value))
    assert_nothing_outlives_the_run(sigchld_handler)


def test_training_images_that_differ_in_size_after_the_transforms_are_named(dataset_copy, tmp_path):
    """The tiny config has no crop: a wider image (and its label) cannot join a batch of 48x32 ones."""
    root, config = dataset_copy
    image, label = root / f'{FIRST_TRAIN_SAMPLE}.jpg', root / f'{FIRST_TRAIN_SAMPLE}_label.png'
    cv2.imwrite(str(image), cv2.resize(cv2.imread(str(image)), (64, 32)))
    cv2.imwrite(str(label), cv2.resize(cv2.imread(str(label), cv2.IMREAD_GRAYSCALE), (64, 32),
                                       interpolation=cv2.INTER_NEAREST))
    with pytest.raises(SampleError) as raised:
        train(load_config(config, iters=4), save_dir=str(tmp_path / 'out'), seed=0)
    message = str(raised.value)
    assert message.startswith('the images of one training batch differ in size after the transforms: ')
    assert f'{image} is 64x32' in message
    assert re.search(r'/\d\.jpg is 48x32', message)
    assert message.endswith('; add a crop or a resize to the training transforms')


def val_dataset(config):
    return Builder(load_config(config)).val_dataset


def test_a_palette_label_is_read_as_its_class_indices(dataset_copy):
    root, config = dataset_copy
    path = root / f'{VAL_SAMPLE}_label.png'
    indices = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    palette_label = Image.fromarray(indices).convert('P')
    palette_label.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200])
    palette_label.save(path)
    _, label, _ = load_sample(val_dataset(config), 1)  # the val set's second sample, 9
    np.testing.assert_array_equal(label, indices)


def test_the_pixel_limit_is_named_and_can_be_set_from_the_environment(dataset_copy, monkeypatch):
    root, config = dataset_copy
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, '1500')
    with pytest.raises(SampleError, match=rf'^{re.escape(str(root / "8.jpg"))}: declares 48x32 pixels, more than '
                                          rf'the 1,500 allowed \({MAX_PIXELS_VARIABLE}\); not decoded$'):
        load_sample(val_dataset(config), 0)
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, str(48 * 32))
    image, _, _ = load_sample(val_dataset(config), 0)
    assert image.shape == (3, 32, 48)
    for text in ('2e8', '2²'):
        monkeypatch.setenv(MAX_PIXELS_VARIABLE, text)
        with pytest.raises(InvalidInput, match=rf"^{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, "
                                               rf"got '{text}'$"):
            EvalSamples(val_dataset(config))


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_the_default_pixel_limit_refuses_a_header_declaring_12000_by_12000(dataset_copy):
    root, config = dataset_copy
    bomb = png_bomb(root, 8, 12000)
    with pytest.raises(SampleError, match=rf'^{re.escape(str(bomb))}: declares 12000x12000 pixels, more than the '
                                          r'134,217,728 allowed'):
        load_sample(val_dataset(config), 0)


def test_an_image_is_compared_to_its_label_as_turned_by_its_exif_orientation(dataset_copy):
    """cv2.imread turns an image by its EXIF orientation; PaddleSeg reads labels as stored."""
    root, config = dataset_copy
    path = root / '8.jpg'
    image = Image.open(path)
    image.load()
    exif = Image.Exif()
    exif[0x0112] = 6  # the orientation tag: turn 90 degrees clockwise to show
    image.save(path, exif=exif.tobytes())
    with pytest.raises(SampleError, match=r'8\.jpg \(label .*8_label\.png\): the image is 32x48 as turned by its '
                                          r'EXIF orientation but its label is 48x32$'):
        load_sample(val_dataset(config), 0)
