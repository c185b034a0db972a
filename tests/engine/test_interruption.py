"""A killed or crashed run loses at most one save interval and resumes to the same weights."""
import json
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


@pytest.mark.slow
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


class Crash(BaseException):
    """The process ending at that line (power lost, SIGKILL)."""


def test_a_crash_between_writing_a_checkpoint_and_renaming_it_leaves_the_previous_one(tiny_config, tmp_path,
                                                                                       monkeypatch, log_lines):
    out = tmp_path / 'out'
    real_replace = os.replace

    def crash_before_iter_4_takes_its_name(source, target):
        if os.path.basename(target) == 'iter_4':  # every file of iter_4 is written, the rename has not happened
            raise Crash
        real_replace(source, target)

    monkeypatch.setattr(os, 'replace', crash_before_iter_4_takes_its_name)
    with pytest.raises(Crash):
        trainer.train(load_config(tiny_config(), iters=4), save_dir=str(out), save_interval=2, seed=0)
    assert not (out / 'iter_4').exists()
    assert sorted(os.listdir(out / 'iter_2')) == ['model.pdopt', 'model.pdparams', 'train_state.json']

    monkeypatch.setattr(os, 'replace', real_replace)
    trainer.train(load_config(tiny_config(), iters=4), save_dir=str(out), resume_model='latest', save_interval=2)
    assert f"Resumed from {out / 'iter_2'}: continuing at iteration 3" in log_lines
    assert sorted(p for p in os.listdir(out) if not p.endswith('.part')) == ['iter_2', 'iter_4']


def test_resume_latest_with_no_checkpoint_says_it_starts_from_scratch(tiny_config, tmp_path, log_lines):
    trainer.train(load_config(tiny_config(), iters=1), save_dir=str(tmp_path / 'empty'), resume_model='latest', seed=0)
    assert f"--resume_model latest: no checkpoint in {tmp_path / 'empty'}; starting from scratch" in log_lines


def test_resume_with_other_settings_says_it_is_no_longer_bitwise_the_same(tiny_config, tmp_path, log_lines):
    out = tmp_path / 'out'
    trainer.train(load_config(tiny_config(), iters=3), save_dir=str(out), save_interval=2, seed=0)
    saved = json.loads((out / 'iter_2' / 'train_state.json').read_text())
    assert saved['data_order'] == {'train_images': 8, 'batch_size': 2, 'processes': 1, 'iters': 3}

    trainer.train(load_config(tiny_config(), iters=3), save_dir=str(out), save_interval=2,
                  resume_model=str(out / 'iter_2'))
    assert not [line for line in log_lines if 'Resuming with other settings' in line]  # the same settings

    trainer.train(load_config(tiny_config(), iters=3, batch_size=1), save_dir=str(out), save_interval=2,
                  resume_model=str(out / 'iter_2'))
    warnings = [line for line in log_lines if 'Resuming with other settings' in line]
    assert warnings == [f"Resuming with other settings than {out / 'iter_2'} was made with (batch_size 2 -> 1): "
                        "training continues, but not bitwise as the uninterrupted run would have"]
