"""make_voc12_aug turns SBD's .mat labels into VOC's trainaug set; PascalVOC reads it and never downloads."""
import os
import re

import cv2
import numpy as np
import paddleseg.datasets
import paddleseg.transforms as T
import pytest
from PIL import Image
from scipy.io import savemat

from emanet.data.prepare_voc import make_voc12_aug
from emanet.data.voc import PascalVOC

HEIGHT, WIDTH = 4, 5
VOC_TRAIN = ['2007_000032', '2007_000039']
VOC_VAL = ['2007_000033']
# SBD overlaps VOC train and val, as on the real data; 2008_000005 has no JPEG.
SBD_TRAIN = ['2007_000032', '2008_000002', '2008_000003']
SBD_VAL = ['2007_000033', '2008_000004', '2008_000005']
AUG = ['2008_000002', '2008_000003', '2008_000004']
WITHOUT_JPEG = ['2008_000005']


def class_indices(seed, boundary=False):
    """A label of classes 0..20, and with ``boundary`` VOC's ignored outline value 255 in a corner."""
    label = np.random.RandomState(seed).randint(0, 21, (HEIGHT, WIDTH)).astype(np.uint8)
    if boundary:
        label[0, 0] = 255
    return label


def voc_label(name):
    return class_indices(int(name.replace('_', '')), boundary=True)


def sbd_label(name):
    return class_indices(int(name.replace('_', '')) + 1)


def write_lines(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as out:
        out.write(''.join(name + '\n' for name in names))


def write_voc(voc_root):
    voc_dir = os.path.join(voc_root, 'VOC2012')
    for folder in ('JPEGImages', 'SegmentationClass'):
        os.makedirs(os.path.join(voc_dir, folder), exist_ok=True)
    for name in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL) - set(WITHOUT_JPEG)):
        cv2.imwrite(os.path.join(voc_dir, 'JPEGImages', name + '.jpg'), np.full((HEIGHT, WIDTH, 3), 128, np.uint8))
    for name in VOC_TRAIN + VOC_VAL:
        # VOC's own format: the palette index is the class, the palette only colours it.
        label = Image.fromarray(voc_label(name))
        label.putpalette([channel for colour in PascalVOC.PALETTE for channel in colour])
        label.save(os.path.join(voc_dir, 'SegmentationClass', name + '.png'))
    list_dir = os.path.join(voc_dir, 'ImageSets', 'Segmentation')
    write_lines(os.path.join(list_dir, 'train.txt'), VOC_TRAIN)
    write_lines(os.path.join(list_dir, 'val.txt'), VOC_VAL)
    write_lines(os.path.join(list_dir, 'trainval.txt'), VOC_TRAIN + VOC_VAL)
    return str(voc_root)


def write_sbd(sbd_root):
    dataset_dir = os.path.join(sbd_root, 'dataset')
    os.makedirs(os.path.join(dataset_dir, 'cls'))
    for name in SBD_TRAIN + SBD_VAL:
        savemat(os.path.join(dataset_dir, 'cls', name + '.mat'),
                {'GTcls': {'Segmentation': sbd_label(name), 'CategoriesPresent': np.unique(sbd_label(name))}})
    write_lines(os.path.join(dataset_dir, 'train.txt'), SBD_TRAIN)
    write_lines(os.path.join(dataset_dir, 'val.txt'), SBD_VAL)
    return str(sbd_root)


@pytest.fixture
def roots(tmp_path):
    return write_voc(tmp_path / 'VOCdevkit'), write_sbd(tmp_path / 'benchmark_RELEASE')


def aug_label_path(voc_root, name):
    return os.path.join(voc_root, 'VOC2012', 'SegmentationClassAug', name + '.png')


def aug_list_path(voc_root):
    return os.path.join(voc_root, 'VOC2012', 'ImageSets', 'Segmentation', 'aug.txt')


def read_label(path):
    with Image.open(path) as label:
        assert label.mode == 'L'
        return np.array(label)


def test_sbd_labels_are_written_as_class_index_pngs_and_voc_labels_win_where_both_exist(roots):
    voc_root, sbd_root = roots

    counts = make_voc12_aug(voc_root, sbd_root, workers=1)

    assert (counts.written, counts.skipped, counts.missing_images) == (6, 0, 1)
    for name in ['2008_000002', '2008_000003', '2008_000004']:
        assert np.array_equal(read_label(aug_label_path(voc_root, name)), sbd_label(name))
    for name in VOC_TRAIN + VOC_VAL:  # 2007_000032 and 2007_000033 are in SBD too
        assert np.array_equal(read_label(aug_label_path(voc_root, name)), voc_label(name))
    assert not os.path.exists(aug_label_path(voc_root, '2008_000005'))


def test_aug_list_holds_the_sbd_images_in_neither_voc_train_nor_voc_val(roots):
    voc_root, sbd_root = roots
    counts = make_voc12_aug(voc_root, sbd_root, workers=1)
    with open(aug_list_path(voc_root)) as aug_list:
        assert aug_list.read().split() == AUG
    assert counts.aug_names == len(AUG)


def test_workers_in_parallel_write_the_same_labels(roots):
    voc_root, sbd_root = roots
    assert make_voc12_aug(voc_root, sbd_root, workers=2).written == 6
    for name in AUG:
        assert np.array_equal(read_label(aug_label_path(voc_root, name)), sbd_label(name))


