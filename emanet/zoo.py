"""The published EMANet models: one table of configs, released weights and PaddleSeg's mIoU.

    >>> import emanet
    >>> emanet.list_models()
    ['emanet_r101_cityscapes', 'emanet_r101_voc12aug', 'emanet_r50_cityscapes', 'emanet_r50_voc12aug']
    >>> model = emanet.create_model('emanet_r101_cityscapes', pretrained=True)  # downloads once

The weights are PaddleSeg's releases (trained with its EMANet, which this package's loads key for
key); the mIoU columns are those PaddleSeg published (single scale, flip, multi-scale + flip).
"""
import dataclasses

from paddleseg.cvlibs import manager

from emanet.checkpoint import load_weights
from emanet.models import EMANet

WEIGHTS_ROOT = 'https://bj.bcebos.com/paddleseg/dygraph'


@dataclasses.dataclass(frozen=True)
class PublishedModel:
    """One row of the model zoo.

    ``config`` is the training recipe in this repository's ``configs/``; ``backbone``,
    ``num_classes`` and ``align_corners`` are what of it ``create_model`` needs (the head uses
    EMANet's defaults, as the configs do; a test keeps the two in step).
    """
    name: str
    config: str
    dataset: str
    backbone: str
    num_classes: int
    align_corners: bool
    weights_url: str
    miou: float
    miou_flip: float
    miou_ms_flip: float


MODELS = {model.name: model for model in (
    PublishedModel('emanet_r50_cityscapes', 'configs/emanet_r50_cityscapes.yml', 'Cityscapes 1024x512, 80k',
                   'ResNet50_vd', 19, False,
                   f'{WEIGHTS_ROOT}/cityscapes/emanet_resnet50_os8_cityscapes_1024x512_80k/model.pdparams',
                   79.05, 79.34, 79.69),
    PublishedModel('emanet_r101_cityscapes', 'configs/emanet_r101_cityscapes.yml', 'Cityscapes 1024x512, 80k',
                   'ResNet101_vd', 19, False,
                   f'{WEIGHTS_ROOT}/cityscapes/emanet_resnet101_os8_cityscapes_1024x512_80k/model.pdparams',
                   80.00, 80.23, 80.53),
    PublishedModel('emanet_r50_voc12aug', 'configs/emanet_r50_voc12aug.yml', 'VOC 2012 aug 512x512, 40k',
                   'ResNet50_vd', 21, True,
                   f'{WEIGHTS_ROOT}/pascal_voc12/emanet_resnet50_os8_voc12aug_512x512_40k/model.pdparams',
                   78.60, 78.90, 79.17),
    PublishedModel('emanet_r101_voc12aug', 'configs/emanet_r101_voc12aug.yml', 'VOC 2012 aug 512x512, 40k',
                   'ResNet101_vd', 21, True,
                   f'{WEIGHTS_ROOT}/pascal_voc12/emanet_resnet101_os8_voc12aug_512x512_40k/model.pdparams',
                   79.47, 79.97, 80.67),
)}


def list_models():
    """The names ``create_model`` takes, sorted."""
    return sorted(MODELS)


def model_info(name):
    """The zoo's row for ``name``; an unknown name is one KeyError listing the known ones."""
    if name not in MODELS:
        raise KeyError(f"no published model '{name}'; known: {', '.join(list_models())}")
    return MODELS[name]


def create_model(name, pretrained=False):
    """The published model ``name`` (dilated ResNet_vd, output stride 8), in eval mode.

    With ``pretrained`` the released weights are downloaded once into the cache (verified against
    the server's size and MD5) and loaded strictly; offline, a DownloadError names the URL.
    Without it the weights are random (no ImageNet backbone download either).
    """
    info = model_info(name)
    backbone = manager.BACKBONES[info.backbone](output_stride=8)
    model = EMANet(num_classes=info.num_classes, backbone=backbone, align_corners=info.align_corners)
    if pretrained:
        load_weights(model, info.weights_url)
    model.eval()
    return model
