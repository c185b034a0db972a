"""A killed or crashed run loses at most one save interval and resumes to the same weights."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import emanet.engine.trainer as trainer
from conftest import TOOLS
from emanet.checkpoint import read_state
from emanet.config import load_config

ITERS = 12


def final_weights(save_dir):
    return read_state(os.path.join(save_dir, f'iter_{ITERS}', 'model.pdparams'))


def train_command(cfg, save_dir):
    return [sys.executable, os.path.join(TOOLS, 'train.py'), '--config', cfg, '--iters', str(ITERS),
            '--save_interval', '2', '--seed', '11', '--save_dir', str(save_dir)]


def test_sigkill_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(tiny_config, tmp_path):
    # Both runs are fresh processes: the thread count of the math library, which an earlier
    # test in this process may have changed, decides the order of float sums.
    cfg = tiny_config()
    subprocess.run(train_command(cfg, tmp_path / 'full'), capture_output=True, timeout=300, check=True)

    killed = tmp_path / 'killed'
    command = train_command(cfg, killed)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / 'iter_4' / 'train_state.json').exists():
        assert process.poll() is None and time.time() < deadline, 'training ended before iter_4'
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / f'iter_{ITERS}').exists(), 'the run was not interrupted'

    result = subprocess.run(command + ['--resume_model', 'latest'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, full = final_weights(killed), final_weights(tmp_path / 'full')
    assert resumed.keys() == full.keys()
    for key in full:  # on CPU the same seed and iteration give the same batches and dropout masks
        np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tiny_config, tmp_path, monkeypatch):
    writes = []

    def crash_on_the_second_optimizer_file(state, path):
        writes.append(path)
        if path.endswith('model.pdopt') and 'iter_4' in path:
            raise OSError('disk full')
        original_save_state(state, path)

    original_save_state = trainer.save_state
    monkeypatch.setattr(trainer, 'save_state', crash_on_the_second_optimizer_file)
    out = tmp_path / 'out'
    with pytest.raises(OSError, match='disk full'):
        trainer.train(load_config(tiny_config()), save_dir=str(out), save_interval=2, seed=0)
    assert trainer.find_latest_checkpoint(str(out)) == str(out / 'iter_2')
    assert sorted(os.listdir(out / 'iter_2')) == ['model.pdopt', 'model.pdparams', 'train_state.json']
    assert not (out / 'iter_4').exists()

    monkeypatch.setattr(trainer, 'save_state', original_save_state)
    trainer.train(load_config(tiny_config()), save_dir=str(out), resume_model='latest', save_interval=2)
    assert sorted(p for p in os.listdir(out) if not p.endswith('.part')) == ['iter_2', 'iter_4', 'iter_6']
