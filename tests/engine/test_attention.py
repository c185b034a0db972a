"""The EM unit's attention: responsibilities that sum to one, maps that line up with the image, the same
attention from PaddleSeg's EMANet class, pictures from the tool and in VisualDL; the model's outputs untouched."""
import os
import subprocess
import sys

import cv2
import numpy as np
import paddle
import paddle.nn as nn
import paddleseg.models
import pytest

from conftest import TOOLS
from emanet import EMANet
from emanet.checkpoint import save_state
from emanet.config import build_model, load_config
from emanet.engine.attention import attention_picture, base_colors, em_attention, find_em_unit
from emanet.engine.inference import ModelSegmenter
from emanet.engine.hooks import default_hooks
from emanet.engine.trainer import train

NUM_BASES = 6
TRANSFORMS = [{'type': 'Normalize'}]


class LocalBackbone(nn.Layer):
    """Features at output stride 8 from each 8x8 block of pixels alone (average, then 1x1 convolutions):
    a flat region of the image gives exactly constant features, up to the block next to an edge."""

    def __init__(self, channels=(8, 16, 1024, 32)):
        super().__init__()
        self.feat_channels = list(channels)
        self.pool = nn.AvgPool2D(8)
        self.convs = nn.LayerList([nn.Conv2D(3, c, 1) for c in channels])

    def forward(self, x):
        pooled = self.pool(x)
        return [paddle.tanh(conv(pooled)) for conv in self.convs]


def local_model(model_class=EMANet):
    paddle.seed(1)
    return model_class(num_classes=3, backbone=LocalBackbone(), ema_channels=16, gc_channels=8, num_bases=NUM_BASES)


