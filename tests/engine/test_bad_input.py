"""Bad data ends in one error naming the file, before training where it can be checked, never a hang."""
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import TOOLS
from emanet.config import Builder, build_model, load_config
from emanet.data.loading import SampleError
from emanet.engine.evaluate import evaluate
from emanet.engine.inference import ModelSegmenter
from emanet.engine.trainer import train


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    """A writable copy of the tiny dataset, and a config reading it."""
    root = tmp_path / 'data'
    shutil.copytree(tiny_dataset, root)
    return root


def write_config(tiny_config, tiny_dataset, root):
    path = root.parent / 'copy.yml'
    path.write_text(open(tiny_config()).read().replace(str(tiny_dataset), str(root)))
    return str(path)


def test_a_listed_file_that_does_not_exist_is_named_before_training(tiny_config, tiny_dataset, dataset_copy):
    os.remove(dataset_copy / '3_label.png')
    cfg = load_config(write_config(tiny_config, tiny_dataset, dataset_copy))
    with pytest.raises(FileNotFoundError, match=r'1 of 16 files listed for the train split .* are missing: .*3_label\.png'):
        Builder(cfg).train_dataset


def test_a_symbolic_link_to_nowhere_is_named_as_missing_before_training(tiny_config, tiny_dataset, dataset_copy):
    link = dataset_copy / '3.jpg'
    link.unlink()
    link.symlink_to(dataset_copy / 'moved-away' / '3.jpg')
    cfg = load_config(write_config(tiny_config, tiny_dataset, dataset_copy))
    with pytest.raises(FileNotFoundError, match=rf'1 of 16 files listed for the train split .* are missing: {link}\.$'):
        Builder(cfg).train_dataset


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_corrupt_image_mid_run_stops_naming_it_without_hanging(tiny_config, tiny_dataset, dataset_copy,
                                                                 tmp_path, num_workers):
    (dataset_copy / '5.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    cfg = load_config(write_config(tiny_config, tiny_dataset, dataset_copy), iters=8)
    sigchld_handler = signal.getsignal(signal.SIGCHLD)
    with pytest.raises(SampleError, match=r'5\.jpg: the file is cut short or damaged \(.+\)$'):
        train(cfg, save_dir=str(tmp_path / 'out'), seed=0, num_workers=num_workers)
    # Nothing outlives the failed run: no loader worker, and no SIGCHLD handler of Paddle's (with it,
    # each later child process that exited interrupted every thread's system calls, until a crash).
    assert multiprocessing.active_children() == []
    assert signal.getsignal(signal.SIGCHLD) is sigchld_handler


def test_image_and_label_of_different_size_are_named(tiny_config, tiny_dataset, dataset_copy, tmp_path):
    cv2.imwrite(str(dataset_copy / '2_label.png'), np.zeros((10, 12), np.uint8))
    cfg = load_config(write_config(tiny_config, tiny_dataset, dataset_copy), iters=8)
    with pytest.raises(SampleError, match=r'2\.jpg \(label .*2_label\.png\): the image is 48x32 but its label is 12x10'):
        train(cfg, save_dir=str(tmp_path / 'out'), seed=0)


def test_label_values_out_of_range_are_named_in_training_and_evaluation(tiny_config, tiny_dataset,
                                                                        dataset_copy, tmp_path):
    for name in ('1_label.png', '9_label.png'):  # one in train, one in val
        label = cv2.imread(str(dataset_copy / name), cv2.IMREAD_GRAYSCALE)
        label[0, :3] = [3, 7, 255]  # 3 and 7 are outside [0, 3); 255 is the ignore index
        cv2.imwrite(str(dataset_copy / name), label)
    cfg = load_config(write_config(tiny_config, tiny_dataset, dataset_copy), iters=8)
    with pytest.raises(SampleError, match=r'1_label\.png: label values \[3, 7\] are outside \[0, 3\) '
                                          r'and are not the ignore index 255'):
        train(cfg, save_dir=str(tmp_path / 'out'), seed=0)
    builder = Builder(cfg)
    with pytest.raises(SampleError, match=r'9_label\.png: label values \[3, 7\]'):
        evaluate(ModelSegmenter(builder.model), builder.val_dataset)


@pytest.mark.slow
def test_a_checkpoint_for_another_model_is_one_line_from_the_tools(tiny_config, tmp_path):
    import paddle
    bad = tmp_path / 'other.pdparams'
    paddle.save({'head.cls.1.weight': paddle.zeros([5, 16, 1, 1])}, str(bad))
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'val.py'), '--config', tiny_config(),
                             '--model_path', str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: {bad} does not fit EMANet: missing: ')
    assert 'shape mismatch: head.cls.1.weight: checkpoint [5, 16, 1, 1] vs model [3, 16, 1, 1]' in last


@pytest.mark.slow
@pytest.mark.parametrize('num_workers', ['0', '2'])
def test_an_rgb_label_ends_the_evaluation_tool_in_one_line_naming_it(tiny_config, tiny_dataset, dataset_copy,
                                                                       tmp_path, num_workers):
    import paddle
    label = dataset_copy / '9_label.png'  # a val sample
    Image.open(label).convert('RGB').save(label)
    config = write_config(tiny_config, tiny_dataset, dataset_copy)
    weights = tmp_path / 'model.pdparams'
    paddle.save(build_model(load_config(config, training=False)).state_dict(), str(weights))
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'val.py'), '--config', config, '--model_path',
                             str(weights), '--num_workers', num_workers],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: {label}: the label has 3 channels (RGB); labels are single-channel class indices '
        '(a grayscale or palette PNG)')
