"""Cityscapes with each image paired to its label by file name, never by position."""
import glob
import os

import numpy as np
from cityscapesscripts.helpers.labels import trainId2label
from paddleseg.datasets import Dataset
from paddleseg.transforms import Compose

from emanet.data.synthetic import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE, make_street_scenes

IMAGE_SUFFIX = '_leftImg8bit.png'
LABEL_SUFFIX = '_gtFine_labelTrainIds.png'
MODES = ('train', 'val', 'test')
# trainId -> official label id, for files the Cityscapes evaluator and server read.
TRAIN_ID_TO_ID = np.zeros(256, np.uint8)
for _train_id in range(19):
    TRAIN_ID_TO_ID[_train_id] = trainId2label[_train_id].id
# How many unpaired files an error message names before it only counts the rest.
MAX_LISTED = 5


class Cityscapes(Dataset):
    """Cityscapes (https://www.cityscapes-dataset.com), a drop-in for ``paddleseg.datasets.Cityscapes``.

    Same constructor, attributes and ``file_list`` as PaddleSeg 2.8.0's, but PaddleSeg zips two
    sorted file lists, so one missing label silently shifts every later pair. Here each
    ``leftImg8bit/<mode>/<city>/<stem>_leftImg8bit.png`` is paired with
    ``gtFine/<mode>/<city>/<stem>_gtFine_labelTrainIds.png``, and a missing folder, an image without
    its label, a label without its image or an empty split raises one error naming the files,
    here in the constructor rather than hours into training. In 'test' mode labels are optional:
    an image without one is listed with ``None``.

    Args:
        transforms (list): transforms of the image (and label).
        dataset_root (str): the folder holding ``leftImg8bit`` and ``gtFine``.
        mode (str): 'train', 'val' or 'test'.
        edge (bool): also compute the label's edge map while training.
    """
    NUM_CLASSES = 19
    IGNORE_INDEX = 255
    IMG_CHANNELS = 3
    CLASS_NAMES = tuple(trainId2label[train_id].name for train_id in range(NUM_CLASSES))
    # The official colour of each class, RGB, in trainId order.
    PALETTE = tuple(trainId2label[train_id].color for train_id in range(NUM_CLASSES))

    def __init__(self, transforms, dataset_root, mode='train', edge=False):
        self.dataset_root = dataset_root
        self.transforms = Compose(transforms)
        self.mode = mode.lower()
        self.num_classes = self.NUM_CLASSES
        self.ignore_index = self.IGNORE_INDEX
        self.edge = edge
        if self.mode not in MODES:
            raise ValueError(f"mode should be 'train', 'val' or 'test', but got {mode!r}.")
        self.file_list = pair_images_with_labels(dataset_root, self.mode, labels_required=self.mode != 'test')


def pair_images_with_labels(dataset_root, mode, labels_required=True):
    """[[image path, label path], ...] of one Cityscapes split, sorted by image path.

    Without ``labels_required``, images without a label get ``None`` and labels without an image
    are ignored.
    """
    if dataset_root is None or not os.path.isdir(dataset_root):
        raise FileNotFoundError(f'Cityscapes dataset_root {dataset_root} is not a folder.')
    image_dir = os.path.join(dataset_root, 'leftImg8bit', mode)
    label_dir = os.path.join(dataset_root, 'gtFine', mode)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f'Cityscapes image folder {image_dir} is missing.')
    if labels_required and not os.path.isdir(label_dir):
        raise FileNotFoundError(f'Cityscapes label folder {label_dir} is missing.')

    images = sorted(glob.glob(os.path.join(image_dir, '*', '*' + IMAGE_SUFFIX)))
    if not images:
        raise FileNotFoundError(f'no *{IMAGE_SUFFIX} images in the city folders of {image_dir}.')
    labels = set(glob.glob(os.path.join(label_dir, '*', '*' + LABEL_SUFFIX)))
    label_of = {image: _counterpart(image, image_dir, IMAGE_SUFFIX, label_dir, LABEL_SUFFIX)
                for image in images}

    if labels_required:
        unlabelled = [image for image in images if label_of[image] not in labels]
        if unlabelled:
            raise FileNotFoundError(_list_unpaired(
                f'{len(unlabelled)} of {len(images)} images in {image_dir} have no label',
                [f'no label for {image} (expected {label_of[image]})' for image in unlabelled]))
        orphans = sorted(labels - set(label_of.values()))
        if orphans:
            raise FileNotFoundError(_list_unpaired(
                f'{len(orphans)} labels in {label_dir} have no image',
                [f'no image for {label} '
                 f'(expected {_counterpart(label, label_dir, LABEL_SUFFIX, image_dir, IMAGE_SUFFIX)})'
                 for label in orphans]))
    return [[image, label_of[image] if label_of[image] in labels else None] for image in images]


def _counterpart(path, folder, suffix, other_folder, other_suffix):
    """The path of the file in ``other_folder`` with the same city and stem as ``path``."""
    city, name = os.path.split(os.path.relpath(path, folder))
    return os.path.join(other_folder, city, name[:-len(suffix)] + other_suffix)


def _list_unpaired(summary, problems):
    listed = '; '.join(problems[:MAX_LISTED])
    more = f'; and {len(problems) - MAX_LISTED} more' if len(problems) > MAX_LISTED else ''
    return f'{summary}: {listed}{more}.'


class StreetScenes(Cityscapes):
    """The quick-start dataset: street scenes drawn into ``dataset_root`` on first use, read as Cityscapes.

    Args:
        transforms, dataset_root, mode, edge: as ``Cityscapes``.
        num_train, num_val, size, seed: passed to ``emanet.data.synthetic.make_street_scenes``.
    """

    def __init__(self, transforms, dataset_root='data/street_scenes', mode='train', edge=False,
                 num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, size=DEFAULT_SIZE, seed=0):
        make_street_scenes(dataset_root, num_train=num_train, num_val=num_val, size=tuple(size), seed=seed)
        super().__init__(transforms, dataset_root, mode=mode, edge=edge)
