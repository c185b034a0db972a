"""The quick-start dataset: drawn street scenes (``scene_painter``) read as Cityscapes."""
from emanet.data.cityscapes import Cityscapes
from emanet.data.scene_painter import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE, make_street_scenes


class StreetScenes(Cityscapes):
    """The quick-start dataset: street scenes drawn into ``dataset_root`` on first use, read as Cityscapes.

    Args:
        transforms, dataset_root, mode, edge: as ``Cityscapes``.
        num_train, num_val, size, seed: passed to ``emanet.data.scene_painter.make_street_scenes``.
    """

    def __init__(self, transforms, dataset_root='data/street_scenes', mode='train', edge=False,
                 num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, size=DEFAULT_SIZE, seed=0):
        make_street_scenes(dataset_root, num_train=num_train, num_val=num_val, size=tuple(size), seed=seed)
        super().__init__(transforms, dataset_root, mode=mode, edge=edge)
