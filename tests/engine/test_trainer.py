"""The training loop: checkpoints, exact resume, a run's ownership of its save_dir, divergence, precision
(data parallelism: tests/test_distributed.py)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddleseg.cvlibs import manager

import emanet.engine.trainer as trainer
from conftest import CONFIG, TOOLS, run_tool_in_process
from emanet.checkpoint import CheckpointError, read_state
from emanet.config import load_config
from emanet.engine.checkpointer import Checkpointer
from emanet.engine.hooks import default_hooks
from emanet.engine.trainer import TrainingDiverged, train
from emanet.errors import UserError


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


def file_hashes(folder):
    """Every folder and file under ``folder`` by relative path, with the SHA-256 of each file's bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'folder'
            for path in sorted(folder.rglob('*'))}


def run_ids(folder, names):
    return [json.loads((folder / name / 'train_state.json').read_text()).get('run_id') for name in names]


@pytest.fixture
def earlier_run(tiny_config, tmp_path):
    """The save_dir of an earlier run that evaluated: best_model/ and iter_2."""
    out = tmp_path / 'out'
    train(load_config(tiny_config(), iters=2), save_dir=str(out), save_interval=2, seed=0,
          hooks=default_hooks(str(out), do_eval=True))
    assert sorted(os.listdir(out)) == ['best_model', 'iter_2']
    return out


def refusal(save_dir, names):
    return (f"--save_dir {save_dir} holds another run's checkpoints ({names}): continue that run with "
            "--resume_model latest, train into another --save_dir, or start a new run beside it with --new_run")


def test_a_fresh_run_into_a_folder_holding_another_runs_checkpoints_is_refused_before_any_work(
        tiny_config, earlier_run, monkeypatch):
    before = file_hashes(earlier_run)

    def building_the_model(cfg):
        raise AssertionError('the model was built before the save_dir was checked')
    monkeypatch.setattr(trainer, 'Builder', building_the_model)
    with pytest.raises(UserError) as refused:
        train(load_config(tiny_config()), save_dir=str(earlier_run), save_interval=2, seed=1,
              hooks=default_hooks(str(earlier_run), do_eval=True))
    assert str(refused.value) == refusal(earlier_run, 'best_model, iter_2')
    assert file_hashes(earlier_run) == before


def test_the_training_tool_refuses_such_a_folder_before_writing_its_config(tiny_config, earlier_run):
    before = file_hashes(earlier_run)
    with pytest.raises(UserError) as refused:
        run_tool_in_process('train.py', '--config', tiny_config(), '--save_dir', earlier_run, '--do_eval',
                            '--iters', 4, '--save_interval', 2, '--seed', 1)
    assert str(refused.value) == refusal(earlier_run, 'best_model, iter_2')
    assert file_hashes(earlier_run) == before  # no config.yml either


def test_new_run_trains_beside_the_earlier_run_and_prunes_only_its_own(tiny_config, earlier_run):
    before = file_hashes(earlier_run)
    taken = earlier_run.parent / 'out-2'
    (taken / 'iter_1').mkdir(parents=True)
    log = run_tool_in_process('train.py', '--config', tiny_config(), '--save_dir', earlier_run, '--new_run',
                              '--iters', 4, '--save_interval', 1, '--keep_checkpoint_max', 2, '--seed', 1)
    new = earlier_run.parent / 'out-3'
    assert f"[INFO] --new_run: {earlier_run} holds another run's checkpoints; this run trains into {new}" in log
    assert sorted(os.listdir(new)) == ['config.yml', 'iter_3', 'iter_4']
    assert file_hashes(earlier_run) == before
    assert os.listdir(taken) == ['iter_1']


def test_new_run_and_resume_model_are_refused_together():
    with pytest.raises(UserError) as refused:
        run_tool_in_process('train.py', '--config', 'unread.yml', '--new_run', '--resume_model', 'latest')
    assert str(refused.value) == '--new_run starts a new run and --resume_model continues one: give one of them'


