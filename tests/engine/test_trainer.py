"""The training loop: checkpoints, exact resume, divergence, precision (data parallelism: tests/test_distributed.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddleseg.cvlibs import manager

from conftest import CONFIG, TOOLS
from emanet.checkpoint import read_state
from emanet.config import load_config
from emanet.engine.checkpointer import Checkpointer
from emanet.engine.hooks import default_hooks
from emanet.engine.trainer import TrainingDiverged, train


def weights_and_optimizer(folder):
    return read_state(os.path.join(folder, 'model.pdparams')), read_state(os.path.join(folder, 'model.pdopt'))


def test_checkpoints_hold_everything_and_only_the_newest_are_kept(tiny_config, tmp_path):
    out = tmp_path / 'out'
    train(load_config(tiny_config()), checkpointer=Checkpointer(out, keep=2), save_interval=2, seed=0)
    assert sorted(os.listdir(out)) == ['iter_4', 'iter_6']
    assert sorted(os.listdir(out / 'iter_6')) == ['model.pdopt', 'model.pdparams', 'train_state.json']
    state = json.loads((out / 'iter_6' / 'train_state.json').read_text())
    assert state['iter'] == 6 and state['seed'] == 0
    weights, optimizer = weights_and_optimizer(out / 'iter_6')
    assert weights['head.emau.mu'].shape == (1, 32, 8)
    assert optimizer['LR_Scheduler']['last_epoch'] == 6


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tiny_config, tmp_path):
    cfg = tiny_config()
    train(load_config(cfg), save_dir=str(tmp_path / 'full'), save_interval=3, seed=7)
    resumed = tmp_path / 'resumed'
    train(load_config(cfg), save_dir=str(resumed), resume_model=str(tmp_path / 'full' / 'iter_3'),
          save_interval=3)
    assert sorted(os.listdir(resumed)) == ['iter_6']
    full_weights, full_opt = weights_and_optimizer(tmp_path / 'full' / 'iter_6')
    resumed_weights, resumed_opt = weights_and_optimizer(resumed / 'iter_6')
    assert full_weights.keys() == resumed_weights.keys()
    for key in full_weights:
        np.testing.assert_array_equal(resumed_weights[key], full_weights[key], err_msg=key)
    assert resumed_opt['LR_Scheduler'] == full_opt['LR_Scheduler']
    initial = paddle.load(str(tmp_path / 'full' / 'iter_3' / 'model.pdparams'))['head.emau.mu'].numpy()
    assert not np.array_equal(initial, full_weights['head.emau.mu'])  # the bases did move and were restored


def test_resume_latest_picks_the_newest_complete_checkpoint(tiny_config, tmp_path):
    out = tmp_path / 'out'
    train(load_config(tiny_config()), save_dir=str(out), save_interval=3, seed=1)
    (out / 'iter_9.part').mkdir()  # an interrupted write is not a checkpoint
    cfg = load_config(tiny_config(), iters=8)
    train(cfg, save_dir=str(out), resume_model='latest', save_interval=4)
    assert json.loads((out / 'iter_8' / 'train_state.json').read_text())['iter'] == 8


class NaNAfterTwoCalls(paddle.nn.Layer):
    """A loss that becomes NaN on its third call."""

    def __init__(self, ignore_index=255):
        super().__init__()
        self.calls = 0

    def forward(self, logit, label):
        self.calls += 1
        loss = logit.mean() * 0
        return loss + float('nan') if self.calls > 2 else loss


def test_nan_loss_stops_naming_the_iteration_and_the_last_good_checkpoint(tiny_config, tmp_path):
    manager.LOSSES.components_dict['NaNAfterTwoCalls'] = NaNAfterTwoCalls
    cfg = load_config(tiny_config(), opts=['loss.types=[{"type": "NaNAfterTwoCalls"}]', 'loss.coef=[1]',
                                            'model.enable_auxiliary_loss=False'])
    out = tmp_path / 'out'
    with pytest.raises(TrainingDiverged, match=r'loss is nan at iteration 3; .*iter_2'):
        train(cfg, save_dir=str(out), save_interval=2, seed=0)
    assert sorted(os.listdir(out)) == ['iter_2']


def test_outputs_and_loss_coefficients_must_pair_up(tiny_config, tmp_path):
    cfg = load_config(tiny_config(), opts=['loss.coef=[1]'])
    with pytest.raises(ValueError, match='the model returns 2 outputs in training but loss.coef has 1 entries'):
        train(cfg, save_dir=str(tmp_path / 'out'), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_mixed_precision_on_cpu_is_refused_in_one_sentence(tiny_config, tmp_path, precision):
    result = subprocess.run([sys.executable, os.path.join(TOOLS, 'train.py'), '--config', tiny_config(),
                             '--save_dir', str(tmp_path / 'out'), '--precision', precision],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --precision {precision} needs a GPU: Paddle's automatic mixed precision does "
        "nothing on CPU, use --precision fp32 there")


@pytest.fixture(scope='module')
def evaluated_run(tiny_dataset, tmp_path_factory):
    """The save_dir of a run that evaluates at each save (iterations 3 and 6), with VisualDL and safetensors."""
    work = tmp_path_factory.mktemp('evaluated_run')
    (work / 'config.yml').write_text(CONFIG.format(root=tiny_dataset))
    out = work / 'out'
    train(load_config(str(work / 'config.yml')), checkpointer=Checkpointer(out, safetensors=True), save_interval=3,
          seed=0, hooks=default_hooks(str(out), do_eval=True, use_vdl=True))
    return out


def test_evaluation_keeps_the_best_model_and_visualdl_gets_the_scalars(evaluated_run):
    out = evaluated_run
    best = json.loads((out / 'best_model' / 'train_state.json').read_text())['best']
    evaluations = {it: json.loads((out / f'iter_{it}' / 'train_state.json').read_text())['evaluation']['miou']
                   for it in (3, 6)}
    assert best == {'miou': max(evaluations.values()), 'iter': max(evaluations, key=evaluations.get)}
    best_weights, _ = weights_and_optimizer(out / 'best_model')
    saved_weights, _ = weights_and_optimizer(out / f"iter_{best['iter']}")
    for key in saved_weights:  # best_model holds the weights of the iteration it names
        np.testing.assert_array_equal(best_weights[key], saved_weights[key], err_msg=key)
    records = b''.join(p.read_bytes() for p in out.glob('vdlrecords.*.log'))
    for tag in (b'Train/loss', b'Train/lr', b'Evaluate/mIoU'):
        assert tag in records


def test_best_and_final_weights_can_also_be_saved_as_safetensors(evaluated_run):
    out = evaluated_run
    assert sorted(os.listdir(out / 'iter_6')) == ['model.pdopt', 'model.pdparams', 'model.safetensors',
                                                  'train_state.json']
    assert 'model.safetensors' not in os.listdir(out / 'iter_3')  # only the final and the best weights
    for folder in (out / 'iter_6', out / 'best_model'):
        pickled, safe = read_state(str(folder / 'model.pdparams')), read_state(str(folder / 'model.safetensors'))
        assert pickled.keys() == safe.keys()
        for key in pickled:
            np.testing.assert_array_equal(safe[key], pickled[key], err_msg=key)