def test_a_second_run_writes_nothing(roots):
    voc_root, sbd_root = roots
    make_voc12_aug(voc_root, sbd_root, workers=1)
    outputs = [aug_list_path(voc_root)] + [aug_label_path(voc_root, name) for name in AUG + VOC_TRAIN + VOC_VAL]
    mtimes = [os.stat(path).st_mtime_ns for path in outputs]

    counts = make_voc12_aug(voc_root, sbd_root, workers=1)

    assert (counts.written, counts.skipped) == (0, 6)
    assert [os.stat(path).st_mtime_ns for path in outputs] == mtimes


def test_trainaug_reads_voc_train_then_aug_like_paddleseg(roots):
    voc_root, sbd_root = roots
    make_voc12_aug(voc_root, sbd_root, workers=1)

    dataset = PascalVOC(transforms=[T.Normalize()], dataset_root=voc_root, mode='trainaug')

    assert len(dataset) == len(VOC_TRAIN) + len(AUG)
    for mode in ('train', 'val', 'trainval', 'trainaug'):
        assert PascalVOC([T.Normalize()], voc_root, mode=mode).file_list == \
            paddleseg.datasets.PascalVOC([T.Normalize()], voc_root, mode=mode).file_list
    sample = dataset[len(VOC_TRAIN)]
    assert sample['img'].shape == (3, HEIGHT, WIDTH)
    assert np.array_equal(sample['label'], sbd_label(AUG[0]))


def test_pascal_voc_has_paddleseg_attributes_and_the_voc_class_names_and_colours(roots):
    dataset = PascalVOC([], dataset_root=roots[0], mode='val', edge=True)
    assert (dataset.num_classes, dataset.ignore_index, dataset.edge) == (21, 255, True)
    assert PascalVOC.IMG_CHANNELS == 3
    assert len(PascalVOC.CLASS_NAMES) == len(PascalVOC.PALETTE) == 21
    assert (PascalVOC.CLASS_NAMES[0], PascalVOC.CLASS_NAMES[15], PascalVOC.CLASS_NAMES[20]) == \
        ('background', 'person', 'tvmonitor')
    assert PascalVOC.PALETTE[:5] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128))
    assert (PascalVOC.PALETTE[15], PascalVOC.PALETTE[20]) == ((192, 128, 128), (0, 64, 128))


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail('PascalVOC tried to download')
    monkeypatch.setattr(paddleseg.datasets.voc, 'download_file_and_uncompress', refuse)
    monkeypatch.setattr(paddleseg.utils.download, 'download_file_and_uncompress', refuse)
    monkeypatch.setattr('requests.get', refuse)


@pytest.mark.parametrize('missing_root', [None, 'nowhere/VOCdevkit'])
def test_pascal_voc_without_its_folder_raises_and_never_downloads(tmp_path, no_downloads, missing_root):
    root = None if missing_root is None else str(tmp_path / missing_root)
    with pytest.raises(FileNotFoundError, match='never downloads.*VOC2012.*SBD.*tools/prepare_voc12aug.py') as error:
        PascalVOC([T.Normalize()], dataset_root=root)
    if root is not None:
        assert os.path.join(root, 'VOC2012') in str(error.value)
    assert not os.path.exists(tmp_path / 'nowhere')


def test_trainaug_without_aug_list_names_it_and_the_prepare_command(roots):
    with pytest.raises(FileNotFoundError) as error:
        PascalVOC([T.Normalize()], dataset_root=roots[0], mode='trainaug')
    assert aug_list_path(roots[0]) in str(error.value)
    assert 'tools/prepare_voc12aug.py' in str(error.value)


def test_missing_listed_files_are_named_and_counted_in_the_constructor(roots):
    voc_root = roots[0]
    image = os.path.join(voc_root, 'VOC2012', 'JPEGImages', VOC_TRAIN[1] + '.jpg')
    label = os.path.join(voc_root, 'VOC2012', 'SegmentationClass', VOC_TRAIN[0] + '.png')
    os.remove(image)
    os.remove(label)
    with pytest.raises(FileNotFoundError) as error:
        PascalVOC([T.Normalize()], dataset_root=voc_root, mode='train')
    assert '2 of 4 files' in str(error.value)
    assert image in str(error.value) and label in str(error.value)


def test_missing_voc_or_sbd_folders_are_named(roots, tmp_path):
    voc_root, sbd_root = roots
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), 'elsewhere', 'VOC2012'))):
        make_voc12_aug(str(tmp_path / 'elsewhere'), sbd_root)
    os.rename(os.path.join(sbd_root, 'dataset', 'cls'), os.path.join(sbd_root, 'dataset', 'cls_moved'))
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(sbd_root, 'dataset', 'cls') + ' is missing')):
        make_voc12_aug(voc_root, sbd_root)


def test_sbd_names_without_their_mat_file_are_named(roots):
    voc_root, sbd_root = roots
    missing = os.path.join(sbd_root, 'dataset', 'cls', '2008_000003.mat')
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f'1 of 6 SBD labels .* missing: {re.escape(missing)}'):
        make_voc12_aug(voc_root, sbd_root)
