"""Cityscapes with each image paired to its label by file name, never by position."""
import glob
import os

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from cityscapesscripts.helpers.labels import trainId2label
from emanet.data.dataset import NamedDataset
from emanet.data.files import list_some

IMAGE_SUFFIX = '_leftImg8bit.png'
LABEL_SUFFIX = '_gtFine_labelTrainIds.png'


def _label_tables():
    """(official id -> trainId, 255 where ignored; trainId -> official id) as 256-entry lookup arrays."""
    id_to_train_id = np.full(256, 255, np.uint8)
    train_id_to_id = np.zeros(256, np.uint8)
    for label in CITYSCAPES_LABELS:
        if label.id >= 0:  # the license plate, id -1, never appears in label images
            id_to_train_id[label.id] = label.trainId
    for train_id in range(19):
        train_id_to_id[train_id] = trainId2label[train_id].id
    return id_to_train_id, train_id_to_id


# For reading official *_labelIds.png, and for writing files the evaluator and server read.
ID_TO_TRAIN_ID, TRAIN_ID_TO_ID = _label_tables()


class Cityscapes(NamedDataset):
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
    MODES = ('train', 'val', 'test')
    CLASS_NAMES = tuple(trainId2label[train_id].name for train_id in range(NUM_CLASSES))
    # The official colour of each class, RGB, in trainId order.
    PALETTE = tuple(trainId2label[train_id].color for train_id in range(NUM_CLASSES))
    # The official label id of each train id (256 entries): what the evaluation server reads.
    LABEL_IDS = TRAIN_ID_TO_ID

    @staticmethod
    def list_files(dataset_root, mode):
        return pair_images_with_labels(dataset_root, mode, labels_required=mode != 'test')


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
            problems = [f'no label for {image} (expected {label_of[image]})' for image in unlabelled]
            raise FileNotFoundError(f'{len(unlabelled)} of {len(images)} images in {image_dir} have no label: '
                                    f'{list_some(problems)}.')
        orphans = sorted(labels - set(label_of.values()))
        if orphans:
            problems = [f'no image for {label} '
                        f'(expected {_counterpart(label, label_dir, LABEL_SUFFIX, image_dir, IMAGE_SUFFIX)})'
                        for label in orphans]
            raise FileNotFoundError(f'{len(orphans)} labels in {label_dir} have no image: {list_some(problems)}.')
    return [[image, label_of[image] if label_of[image] in labels else None] for image in images]


def _counterpart(path, folder, suffix, other_folder, other_suffix):
    """The path of the file in ``other_folder`` with the same city and stem as ``path``."""
    city, name = os.path.split(os.path.relpath(path, folder))
    return os.path.join(other_folder, city, name[:-len(suffix)] + other_suffix)
