"""Checkpoint files: safe reading, atomic writing, clear errors."""
import os
import pickle

import numpy as np
import paddle
import pytest

from emanet.checkpoint import CheckpointError, read_state, save_state


class WritesAFile:
    """Unpickling this with a plain unpickler would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_reads_what_paddle_saves_as_numpy(tmp_path):
    path = str(tmp_path / 'state.pdopt')
    paddle.save({'w': paddle.ones([2, 3]), 'nested': {'lr': 0.5, 'ids': [1, 2]}, 'iter': 7}, path)
    state = read_state(path)
    np.testing.assert_array_equal(state['w'], np.ones([2, 3], 'float32'))
    assert state['nested'] == {'lr': 0.5, 'ids': [1, 2]}
    assert state['iter'] == 7


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / 'pwned'
    path = tmp_path / 'evil.pdparams'
    path.write_bytes(pickle.dumps({'w': WritesAFile(str(victim))}))
    with pytest.raises(CheckpointError, match=r"evil\.pdparams: refused, .*'io\.open'"):
        read_state(str(path))
    assert not victim.exists()


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint not found: .*nothing.pdparams'):
        read_state(str(tmp_path / 'nothing.pdparams'))
    corrupt = tmp_path / 'corrupt.pdparams'
    corrupt.write_bytes(b'\x80\x04not a pickle at all')
    with pytest.raises(CheckpointError, match='corrupt.pdparams: unreadable checkpoint'):
        read_state(str(corrupt))


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / 'sub' / 'model.pdparams')
    save_state({'w': paddle.zeros([1])}, path)
    save_state({'w': paddle.ones([1])}, path)
    assert read_state(path)['w'].tolist() == [1.0]
    assert os.listdir(tmp_path / 'sub') == ['model.pdparams']
