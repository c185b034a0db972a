"""Which class a config's ``type:`` name builds: PaddleSeg's registries, and this package's scope over them.

``import emanet`` changes one entry of PaddleSeg's registries (``paddleseg.cvlibs.manager``): ``EMANet``
is this package's model, so ``type: EMANet`` builds it in any PaddleSeg builder.

This package's builder (``emanet.config.Builder``, which its tools use) looks a name up here first
(``component``): its own EMANet, CrossEntropyLoss, OhemCrossEntropyLoss, Dataset, Cityscapes, PascalVOC
(what makes PaddleSeg YAML configs work on Paddle 3) and StreetScenes (the quick start's dataset), then in
PaddleSeg's registries. PaddleSeg's own stay reachable: in a config as ``type: PaddleSeg<Name>``
(e.g. ``PaddleSegCityscapes``), in Python as ``paddleseg_original(name)``. PaddleSeg's builders are
left as they are.
"""
import importlib

from paddleseg.cvlibs import manager

from emanet.logger import logger

# What each of this package's components brings in place of PaddleSeg's (docs/paddleseg-differences.md has
# the details).
REPLACEMENT_REASONS = {
    'EMANet': "this package's model; PaddleSeg's checkpoints load into it key for key",
    'CrossEntropyLoss': "PaddleSeg 2.8.0's fails on Paddle 3 (float32 logits against int64 labels)",
    'OhemCrossEntropyLoss': "PaddleSeg 2.8.0's fails on Paddle 3 (float32 logits against int64 labels)",
    'Dataset': 'checks up front that every listed file exists',
    'Cityscapes': "pairs images and labels by file name (PaddleSeg's zips two sorted lists), never downloads",
    'PascalVOC': 'checks its files, never downloads',
}
# The module of each of this package's components, imported when a config first names it
# (StreetScenes brings the quick start's scene painter).
OUR_COMPONENTS = {
    'EMANet': 'emanet.models',
    'CrossEntropyLoss': 'emanet.models.losses',
    'OhemCrossEntropyLoss': 'emanet.models.losses',
    'Dataset': 'emanet.data.dataset',
    'Cityscapes': 'emanet.data.cityscapes',
    'PascalVOC': 'emanet.data.voc',
    'StreetScenes': 'emanet.data.street_scenes',
}
ORIGINAL_PREFIX = 'PaddleSeg'
PADDLESEG_REGISTRIES = (manager.MODELS, manager.BACKBONES, manager.DATASETS, manager.TRANSFORMS, manager.LOSSES,
                        manager.OPTIMIZERS)


def _paddleseg_entry(name):
    return next((registry.components_dict[name] for registry in PADDLESEG_REGISTRIES
                 if name in registry.components_dict), None)


# PaddleSeg's components of the replaced names, as ``import paddleseg`` registered them.
_originals = {name: _paddleseg_entry(name) for name in REPLACEMENT_REASONS}


def register_model():
    """Put this package's EMANet into PaddleSeg's model registry in place of PaddleSeg's (``import emanet`` does)."""
    from emanet.models import EMANet
    manager.MODELS.components_dict['EMANet'] = EMANet


def paddleseg_original(name):
    """PaddleSeg's own component of a name this package replaces, e.g. ``paddleseg_original('Cityscapes')``."""
    if name not in _originals:
        raise KeyError(f"emanet replaces no PaddleSeg component named '{name}'; "
                       f"it replaces {', '.join(sorted(_originals))}")
    return _originals[name]


def component(name):
    """The class ``type: name`` builds in this package's builder when it is not PaddleSeg's registries' to say:
    one of this package's components, PaddleSeg's own for 'PaddleSeg<Name>', else None."""
    if name in OUR_COMPONENTS:
        return getattr(importlib.import_module(OUR_COMPONENTS[name]), name)
    if name.startswith(ORIGINAL_PREFIX) and name[len(ORIGINAL_PREFIX):] in _originals:
        return _originals[name[len(ORIGINAL_PREFIX):]]
    return None


def names():
    """The names ``component`` resolves, for messages that suggest the closest one."""
    return [*OUR_COMPONENTS, *(ORIGINAL_PREFIX + name for name in _originals)]


def replacement_notice():
    """One line naming the PaddleSeg components this package's builder replaces and how to reach them."""
    return (f"emanet's builder and tools use its own {', '.join(REPLACEMENT_REASONS)} instead of PaddleSeg's "
            f"(Paddle 3 fixes, file checks; see emanet.registry.REPLACEMENT_REASONS); PaddleSeg's own remain as "
            f"type: {ORIGINAL_PREFIX}<Name>")


_notice_logged = False


def log_replacement_notice_once():
    """Log ``replacement_notice`` the first time this process builds through this package's scope."""
    global _notice_logged
    if not _notice_logged:
        _notice_logged = True
        logger.info("%s", replacement_notice())
