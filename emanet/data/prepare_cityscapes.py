"""Cityscapes' training labels: a ``*_gtFine_labelTrainIds.png`` next to each gtFine annotation.

The release labels each frame with 34 official ids; models learn the 19 evaluated classes, whose
"train ids" (0..18, 255 = ignored) the Cityscapes dataset reads::

    <root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png     official ids, mapped pixel by pixel
    <root>/gtFine/<split>/<city>/<stem>_gtFine_polygons.json    or the polygons they were drawn from
    <root>/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png  written here

Both routes use the official label table of ``cityscapesscripts`` and give the same map (the id
PNGs are drawn from the polygons in the same order), so mapping the PNGs, which is faster, is the
default. The writing helpers here are shared with ``emanet.data.prepare_voc``.
"""
import glob
import os
from typing import NamedTuple

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2labelImg import createLabelImage

from emanet.data.cityscapes import ID_TO_TRAIN_ID, LABEL_SUFFIX
from emanet.data.files import convert_all, is_up_to_date, write_png_atomically
from emanet.errors import InvalidInput

LABEL_IDS_SUFFIX = '_gtFine_labelIds.png'
POLYGONS_SUFFIX = '_gtFine_polygons.json'
SOURCES = ('auto', 'label_ids', 'polygons')
SPLITS = ('train', 'val', 'test')


class ConversionCounts(NamedTuple):
    written: int
    skipped: int  # outputs already newer than their inputs


def make_train_ids(dataset_root, splits=SPLITS, workers=None, source='auto'):
    """Write ``*_gtFine_labelTrainIds.png`` for every annotated frame of ``splits``; return the counts.

    Outputs newer than their inputs are skipped, so an interrupted run resumes where it stopped.
    Every split is checked before anything is written.

    Args:
        dataset_root (str): the folder holding ``gtFine``.
        splits (tuple): the folders of ``gtFine`` to convert.
        workers (int): processes converting in parallel; default: the CPU count, at most 4.
        source (str): 'label_ids' maps ``*_gtFine_labelIds.png``; 'polygons' renders
            ``*_gtFine_polygons.json`` with cityscapesscripts' json2labelImg; 'auto' takes the PNGs
            where a split has them and the polygons elsewhere.
    """
    if source not in SOURCES:
        raise InvalidInput(f"source should be one of {SOURCES}, but got {source!r}.")
    inputs = [path for split in splits for path in _annotations(dataset_root, split, source)]
    tasks = [(path, _train_ids_path(path)) for path in inputs]
    return ConversionCounts(*convert_all(_write_train_ids, tasks, workers, 'Cityscapes trainIds'))


def _annotations(dataset_root, split, source):
    split_dir = os.path.join(dataset_root, 'gtFine', split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f'Cityscapes label folder {split_dir} is missing.')
    label_ids = sorted(glob.glob(os.path.join(split_dir, '*', '*' + LABEL_IDS_SUFFIX)))
    polygons = sorted(glob.glob(os.path.join(split_dir, '*', '*' + POLYGONS_SUFFIX)))
    found = {'label_ids': label_ids, 'polygons': polygons, 'auto': label_ids or polygons}[source]
    if not found:
        wanted = {'label_ids': f'*{LABEL_IDS_SUFFIX}', 'polygons': f'*{POLYGONS_SUFFIX}',
                  'auto': f'*{LABEL_IDS_SUFFIX} or *{POLYGONS_SUFFIX}'}[source]
        raise FileNotFoundError(f'no {wanted} files in the city folders of {split_dir}.')
    return found


def _train_ids_path(annotation_path):
    suffix = POLYGONS_SUFFIX if annotation_path.endswith(POLYGONS_SUFFIX) else LABEL_IDS_SUFFIX
    return annotation_path[:-len(suffix)] + LABEL_SUFFIX


def _write_train_ids(task):
    annotation_path, output_path = task
    if is_up_to_date(output_path, annotation_path):
        return False
    if annotation_path.endswith(POLYGONS_SUFFIX):
        train_ids = _render_polygons(annotation_path)
    else:
        train_ids = ID_TO_TRAIN_ID[_read_label_ids(annotation_path)]
    write_png_atomically(output_path, train_ids)
    return True


def _read_label_ids(path):
    label_ids = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label_ids is None or label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise InvalidInput(f'{path} is not a single-channel 8-bit PNG of Cityscapes label ids.')
    return label_ids


def _render_polygons(path):
    annotation = Annotation()
    annotation.fromJsonFile(path)
    try:
        return np.asarray(createLabelImage(annotation, 'trainIds'))
    except SystemExit:  # cityscapesscripts ends the process on a label missing from its table
        raise InvalidInput(f'{path} has a polygon whose label is not in the Cityscapes label table.') from None
