"""make_train_ids writes each gtFine annotation's trainIds map by the official label table, once."""
import glob
import json
import os
import re

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label

from emanet.data.cityscapes import Cityscapes
from emanet.data.prepare_cityscapes import make_train_ids

OFFICIAL_IDS = sorted(label_id for label_id in id2label if label_id >= 0)  # 0..33
# Every official id once, and 255, an id no label has; 5 x 7 pixels.
ALL_IDS = np.array(OFFICIAL_IDS + [255], np.uint8).reshape(5, 7)
STEMS = {'train': ['aachen_000000_000019', 'aachen_000001_000019', 'bonn_000000_000019'],
         'val': ['frankfurt_000000_000294']}


def official_train_id(label_id):
    """The official table read directly: ignored classes (trainId 255 or -1) and unknown ids become 255."""
    label = id2label.get(label_id)
    return 255 if label is None or label.trainId in (-1, 255) else label.trainId


def gtfine_path(root, split, stem, suffix):
    return os.path.join(root, 'gtFine', split, stem.split('_')[0], f'{stem}_gtFine_{suffix}')


def write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, image)


def write_label_ids(root, split='train', stems=None):
    """Each frame's label ids are ALL_IDS rolled by its number, so frames differ."""
    for number, stem in enumerate(stems or STEMS[split]):
        write(gtfine_path(root, split, stem, 'labelIds.png'), np.roll(ALL_IDS, number))
    return str(root)


