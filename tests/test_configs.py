"""Every shipped config reads, builds its model and datasets, and states the published recipe."""
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from emanet import EMANet
from emanet.config import Builder, load_config
from emanet.data.scene_painter import make_street_scenes

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
PUBLISHED = {
    'emanet_r50_cityscapes.yml': ('ResNet50_vd', 19, 312),
    'emanet_r101_cityscapes.yml': ('ResNet101_vd', 19, 567),
    'emanet_r50_voc12aug.yml': ('ResNet50_vd', 21, 312),
    'emanet_r101_voc12aug.yml': ('ResNet101_vd', 21, 567),
}


@pytest.fixture(scope='module')
def tiny_cityscapes(tmp_path_factory):
    return make_street_scenes(str(tmp_path_factory.mktemp('cityscapes')), num_train=2, num_val=1,
                              size=(64, 32), workers=1)


@pytest.fixture(scope='module')
def tiny_voc(tmp_path_factory):
    """A VOCdevkit with train, val and aug lists of one image each."""
    root = tmp_path_factory.mktemp('VOCdevkit')
    voc = root / 'VOC2012'
    for folder in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'ImageSets/Segmentation'):
        (voc / folder).mkdir(parents=True)
    for name, split in (('a', 'train'), ('b', 'val'), ('c', 'aug')):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / 'JPEGImages' / f'{name}.jpg')
        label_dir = 'SegmentationClassAug' if split == 'aug' else 'SegmentationClass'
        Image.fromarray(np.ones((8, 8), np.uint8)).save(voc / label_dir / f'{name}.png')
        (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(name + '\n')
    return str(root)


def build(name, dataset_root):
    cfg = load_config(os.path.join(CONFIG_DIR, name),
                      opts=['model.backbone.pretrained=None', f'train_dataset.dataset_root={dataset_root!r}',
                            f'val_dataset.dataset_root={dataset_root!r}'])
    builder = Builder(cfg)
    with paddle.LazyGuard():  # the layout is checked here, not the random start of its weights
        builder.model
    return cfg, builder


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_config_builds_model_and_datasets(name, tiny_cityscapes, tiny_voc):
    backbone, num_classes, num_keys = PUBLISHED[name]
    cityscapes = 'cityscapes' in name
    cfg, builder = build(name, tiny_cityscapes if cityscapes else tiny_voc)
    model = builder.model
    assert isinstance(model, EMANet) and type(model.backbone).__name__ == 'ResNet_vd'
    assert cfg.dic['model']['backbone']['type'] == backbone
    assert len(model.state_dict()) == num_keys
    assert model.head.cls[1].weight.shape[0] == num_classes
    assert model.align_corners is (not cityscapes)
    assert len(builder.train_dataset) == 2 and len(builder.val_dataset) == 1


# PaddleSeg's published recipes (its configs and model-zoo table, see shared/seed): per-GPU batch x 4 GPUs,
# iterations, training crop (w, h), align_corners.
RECIPES = {'cityscapes': (2, 80000, (1024, 512), False), 'voc12aug': (4, 40000, (512, 512), True)}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_config_trains_as_paddleseg_published(name, tiny_cityscapes, tiny_voc):
    batch, iters, (crop_width, crop_height), align_corners = RECIPES[name.split('_')[-1][:-len('.yml')]]
    cityscapes = 'cityscapes' in name
    cfg, builder = build(name, tiny_cityscapes if cityscapes else tiny_voc)
    assert (cfg.batch_size, cfg.iters) == (batch, iters)
    # What the built objects do, not what the YAML says: SGD with momentum 0.9 and L2 5e-4,
    # poly decay from 0.01 with power 0.9 to 0 at the last iteration.
    optimizer, schedule = builder.optimizer, builder.lr_scheduler
    assert (type(optimizer).__name__, optimizer._momentum, optimizer._regularization_coeff) == ('Momentum', 0.9, 5e-4)
    rates = {}
    for step in (0, iters // 2, iters):
        schedule.step(step)  # as if stepped once per iteration up to here (the schedule is closed-form)
        rates[step] = schedule.last_lr
    assert rates == pytest.approx({0: 0.01, iters // 2: 0.01 * 0.5 ** 0.9, iters: 0.0})
    # Training samples are random crops of the published size, whatever the image size.
    assert builder.train_dataset[0]['img'].shape == (3, crop_height, crop_width)
    assert builder.model.align_corners is align_corners
    assert cfg.dic['model']['backbone']['output_stride'] == 8
    assert builder.loss['coef'] == [1, 0.4]  # the auxiliary head's loss weighs 0.4


def test_quickstart_config_builds_on_its_own_drawn_data(tmp_path):
    cfg = load_config(os.path.join(CONFIG_DIR, 'quickstart.yml'),
                      opts=[f'train_dataset.dataset_root={str(tmp_path)!r}',
                            f'val_dataset.dataset_root={str(tmp_path)!r}',
                            'train_dataset.num_train=2', 'train_dataset.num_val=1',
                            'val_dataset.num_train=2', 'val_dataset.num_val=1'])
    builder = Builder(cfg)
    assert len(builder.train_dataset) == 2 and len(builder.val_dataset) == 1
    assert isinstance(builder.model, EMANet)
    assert 'pretrained' not in cfg.dic['model']['backbone']  # the quick start downloads nothing
