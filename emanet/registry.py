"""Put this package's components into PaddleSeg's registries (``paddleseg.cvlibs.manager``).

The model and five other components take the place of PaddleSeg 2.8.0's of the same name: the
model is this package's EMANet, the others are what makes PaddleSeg YAML configs work on Paddle 3. PaddleSeg's own stay reachable: in a config as
``type: PaddleSeg<Name>`` (e.g. ``PaddleSegCityscapes``), in Python as ``paddleseg_original(name)``.
"""
from paddleseg.cvlibs import manager

from emanet.logger import logger

# What each replacement brings (the README's "How this EMANet differs" has the details).
REPLACEMENT_REASONS = {
    'EMANet': "this package's model; PaddleSeg's checkpoints load into it key for key",
    'CrossEntropyLoss': "PaddleSeg 2.8.0's fails on Paddle 3 (float32 logits against int64 labels)",
    'OhemCrossEntropyLoss': "PaddleSeg 2.8.0's fails on Paddle 3 (float32 logits against int64 labels)",
    'Dataset': 'checks up front that every listed file exists',
    'Cityscapes': "pairs images and labels by file name (PaddleSeg's zips two sorted lists), never downloads",
    'PascalVOC': 'checks its files, never downloads',
}
ORIGINAL_PREFIX = 'PaddleSeg'
_originals = {}


def register(registry, component):
    """Register ``component`` under its class name; PaddleSeg's entry of that name moves to 'PaddleSeg<Name>'."""
    name = component.__name__
    existing = registry.components_dict.get(name)
    if existing is not None and existing is not component and name not in _originals:
        _originals[name] = existing
        registry.components_dict[ORIGINAL_PREFIX + name] = existing
    registry.components_dict[name] = component
    return component


def paddleseg_original(name):
    """PaddleSeg's own component that ``import emanet`` replaced, e.g. ``paddleseg_original('Cityscapes')``."""
    if name not in _originals:
        raise KeyError(f"emanet replaced no PaddleSeg component named '{name}'; "
                       f"it replaced {', '.join(sorted(_originals))}")
    return _originals[name]


def replacement_notice():
    """One line naming the PaddleSeg components this package replaced and how to reach them."""
    return (f"emanet replaces PaddleSeg's {', '.join(_originals)} in PaddleSeg's registries (Paddle 3 fixes, "
            f"file checks; see emanet.registry.REPLACEMENT_REASONS); PaddleSeg's own remain as "
            f"type: {ORIGINAL_PREFIX}<Name>")


def register_all():
    from emanet.data.cityscapes import Cityscapes
    from emanet.data.dataset import Dataset
    from emanet.data.street_scenes import StreetScenes
    from emanet.data.voc import PascalVOC
    from emanet.models.losses import CrossEntropyLoss, OhemCrossEntropyLoss
    from emanet.models import EMANet
    register(manager.MODELS, EMANet)
    register(manager.LOSSES, CrossEntropyLoss)
    register(manager.LOSSES, OhemCrossEntropyLoss)
    register(manager.DATASETS, Dataset)
    register(manager.DATASETS, Cityscapes)
    register(manager.DATASETS, StreetScenes)
    register(manager.DATASETS, PascalVOC)
    logger.info("%s", replacement_notice())
