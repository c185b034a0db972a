"""Put this package's components into PaddleSeg's registries, replacing entries of the same name."""
from paddleseg.cvlibs import manager


def register(registry, component):
    """Register ``component`` under its class name, silently replacing PaddleSeg's own."""
    registry.components_dict[component.__name__] = component
    return component


def register_all():
    from emanet.data.cityscapes import Cityscapes
    from emanet.data.dataset import Dataset
    from emanet.data.synthetic import StreetScenes
    from emanet.data.voc import PascalVOC
    from emanet.engine.losses import CrossEntropyLoss, OhemCrossEntropyLoss
    from emanet.models import EMANet
    register(manager.MODELS, EMANet)
    register(manager.LOSSES, CrossEntropyLoss)
    register(manager.LOSSES, OhemCrossEntropyLoss)
    register(manager.DATASETS, Dataset)
    register(manager.DATASETS, Cityscapes)
    register(manager.DATASETS, StreetScenes)
    register(manager.DATASETS, PascalVOC)