def write_polygons(root, split, stem, objects):
    path = gtfine_path(root, split, stem, 'polygons.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as out:
        json.dump({'imgHeight': 6, 'imgWidth': 8, 'objects': objects}, out)


# A road in the bottom half, a car above it, a license plate (id -1: never drawn) on the car and a
# deleted person.
POLYGONS = [{'label': 'road', 'polygon': [[0, 3], [7, 3], [7, 5], [0, 5]]},
            {'label': 'car', 'polygon': [[1, 0], [4, 0], [4, 2], [1, 2]]},
            {'label': 'license plate', 'polygon': [[2, 1], [3, 1], [3, 2], [2, 2]]},
            {'label': 'person', 'polygon': [[6, 0], [7, 0], [7, 1], [6, 1]], 'deleted': 1}]


def read(path):
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def train_ids_files(root):
    return sorted(glob.glob(os.path.join(root, 'gtFine', '*', '*', '*_gtFine_labelTrainIds.png')))


def test_label_ids_become_train_ids_by_the_official_table(tmp_path):
    root = write_label_ids(tmp_path)

    counts = make_train_ids(root, splits=['train'], workers=1)

    assert (counts.written, counts.skipped) == (3, 0)
    for number, stem in enumerate(STEMS['train']):
        label_ids = np.roll(ALL_IDS, number)
        train_ids = read(gtfine_path(root, 'train', stem, 'labelTrainIds.png'))
        assert train_ids.dtype == np.uint8 and train_ids.shape == label_ids.shape
        assert train_ids.tolist() == [[official_train_id(i) for i in row] for row in label_ids.tolist()]


def test_known_ids_map_to_the_expected_train_ids(tmp_path):
    root = write_label_ids(tmp_path)
    make_train_ids(root, splits=['train'], workers=1)
    train_ids = read(gtfine_path(root, 'train', STEMS['train'][0], 'labelTrainIds.png')).ravel()
    # unlabeled, ego vehicle, static, parking: ignored; road, car, bicycle: 0, 13, 18; no label: ignored.
    assert train_ids[[0, 1, 4, 9, 7, 26, 33, 34]].tolist() == [255, 255, 255, 255, 0, 13, 18, 255]


def test_workers_in_parallel_write_the_same_maps(tmp_path):
    serial, parallel = write_label_ids(tmp_path / 'serial'), write_label_ids(tmp_path / 'parallel')
    make_train_ids(serial, splits=['train'], workers=1)
    assert make_train_ids(parallel, splits=['train'], workers=2).written == 3
    assert len(train_ids_files(serial)) == len(train_ids_files(parallel))
    for serial_file, parallel_file in zip(train_ids_files(serial), train_ids_files(parallel)):
        assert np.array_equal(read(serial_file), read(parallel_file))


def test_a_split_with_only_polygons_is_rendered_with_cityscapesscripts(tmp_path):
    write_polygons(tmp_path, 'val', STEMS['val'][0], POLYGONS)

    assert make_train_ids(str(tmp_path), splits=['val'], workers=1).written == 1

    train_ids = read(gtfine_path(tmp_path, 'val', STEMS['val'][0], 'labelTrainIds.png'))
    assert train_ids.shape == (6, 8)
    assert train_ids[4, 2] == 0     # road
    assert train_ids[1, 2] == 13    # car, under the undrawn license plate
    assert train_ids[0, 6] == 255   # the deleted person is not drawn
    assert train_ids[0, 0] == 255   # unlabeled


def test_auto_maps_the_label_ids_when_both_exist_and_polygons_can_be_chosen(tmp_path):
    stem = STEMS['val'][0]
    write_label_ids(tmp_path, 'val')
    write_polygons(tmp_path, 'val', stem, POLYGONS)
    output = gtfine_path(tmp_path, 'val', stem, 'labelTrainIds.png')

    make_train_ids(str(tmp_path), splits=['val'], workers=1, source='auto')
    assert read(output).shape == ALL_IDS.shape
    os.remove(output)
    make_train_ids(str(tmp_path), splits=['val'], workers=1, source='polygons')
    assert read(output).shape == (6, 8)


def test_a_second_run_writes_nothing_and_a_changed_input_is_converted_again(tmp_path):
    root = write_label_ids(tmp_path)
    make_train_ids(root, splits=['train'], workers=1)
    mtimes = {path: os.stat(path).st_mtime_ns for path in train_ids_files(root)}

    counts = make_train_ids(root, splits=['train'], workers=1)

    assert (counts.written, counts.skipped) == (0, 3)
    assert {path: os.stat(path).st_mtime_ns for path in train_ids_files(root)} == mtimes

    changed = gtfine_path(root, 'train', STEMS['train'][1], 'labelIds.png')
    later = os.stat(changed).st_mtime + 10
    os.utime(changed, (later, later))
    assert make_train_ids(root, splits=['train'], workers=1) == (1, 2)


def test_an_interrupted_write_leaves_neither_the_output_nor_a_partial_file(tmp_path, monkeypatch):
    root = write_label_ids(tmp_path, stems=STEMS['train'][:1])

    def interrupt(source, destination):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, 'replace', interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_train_ids(root, splits=['train'], workers=1)
    monkeypatch.undo()

    assert os.listdir(os.path.join(root, 'gtFine', 'train', 'aachen')) == ['aachen_000000_000019_gtFine_labelIds.png']


def test_the_written_labels_are_read_by_the_cityscapes_dataset(tmp_path):
    root = write_label_ids(tmp_path)
    for stem in STEMS['train']:
        write(os.path.join(root, 'leftImg8bit', 'train', stem.split('_')[0], stem + '_leftImg8bit.png'),
              np.zeros((5, 7, 3), np.uint8))
    make_train_ids(root, splits=['train'], workers=1)

    dataset = Cityscapes(transforms=[], dataset_root=root, mode='train')

    assert len(dataset) == 3
    expected = [[official_train_id(i) for i in row] for row in ALL_IDS.tolist()]
    assert dataset[0]['label'].tolist() == expected


def test_a_missing_split_folder_is_named_before_anything_is_written(tmp_path):
    root = write_label_ids(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join('gtFine', 'test') + ' is missing')):
        make_train_ids(root, splits=['train', 'test'], workers=1)
    assert train_ids_files(root) == []


def test_a_split_with_nothing_to_convert_is_named(tmp_path):
    os.makedirs(tmp_path / 'gtFine' / 'val' / 'frankfurt')
    with pytest.raises(FileNotFoundError, match=r'no \*_gtFine_labelIds.png or \*_gtFine_polygons.json files'):
        make_train_ids(str(tmp_path), splits=['val'], workers=1)
    write_label_ids(tmp_path, 'val')
    with pytest.raises(FileNotFoundError, match=r'no \*_gtFine_polygons.json files .*gtFine/val'):
        make_train_ids(str(tmp_path), splits=['val'], workers=1, source='polygons')


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'pngs'"):
        make_train_ids(str(tmp_path), source='pngs')
