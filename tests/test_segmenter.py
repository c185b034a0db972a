"""The prediction interface's shared pieces: test-time options as one value, undoing PaddleSeg's transforms."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle.io import DataLoader, Dataset
from paddleseg.transforms import Padding, Resize

from emanet.segmenter import InferenceOptions, undo_transforms

NUM_CLASSES = 4


def random_maps(*shape):
    return paddle.to_tensor(np.random.default_rng(0).standard_normal(shape).astype('float32'))


def transformed_sample():
    """A 5x7 image padded to 6x9 (h x w), then resized to 4x4, as PaddleSeg records it."""
    data = {'img': np.zeros([5, 7, 3], dtype='float32'), 'trans_info': []}
    data = Padding(target_size=(9, 6))(data)
    return Resize(target_size=(4, 4))(data)


def test_undo_transforms_undoes_resize_then_padding():
    trans_info = transformed_sample()['trans_info']
    assert [mode for mode, _ in trans_info] == ['padding', 'resize']
    logits = random_maps(1, NUM_CLASSES, 4, 4)
    restored = undo_transforms(logits, trans_info)
    expected = F.interpolate(logits, [6, 9], mode='bilinear')[:, :, :5, :7]
    assert restored.shape == [1, NUM_CLASSES, 5, 7]
    np.testing.assert_array_equal(restored.numpy(), expected.numpy())


class TransformedSamples(Dataset):
    def __getitem__(self, index):
        sample = transformed_sample()
        return {'img': sample['img'], 'trans_info': sample['trans_info']}

    def __len__(self):
        return 2


def test_undo_transforms_reads_trans_info_as_a_data_loader_batches_it():
    batch = next(iter(DataLoader(TransformedSamples(), batch_size=2, return_list=True)))
    logits = random_maps(2, NUM_CLASSES, 4, 4)
    restored = undo_transforms(logits, batch['trans_info'])
    expected = undo_transforms(logits, transformed_sample()['trans_info'])
    np.testing.assert_array_equal(restored.numpy(), expected.numpy())


def test_undo_transforms_refuses_sizes_that_differ_within_a_batch():
    trans_info = [[['padding', 'padding'], [paddle.to_tensor([5, 6]), paddle.to_tensor([7, 7])]]]
    with pytest.raises(ValueError, match=r'differ across the batch \(\[5, 6\]\)'):
        undo_transforms(random_maps(2, NUM_CLASSES, 8, 8), trans_info)


def test_options_come_from_test_config_with_command_line_overrides():
    options = InferenceOptions.from_config({'aug_eval': True, 'flip_horizontal': True, 'scales': 1.0},
                                           scales=[0.75, 1.0], flip_horizontal=None, is_slide=None)
    assert options == InferenceOptions(aug_eval=True, flip_horizontal=True, scales=(0.75, 1.0))
    assert options.augmented and not InferenceOptions(flip_horizontal=True).augmented  # flips need aug_eval
    with pytest.raises(ValueError, match="test_config has unknown key 'flip'; known: aug_eval, scales"):
        InferenceOptions.from_config({'flip': True})


def test_an_image_that_is_missing_or_cannot_be_decoded_is_one_user_error(tmp_path):
    from emanet.errors import UserError
    from emanet.segmenter import read_image
    with pytest.raises(UserError, match=r'image not found: .*nope\.jpg'):
        read_image(str(tmp_path / 'nope.jpg'))
    (tmp_path / 'cut.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00')
    with pytest.raises(UserError, match=r'cut\.png: cannot be decoded as an image'):
        read_image(str(tmp_path / 'cut.png'))
