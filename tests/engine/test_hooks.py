"""Hooks of the training loop: called at fixed points, in the order given; a hook a user adds sees every
step and can add to the checkpoint; the built-in ones log the [TRAIN] line and keep best_model/."""
import json
import os
import re
from types import SimpleNamespace

import pytest

from emanet.config import load_config
from emanet.engine.hooks import (AttentionPictures, BestModel, Evaluation, HookBase, TrainLog, VisualDL,
                                 default_hooks)
from emanet.engine.trainer import train


class Recorder(HookBase):
    """Notes each call as (name, point, iteration), and whether iter_N existed when before_save ran."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def before_train(self, run):
        self.calls.append((self.name, 'before_train', run.iteration))

    def after_step(self, run):
        self.calls.append((self.name, 'after_step', run.iteration))

    def before_save(self, run):
        written = os.path.isdir(os.path.join(run.checkpointer.save_dir, f'iter_{run.iteration}'))
        self.calls.append((self.name, 'before_save' + (' (already written)' if written else ''), run.iteration))

    def after_train(self, run):
        self.calls.append((self.name, 'after_train', run.iteration))


def test_hooks_are_called_at_the_fixed_points_in_the_order_given(tiny_config, tmp_path):
    calls = []
    train(load_config(tiny_config(), iters=4), save_dir=str(tmp_path / 'out'), save_interval=2, seed=0,
          hooks=[Recorder('first', calls), Recorder('second', calls)])
    points = [('before_train', 0), ('after_step', 1), ('after_step', 2), ('before_save', 2),
              ('after_step', 3), ('after_step', 4), ('before_save', 4), ('after_train', 4)]
    assert calls == [(name, point, iteration) for point, iteration in points for name in ('first', 'second')]


class EveryStep(HookBase):
    """A user's hook: the iteration and loss of every step, and a note in each checkpoint."""

    def __init__(self):
        self.steps = []

    def after_step(self, run):
        self.steps.append((run.iteration, run.loss))

    def before_save(self, run):
        run.state['steps_seen'] = len(self.steps)


def test_a_custom_hook_sees_every_step_and_adds_to_the_checkpoint(tiny_config, tmp_path, log_lines):
    out, hook = tmp_path / 'out', EveryStep()
    train(load_config(tiny_config(), iters=3), save_dir=str(out), save_interval=2, seed=0,
          hooks=[TrainLog(log_iters=1), hook])
    assert [iteration for iteration, _ in hook.steps] == [1, 2, 3]
    logged = [float(loss) for loss in re.findall(r'\[TRAIN\] .* loss: ([\d.]+),', '\n'.join(log_lines))]
    assert logged == [round(loss, 4) for _, loss in hook.steps]  # the loss the [TRAIN] line shows
    # at each save interval and at the last iteration
    saved = {it: json.loads((out / f'iter_{it}' / 'train_state.json').read_text())['steps_seen'] for it in (2, 3)}
    assert saved == {2: 2, 3: 3}

    resumed = EveryStep()
    train(load_config(tiny_config(), iters=3), save_dir=str(out), save_interval=2, resume_model=str(out / 'iter_2'),
          hooks=[resumed])
    assert [iteration for iteration, _ in resumed.steps] == [3]
    assert [loss for _, loss in resumed.steps] == [loss for _, loss in hook.steps[2:]]  # exact resume


def step(iteration, loss, start_iter=0, total_iters=20, batch_cost=0.5):
    return SimpleNamespace(rank=0, iteration=iteration, epoch=1, start_iter=start_iter, total_iters=total_iters,
                           loss=loss, lr=0.01, reader_cost=0.1, batch_cost=batch_cost, batch_size=2, world_size=1,
                           scalars={})


def test_the_train_line_comes_at_the_first_iteration_every_log_iters_and_the_last_averaged(log_lines):
    hook = TrainLog(log_iters=10)
    hook.before_train(None)
    for iteration in range(1, 21):
        hook.after_step(step(iteration, loss=float(iteration)))
    assert log_lines == [
        "[TRAIN] epoch: 1, iter: 1/20, loss: 1.0000, lr: 0.010000, batch_cost: 0.5000, reader_cost: 0.10000, "
        "ips: 4.0000 samples/sec | ETA 0:00:09",
        "[TRAIN] epoch: 1, iter: 10/20, loss: 6.0000, lr: 0.010000, batch_cost: 0.5000, reader_cost: 0.10000, "
        "ips: 4.0000 samples/sec | ETA 0:00:05",  # the mean of iterations 2 to 10
        "[TRAIN] epoch: 1, iter: 20/20, loss: 15.5000, lr: 0.010000, batch_cost: 0.5000, reader_cost: 0.10000, "
        "ips: 4.0000 samples/sec | ETA 0:00:00"]


class RecordingCheckpointer:
    def __init__(self):
        self.best_saved_at = []

    def save_best(self, model, optimizer, state, scaler=None):
        self.best_saved_at.append(state['iter'])


def test_best_model_is_saved_only_when_the_miou_improves(log_lines):
    run = SimpleNamespace(rank=0, best={'miou': -1.0, 'iter': -1}, checkpointer=RecordingCheckpointer(),
                          model=None, optimizer=None, scaler=None)
    hook = BestModel()
    for iteration, miou in ((2, 0.3), (4, 0.5), (6, 0.4)):
        run.iteration, run.evaluation = iteration, {'miou': miou}
        run.state = {'iter': iteration, 'best': run.best}
        hook.before_save(run)
    assert run.checkpointer.best_saved_at == [2, 4]
    assert run.best == run.state['best'] == {'miou': 0.5, 'iter': 4}
    assert log_lines[-1] == "[EVAL] The model with the best validation mIoU (0.5000) was saved at iter 4."


def test_default_hooks_follow_the_flags_in_the_order_they_need(tmp_path):
    assert [type(h) for h in default_hooks(str(tmp_path), log_iters=5)] == [TrainLog]
    hooks = default_hooks(str(tmp_path), do_eval=True, use_vdl=True, log_attention=True)
    # evaluation before what uses its result; VisualDL last, to write what the others report
    assert [type(h) for h in hooks] == [TrainLog, Evaluation, AttentionPictures, BestModel, VisualDL]
    assert hooks[2].visualdl is hooks[4]
    with pytest.raises(ValueError, match='log_attention puts pictures into VisualDL at each evaluation: '
                                         'it needs use_vdl and do_eval'):
        default_hooks(str(tmp_path), do_eval=True, log_attention=True)