def two_halves(height=64, width=128):
    """A BGR image whose left half is one flat colour and the right half another."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :width // 2] = (40, 160, 60)
    image[:, width // 2:] = (200, 80, 30)
    return image


def spread(vector, height, width):
    """[K] -> [K, height, width], the same vector at every pixel."""
    return np.broadcast_to(vector[:, None, None], (len(vector), height, width))


def test_responsibilities_sum_to_one_over_the_bases_at_every_pixel():
    attention = em_attention(ModelSegmenter(local_model(), TRANSFORMS), two_halves())
    assert attention.responsibilities.shape == (NUM_BASES, 8, 16)  # the feature resolution: stride 8
    np.testing.assert_allclose(attention.responsibilities.sum(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(attention.image_maps.sum(axis=0), 1, atol=1e-5)
    assert attention.bases.shape == (16, NUM_BASES)
    np.testing.assert_allclose(np.linalg.norm(attention.bases, axis=0), 1, atol=1e-5)


def test_the_maps_line_up_with_the_image_at_its_size_and_orientation():
    attention = em_attention(ModelSegmenter(local_model(), TRANSFORMS), two_halves())
    assert attention.image_maps.shape == (NUM_BASES, 64, 128) and attention.labels.shape == (64, 128)
    # Away from the image border and the middle (the head's 3x3 convolutions see an edge one feature
    # pixel away, 8 image pixels, and the resize another half), each half has one responsibility vector:
    left, right = attention.responsibilities[:, 3, 3], attention.responsibilities[:, 3, 12]
    assert np.abs(left - right).max() > 1e-3
    np.testing.assert_allclose(attention.responsibilities[:, 1:7, 1:7], spread(left, 6, 6), atol=1e-6)
    np.testing.assert_allclose(attention.responsibilities[:, 1:7, 9:15], spread(right, 6, 6), atol=1e-6)
    # and the image's left half gets the left half's, the right half the right's: not flipped or transposed.
    np.testing.assert_allclose(attention.image_maps[:, 16:48, 16:48], spread(left, 32, 32), atol=1e-5)
    np.testing.assert_allclose(attention.image_maps[:, 16:48, 80:112], spread(right, 32, 32), atol=1e-5)
    strongest = attention.strongest_base()
    assert len(np.unique(strongest[16:48, 16:48])) == 1 and len(np.unique(strongest[16:48, 80:112])) == 1
    assert attention.pixel_shares().sum() == pytest.approx(1)


def test_the_model_outputs_stay_as_they_are():
    model = local_model()
    model.eval()
    x = paddle.to_tensor(np.random.RandomState(0).uniform(-1, 1, (1, 3, 64, 96)).astype('float32'))
    before = model(x)[0].numpy()
    mu = find_em_unit(model).mu.numpy()
    em_attention(ModelSegmenter(model, TRANSFORMS), two_halves(64, 96))
    np.testing.assert_array_equal(model(x)[0].numpy(), before)
    np.testing.assert_array_equal(find_em_unit(model).mu.numpy(), mu)
    assert not find_em_unit(model)._forward_pre_hooks  # the hook is gone


def test_paddlesegs_own_emanet_class_gives_the_same_attention_on_the_same_weights():
    ours, theirs = local_model(), local_model(paddleseg.models.EMANet)
    theirs.set_state_dict(ours.state_dict())
    image = two_halves()
    a, b = (em_attention(ModelSegmenter(model, TRANSFORMS), image) for model in (ours, theirs))
    np.testing.assert_allclose(b.responsibilities, a.responsibilities, atol=1e-5)
    np.testing.assert_allclose(b.bases, a.bases, atol=1e-5)
    np.testing.assert_array_equal(b.labels, a.labels)


def test_a_model_without_an_em_unit_is_one_clear_error():
    with pytest.raises(ValueError, match='Conv2D has no EM attention unit'):
        find_em_unit(nn.Conv2D(3, 3, 1))


def test_the_picture_shows_the_image_the_strongest_base_and_the_top_maps():
    attention = em_attention(ModelSegmenter(local_model(), TRANSFORMS), two_halves())
    picture = attention_picture(two_halves(), attention, base_colors(3), top=5, tile_width=160, columns=4)
    assert picture.shape == (2 * 80, 4 * 160, 3)  # segmentation, strongest base and 5 maps, 4 a row
    assert len(base_colors(64)) == len({tuple(color) for color in base_colors(64)}) == 64


@pytest.mark.slow
def test_the_tool_writes_a_picture_per_image_of_a_folder(tiny_config, tiny_dataset, tmp_path):
    config = tiny_config()
    paddle.seed(0)
    save_state(build_model(load_config(config)).state_dict(), str(tmp_path / 'model.pdparams'))
    folder = tmp_path / 'images'
    folder.mkdir()
    for name in ('a', 'b'):
        cv2.imwrite(str(folder / f'{name}.jpg'), cv2.imread(str(tiny_dataset / '8.jpg')))
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'visualize.py'), '--config', config, '--model_path',
                             str(tmp_path / 'model.pdparams'), '--image_path', str(folder), '--save_dir',
                             str(tmp_path / 'out'), '--top', '4'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Wrote 2 attention pictures' in result.stdout
    for name in ('a', 'b'):
        picture = cv2.imread(str(tmp_path / 'out' / f'{name}_attention.png'))
        assert picture.shape == (2 * 213, 4 * 320, 3)  # 96x64 images as 320-wide tiles; 2 + 4 tiles, 4 a row


def test_evaluation_during_training_puts_the_pictures_into_visualdl(tiny_config, tmp_path):
    from visualdl import LogReader
    out = tmp_path / 'out'
    train(load_config(tiny_config(), iters=2), save_dir=str(out), save_interval=2, seed=0,
          hooks=default_hooks(str(out), do_eval=True, use_vdl=True, log_attention=True))
    log, = [name for name in os.listdir(out) if name.startswith('vdlrecords')]
    reader = LogReader(file_path=str(out / log))
    assert sorted(reader.get_tags()['image']) == ['Attention/8', 'Attention/9']  # the two val images
    with pytest.raises(ValueError, match='needs use_vdl and do_eval'):
        default_hooks(str(tmp_path / 'no'), do_eval=True, log_attention=True)
