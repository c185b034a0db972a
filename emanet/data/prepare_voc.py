"""Pascal VOC 2012 "aug": VOC's 1464 training images plus 9118 more labelled by SBD, 10582 in all.

VOC 2012 labels only 2913 images for segmentation; the Semantic Boundaries Dataset (SBD, Hariharan
et al. 2011) labels 11355 VOC images with the same 21 classes. PaddleSeg's ``PascalVOC(mode='trainaug')``
(and ``emanet.data.voc.PascalVOC``) read::

    <voc_root>/VOC2012/ImageSets/Segmentation/train.txt    with labels in VOC2012/SegmentationClass
    <voc_root>/VOC2012/ImageSets/Segmentation/aug.txt      with labels in VOC2012/SegmentationClassAug

and ``make_voc12_aug`` writes the last two from the SBD release::

    <sbd_root>/dataset/cls/<name>.mat     a struct GTcls whose Segmentation holds the class indices
    <sbd_root>/dataset/train.txt, val.txt
"""
import glob
import os
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.io import loadmat

from emanet.data.files import convert_all, is_up_to_date, require_files, write_png_atomically
from emanet.errors import InvalidInput
from emanet.logger import logger

VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
SBD_URL = 'http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz'
PREPARE_COMMAND = 'python tools/prepare_voc12aug.py --voc_root <VOCdevkit> --sbd_root <benchmark_RELEASE>'
HOW_TO_PREPARE = f'download VOC2012 ({VOC_URL}) and SBD ({SBD_URL}), unpack them and run {PREPARE_COMMAND}'


class Voc12AugCounts(NamedTuple):
    written: int
    skipped: int  # labels already newer than their source
    missing_images: int  # labelled names without a JPEG, left out
    aug_names: int  # lines of aug.txt


def make_voc12_aug(voc_root, sbd_root, workers=None):
    """Write ``VOC2012/SegmentationClassAug/<name>.png`` and ``VOC2012/ImageSets/Segmentation/aug.txt``.

    SegmentationClassAug gets a single-channel PNG of class indices (255: VOC's object boundaries,
    ignored) for every image labelled by SBD or VOC, like the widely shared folder of 12031 labels.
    Where VOC has its own label it is copied rather than SBD's, because VOC's outlines are finer.
    aug.txt lists the SBD images (train and val) that are in neither VOC train (already read from
    train.txt) nor VOC val (which must stay unseen for evaluation): 9118 on the full data.

    Labels newer than their source are skipped, and aug.txt is rewritten only if it changes, so an
    interrupted run resumes where it stopped. Names without a JPEG in VOC2012/JPEGImages are left
    out with a warning and counted.

    Args:
        voc_root (str): the VOCdevkit folder, holding VOC2012.
        sbd_root (str): the SBD release folder (benchmark_RELEASE), holding dataset/cls.
        workers (int): processes converting in parallel; default: the CPU count, at most 4.
    """
    voc_dir = os.path.join(voc_root, 'VOC2012')
    image_dir = os.path.join(voc_dir, 'JPEGImages')
    voc_label_dir = os.path.join(voc_dir, 'SegmentationClass')
    list_dir = os.path.join(voc_dir, 'ImageSets', 'Segmentation')
    sbd_dir = os.path.join(sbd_root, 'dataset')
    sbd_label_dir = os.path.join(sbd_dir, 'cls')
    for folders, release in (((voc_dir, image_dir, voc_label_dir, list_dir), f'VOC2012 ({VOC_URL})'),
                             ((sbd_dir, sbd_label_dir), f'SBD ({SBD_URL})')):
        for folder in folders:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f'folder {folder} is missing; it comes with {release}.')
    voc_train = read_names(os.path.join(list_dir, 'train.txt'))
    voc_val = read_names(os.path.join(list_dir, 'val.txt'))
    sbd_names = sorted(set(read_names(os.path.join(sbd_dir, 'train.txt')))
                       | set(read_names(os.path.join(sbd_dir, 'val.txt'))))
    require_files([os.path.join(sbd_label_dir, name + '.mat') for name in sbd_names],
                  f'SBD labels listed in {sbd_dir}/train.txt or val.txt')

    voc_labelled = {os.path.basename(path)[:-len('.png')]
                    for path in glob.glob(os.path.join(voc_label_dir, '*.png'))}
    labelled = sorted(voc_labelled.union(sbd_names))
    with_image = {name for name in labelled if os.path.isfile(os.path.join(image_dir, name + '.jpg'))}
    missing_images = len(labelled) - len(with_image)
    if missing_images:
        logger.warning(f'{missing_images} of {len(labelled)} labelled names have no JPEG in {image_dir}; '
                       f'they are left out.')

    aug_label_dir = os.path.join(voc_dir, 'SegmentationClassAug')
    os.makedirs(aug_label_dir, exist_ok=True)
    tasks = [(os.path.join(voc_label_dir, name + '.png') if name in voc_labelled
              else os.path.join(sbd_label_dir, name + '.mat'),
              os.path.join(aug_label_dir, name + '.png'))
             for name in labelled if name in with_image]
    written, skipped = convert_all(_write_class_indices, tasks, workers, 'VOC12 aug labels')

    excluded = set(voc_train) | set(voc_val)
    aug_names = [name for name in sbd_names if name in with_image and name not in excluded]
    _write_text_if_changed(os.path.join(list_dir, 'aug.txt'), ''.join(name + '\n' for name in aug_names))
    return Voc12AugCounts(written, skipped, missing_images, len(aug_names))


def read_names(list_path):
    """The image names of a VOC or SBD list file, one a line."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f'list file {list_path} is missing.')
    with open(list_path) as names:
        return [line.strip() for line in names if line.strip()]


def _write_class_indices(task):
    source_path, output_path = task
    if is_up_to_date(output_path, source_path):
        return False
    if source_path.endswith('.mat'):
        class_indices = _read_sbd_segmentation(source_path)
    else:
        class_indices = _read_voc_segmentation(source_path)
    write_png_atomically(output_path, class_indices)
    return True


def _read_sbd_segmentation(path):
    ground_truth = loadmat(path, squeeze_me=True, struct_as_record=False).get('GTcls')
    if not hasattr(ground_truth, 'Segmentation'):
        raise InvalidInput(f'{path} has no GTcls.Segmentation: it is not an SBD dataset/cls file.')
    return np.asarray(ground_truth.Segmentation, np.uint8)


def _read_voc_segmentation(path):
    with Image.open(path) as label:
        # In VOC's paletted PNGs the palette index is the class; the colours are only for viewing.
        if label.mode not in ('P', 'L'):
            raise InvalidInput(f'{path} is a {label.mode} image, not a paletted PNG of class indices.')
        return np.array(label)


def _write_text_if_changed(path, text):
    if os.path.isfile(path):
        with open(path) as existing:
            if existing.read() == text:
                return
    with open(path + '.part', 'w') as partial:
        partial.write(text)
    os.replace(path + '.part', path)
