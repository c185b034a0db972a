"""The image loop writes results only inside its save folder, whatever a list file names."""
import os

import cv2
import numpy as np
import pytest

from emanet.engine.predict import output_names, predict_images
from emanet.errors import InvalidInput
from emanet.segmenter import Segmenter, read_image


class ConstantSegmenter(Segmenter):
    """Labels every pixel 1: what the loop does with the result is under test, not the model."""

    def prepare(self, path):
        return read_image(path), None, []

    def predict_prepared(self, prepared):
        return np.ones(prepared[0].shape[:2], np.int32)


def test_images_a_list_names_outside_its_folder_are_saved_inside_save_dir(tmp_path):
    (tmp_path / 'lists' / 'deep' / 'city').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    for path in (tmp_path / 'lists' / 'deep' / 'city' / 'a.png', tmp_path / 'elsewhere' / 'b.png',
                 tmp_path / 'c.png'):
        cv2.imwrite(str(path), np.zeros((8, 12, 3), np.uint8))
    listing = tmp_path / 'lists' / 'deep' / 'val.txt'
    listing.write_text(f"city/a.png\n../../elsewhere/b.png\n{tmp_path / 'c.png'}\n")
    before = sorted(p for p in tmp_path.rglob('*'))

    save_dir = tmp_path / 'out'
    assert predict_images(ConstantSegmenter(), str(listing), str(save_dir)) == 3
    written = sorted(p for p in tmp_path.rglob('*') if p not in before and p.is_file())
    assert all(save_dir in p.parents for p in written)
    assert sorted(str(p.relative_to(save_dir / 'pseudo_color_prediction'))
                  for p in (save_dir / 'pseudo_color_prediction').rglob('*.png')) == ['b.png', 'c.png', 'city/a.png']


def test_two_images_that_would_share_a_result_name_are_one_error(tmp_path):
    paths = [str(tmp_path / 'one' / 'x.png'), str(tmp_path / 'two' / 'x.png')]
    with pytest.raises(InvalidInput, match=r"one/x\.png and .*two/x\.png would both be saved as 'x'"):
        output_names(paths, str(tmp_path / 'lists'))
    assert output_names(paths, str(tmp_path)) == [os.path.join('one', 'x'), os.path.join('two', 'x')]
