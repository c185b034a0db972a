"""Pascal VOC 2012 that checks its files in the constructor and never downloads."""
import os

from emanet.data.dataset import NamedDataset
from emanet.data.prepare_voc import HOW_TO_PREPARE, PREPARE_COMMAND, read_names, require_files

# The list files of each mode, and the folder holding the labels of each list.
LISTS_OF_MODE = {
    'train': (('train.txt', 'SegmentationClass'),),
    'val': (('val.txt', 'SegmentationClass'),),
    'trainval': (('trainval.txt', 'SegmentationClass'),),
    'trainaug': (('train.txt', 'SegmentationClass'), ('aug.txt', 'SegmentationClassAug')),
}


def voc_colour_map(num_classes):
    """The VOC colours, RGB: the bits of the class index spread over the channels' high bits (VOClabelcolormap.m)."""
    colours = []
    for index in range(num_classes):
        red = green = blue = 0
        for bit in range(7, -1, -1):
            red |= (index & 1) << bit
            green |= (index >> 1 & 1) << bit
            blue |= (index >> 2 & 1) << bit
            index >>= 3
        colours.append((red, green, blue))
    return tuple(colours)


class PascalVOC(NamedDataset):
    """Pascal VOC 2012 (http://host.robots.ox.ac.uk/pascal/VOC/), a drop-in for ``paddleseg.datasets.PascalVOC``.

    Same constructor, attributes, modes and ``file_list`` as PaddleSeg 2.8.0's, but PaddleSeg
    downloads VOC2012 (2 GB, and without SBD, so 'trainaug' fails afterwards anyway) when
    ``dataset_root`` is None or missing, and finds a missing image only when it reads it. Here a
    missing folder, list file, image or label raises one error naming it in the constructor.
    'trainaug' needs ``VOC2012/ImageSets/Segmentation/aug.txt`` and ``VOC2012/SegmentationClassAug``,
    written by ``tools/prepare_voc12aug.py``.

    Args:
        transforms (list): transforms of the image (and label).
        dataset_root (str): the VOCdevkit folder, holding ``VOC2012``.
        mode (str): 'train', 'val', 'trainval' or 'trainaug' (train plus the SBD images, 10582 in all).
        edge (bool): also compute the label's edge map while training.
    """
    NUM_CLASSES = 21
    MODES = tuple(LISTS_OF_MODE)
    CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
                   'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
                   'sheep', 'sofa', 'train', 'tvmonitor')
    PALETTE = voc_colour_map(NUM_CLASSES)

    @staticmethod
    def list_files(dataset_root, mode):
        return list_voc_files(dataset_root, mode)


def list_voc_files(dataset_root, mode):
    """[[image path, label path], ...] of one VOC mode, in the order of its list files."""
    voc_dir = os.path.join(dataset_root, 'VOC2012') if dataset_root is not None else None
    if voc_dir is None or not os.path.isdir(voc_dir):
        where = 'dataset_root is not set' if voc_dir is None else f'Pascal VOC folder {voc_dir} is missing'
        raise FileNotFoundError(f'{where}; this dataset never downloads: {HOW_TO_PREPARE}.')
    list_dir = os.path.join(voc_dir, 'ImageSets', 'Segmentation')
    aug_list = os.path.join(list_dir, 'aug.txt')
    if mode == 'trainaug' and not os.path.isfile(aug_list):
        raise FileNotFoundError(f"mode 'trainaug' needs {aug_list}, which is missing: "
                                f"download SBD and run {PREPARE_COMMAND}.")

    file_list = [[os.path.join(voc_dir, 'JPEGImages', name + '.jpg'),
                  os.path.join(voc_dir, label_folder, name + '.png')]
                 for list_name, label_folder in LISTS_OF_MODE[mode]
                 for name in read_names(os.path.join(list_dir, list_name))]
    require_files([path for pair in file_list for path in pair],
                  f"files listed for mode '{mode}' under {voc_dir}")
    return file_list
