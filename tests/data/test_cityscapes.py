"""The Cityscapes dataset pairs each image with the label of the same name, or refuses to start."""
import os
import re
import shutil

import cv2
import numpy as np
import pytest

from emanet.data.cityscapes import Cityscapes

# A stem that sorts before 'bonn_000000_000019' among images ('_h' < '_l') but after it among
# labels ('_g' < '_h'): zipping the two sorted lists would pair each image with the other's label.
STEMS = ['aachen_000000_000019', 'aachen_000001_000019', 'bonn_000000_000019', 'bonn_000000_000019_hdr']


def image_path(root, mode, stem):
    return os.path.join(root, 'leftImg8bit', mode, stem.split('_')[0], stem + '_leftImg8bit.png')


def label_path(root, mode, stem):
    return os.path.join(root, 'gtFine', mode, stem.split('_')[0], stem + '_gtFine_labelTrainIds.png')


def write_split(root, mode='train', stems=STEMS, without_label=(), without_image=()):
    """Image number k is filled with the value k and so is its label, so a pair shows if it matches."""
    for number, stem in enumerate(stems):
        for path, pixels, missing in (
                (image_path(root, mode, stem), np.full((4, 6, 3), number, np.uint8), without_image),
                (label_path(root, mode, stem), np.full((4, 6), number, np.uint8), without_label)):
            if stem not in missing:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                cv2.imwrite(path, pixels)
    return str(root)


def test_pairs_each_image_with_the_label_of_the_same_name(tmp_path):
    root = write_split(tmp_path)
    images_sorted = sorted(image_path(root, 'train', stem) for stem in STEMS)
    labels_sorted = sorted(label_path(root, 'train', stem) for stem in STEMS)
    assert [os.path.basename(p)[:-len('_leftImg8bit.png')] for p in images_sorted] != \
        [os.path.basename(p)[:-len('_gtFine_labelTrainIds.png')] for p in labels_sorted]

    dataset = Cityscapes(transforms=[], dataset_root=root, mode='train')

    assert dataset.file_list == [[image_path(root, 'train', stem), label_path(root, 'train', stem)]
                                 for stem in sorted(STEMS, key=lambda stem: image_path(root, 'train', stem))]
    assert len(dataset) == len(STEMS)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample['img'].shape == (3, 4, 6)
        assert (sample['label'] == sample['img'][0, 0, 0]).all()


def test_has_paddleseg_cityscapes_attributes_and_official_class_names_and_colours(tmp_path):
    dataset = Cityscapes(transforms=[], dataset_root=write_split(tmp_path), mode='train', edge=True)
    assert (dataset.num_classes, dataset.ignore_index, dataset.edge) == (19, 255, True)
    assert Cityscapes.IMG_CHANNELS == 3
    assert len(Cityscapes.CLASS_NAMES) == len(Cityscapes.PALETTE) == 19
    assert Cityscapes.CLASS_NAMES[:3] == ('road', 'sidewalk', 'building')
    assert Cityscapes.CLASS_NAMES[-1] == 'bicycle'
    assert Cityscapes.PALETTE[0] == (128, 64, 128)
    assert Cityscapes.PALETTE[13] == (0, 0, 142)


def test_an_image_without_its_label_is_named_in_the_error_and_nothing_is_shifted(tmp_path):
    root = write_split(tmp_path, without_label=['aachen_000001_000019'])
    with pytest.raises(FileNotFoundError) as error:
        Cityscapes(transforms=[], dataset_root=root, mode='train')
    message = str(error.value)
    assert '1 of 4 images' in message
    assert (f"no label for {image_path(root, 'train', 'aachen_000001_000019')} "
            f"(expected {label_path(root, 'train', 'aachen_000001_000019')})") in message


def test_an_extra_image_without_a_label_is_named_in_the_error(tmp_path):
    stems = STEMS + ['zurich_000000_000019']
    root = write_split(tmp_path, stems=stems, without_label=['zurich_000000_000019'])
    with pytest.raises(FileNotFoundError, match='zurich_000000_000019_leftImg8bit.png'):
        Cityscapes(transforms=[], dataset_root=root, mode='train')


def test_many_unlabelled_images_are_counted_and_the_first_five_named(tmp_path):
    stems = [f'aachen_{number:06d}_000019' for number in range(8)]
    root = write_split(tmp_path, stems=stems, without_label=stems[1:])
    with pytest.raises(FileNotFoundError) as error:
        Cityscapes(transforms=[], dataset_root=root, mode='train')
    message = str(error.value)
    assert '7 of 8 images' in message
    assert message.count('no label for') == 5
    assert 'and 2 more' in message


def test_a_label_without_its_image_is_named_in_the_error(tmp_path):
    root = write_split(tmp_path, mode='val', without_image=['bonn_000000_000019'])
    with pytest.raises(FileNotFoundError) as error:
        Cityscapes(transforms=[], dataset_root=root, mode='val')
    assert f"no image for {label_path(root, 'val', 'bonn_000000_000019')}" in str(error.value)


def test_test_mode_needs_no_labels(tmp_path):
    root = write_split(tmp_path, mode='test', without_label=STEMS)
    assert not os.path.exists(os.path.join(root, 'gtFine'))
    dataset = Cityscapes(transforms=[], dataset_root=root, mode='test')
    assert [label for _, label in dataset.file_list] == [None] * len(STEMS)


def test_test_mode_pairs_the_labels_it_finds(tmp_path):
    root = write_split(tmp_path, mode='test', without_label=['aachen_000000_000019'])
    dataset = Cityscapes(transforms=[], dataset_root=root, mode='test')
    assert dict(dataset.file_list)[image_path(root, 'test', 'aachen_000000_000019')] is None
    assert dict(dataset.file_list)[image_path(root, 'test', 'bonn_000000_000019')] == \
        label_path(root, 'test', 'bonn_000000_000019')


def test_a_missing_root_is_named_in_the_error(tmp_path):
    missing = str(tmp_path / 'no_such_cityscapes')
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        Cityscapes(transforms=[], dataset_root=missing)


@pytest.mark.parametrize('folder', ['leftImg8bit', 'gtFine'])
def test_a_missing_split_folder_is_named_in_the_error(tmp_path, folder):
    root = write_split(tmp_path, mode='val')
    shutil.rmtree(os.path.join(root, folder, 'val'))
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(root, folder, 'val'))):
        Cityscapes(transforms=[], dataset_root=root, mode='val')


def test_a_split_without_images_is_an_error(tmp_path):
    os.makedirs(tmp_path / 'leftImg8bit' / 'train' / 'aachen')
    os.makedirs(tmp_path / 'gtFine' / 'train')
    with pytest.raises(FileNotFoundError, match='no \\*_leftImg8bit.png images'):
        Cityscapes(transforms=[], dataset_root=str(tmp_path), mode='train')


def test_an_unknown_mode_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'trainval'"):
        Cityscapes(transforms=[], dataset_root=write_split(tmp_path), mode='trainval')