def test_a_resumed_run_continues_its_run_id_and_prunes_only_that_runs_checkpoints(tiny_config, tmp_path):
    out = tmp_path / 'out'
    train(load_config(tiny_config(), iters=4), checkpointer=Checkpointer(out, keep=0), save_interval=1, seed=0)
    (out / 'iter_500').mkdir()  # the user's own folder
    (out / 'iter_500' / 'notes.txt').write_text('mine')
    shutil.copytree(out / 'iter_1', out / 'iter_400')  # another run's checkpoint
    state = json.loads((out / 'iter_400' / 'train_state.json').read_text())
    (out / 'iter_400' / 'train_state.json').write_text(json.dumps(dict(state, iter=400, run_id='f' * 32)))
    others = {name: file_hashes(out / name) for name in ('iter_400', 'iter_500')}
    run_id, = run_ids(out, ['iter_2'])

    train(load_config(tiny_config(), iters=6), checkpointer=Checkpointer(out, keep=2), save_interval=1,
          resume_model=str(out / 'iter_2'))
    assert sorted(os.listdir(out)) == ['iter_400', 'iter_5', 'iter_500', 'iter_6']
    assert {name: file_hashes(out / name) for name in others} == others
    assert run_ids(out, ['iter_5', 'iter_6']) == [run_id, run_id]


def test_resuming_a_checkpoint_without_run_id_starts_a_run_that_leaves_the_old_folders(tiny_config, tmp_path,
                                                                                     log_lines):
    out = tmp_path / 'out'
    train(load_config(tiny_config(), iters=4), checkpointer=Checkpointer(out, keep=0), save_interval=1, seed=0)
    for iteration in (1, 2, 3, 4):  # as an earlier release wrote them
        state_file = out / f'iter_{iteration}' / 'train_state.json'
        state_file.write_text(json.dumps({key: value for key, value in json.loads(state_file.read_text()).items()
                                          if key != 'run_id'}))
    old = file_hashes(out)
    train(load_config(tiny_config(), iters=6), checkpointer=Checkpointer(out, keep=1), save_interval=1,
          resume_model='latest')
    assert sorted(os.listdir(out)) == ['iter_1', 'iter_2', 'iter_3', 'iter_4', 'iter_6']
    assert {name: digest for name, digest in file_hashes(out).items() if not name.startswith('iter_6')} == old
    new_run_id, = run_ids(out, ['iter_6'])
    assert (f"{out / 'iter_4'} records no run id (an earlier release wrote it): this run continues it as run "
            f"{new_run_id} and never deletes the folders without one") in log_lines


def test_a_resumed_run_refuses_a_save_dir_holding_another_runs_best_model(tiny_config, earlier_run, tmp_path):
    mine = tmp_path / 'mine'
    train(load_config(tiny_config(), iters=2), save_dir=str(mine), save_interval=2, seed=0)
    before = file_hashes(earlier_run)
    with pytest.raises(UserError) as refused:
        train(load_config(tiny_config(), iters=4), save_dir=str(earlier_run), save_interval=2,
              resume_model=str(mine / 'iter_2'), hooks=default_hooks(str(earlier_run), do_eval=True))
    assert str(refused.value) == (
        f"--save_dir {earlier_run} holds best_model that another run wrote and this run could write over: "
        "move it away or resume into another --save_dir")
    assert file_hashes(earlier_run) == before


@pytest.mark.parametrize('resume_model', [None, 'latest'])
def test_a_folder_merely_named_like_a_checkpoint_is_refused_in_one_sentence(tiny_config, tmp_path, resume_model):
    out = tmp_path / 'out'
    (out / 'iter_\u00b2').mkdir(parents=True)  # str.isdigit() says yes, int() says no
    with pytest.raises(UserError) as refused:
        train(load_config(tiny_config(), iters=2), save_dir=str(out), resume_model=resume_model, seed=0)
    assert str(refused.value) == refusal(out, 'iter_\u00b2')


def test_resume_latest_names_a_truncated_train_state(tiny_config, tmp_path):
    out = tmp_path / 'out'
    train(load_config(tiny_config(), iters=2), save_dir=str(out), save_interval=2, seed=0)
    state_file = out / 'iter_2' / 'train_state.json'
    state_file.write_text(state_file.read_text()[:20])
    with pytest.raises(CheckpointError) as refused:
        train(load_config(tiny_config(), iters=4), save_dir=str(out), resume_model='latest')
    assert str(refused.value).startswith(f"{state_file}: not valid JSON for a checkpoint's train state (")


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
