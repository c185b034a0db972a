"""The Checkpointer: keeps the newest N iterations and best_model/ of its own run, finds the newest complete
checkpoint, survives a crash in the middle of a save, and resumes a run where it stopped."""
import json
import os

import numpy as np
import paddle
import pytest

import emanet.engine.checkpointer as checkpointer
from emanet.checkpoint import CheckpointError
from emanet.engine.checkpointer import Checkpointer, read_train_state


def training_objects(seed=0):
    paddle.seed(seed)
    model = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, parameters=model.parameters())
    return model, optimizer


def one_step(model, optimizer):
    """Change the weights, as an iteration of training would."""
    model(paddle.ones([1, 3])).sum().backward()
    optimizer.step()
    optimizer.clear_grad()


def state(iteration):
    return {'iter': iteration, 'seed': 0, 'best': {'miou': -1.0, 'iter': -1}}


def folder_contents(folder):
    """Every file of a checkpoint folder and its bytes."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_keep_n_removes_the_oldest_iterations_and_never_best_model(tmp_path):
    saver = Checkpointer(tmp_path, keep=2)
    model, optimizer = training_objects()
    saver.save_best(model, optimizer, state(1))
    for iteration in (1, 2, 3, 4):
        saver.save(iteration, model, optimizer, state(iteration))
    assert sorted(os.listdir(tmp_path)) == ['best_model', 'iter_3', 'iter_4']


def test_keep_n_removes_only_this_runs_iterations_never_a_folder_named_like_one(tmp_path):
    model, optimizer = training_objects()
    Checkpointer(tmp_path, keep=0).save(400, model, optimizer, state(400))  # another run's checkpoint
    (tmp_path / 'iter_500').mkdir()  # the user's own folder
    (tmp_path / 'iter_500' / 'notes.txt').write_text('mine')
    others = {name: folder_contents(tmp_path / name) for name in ('iter_400', 'iter_500')}
    saver = Checkpointer(tmp_path, keep=2)
    for iteration in (1, 2, 3, 4):
        saver.save(iteration, model, optimizer, state(iteration))
    assert sorted(os.listdir(tmp_path)) == ['iter_3', 'iter_4', 'iter_400', 'iter_500']
    assert {name: folder_contents(tmp_path / name) for name in others} == others


def test_best_model_of_another_run_is_never_replaced(tmp_path):
    model, optimizer = training_objects()
    Checkpointer(tmp_path).save_best(model, optimizer, state(2))
    before = folder_contents(tmp_path / 'best_model')
    one_step(model, optimizer)
    with pytest.raises(CheckpointError) as refused:
        Checkpointer(tmp_path).save_best(model, optimizer, state(4))
    assert str(refused.value) == f"{tmp_path / 'best_model'} was written by another run: this run does not replace it"
    assert folder_contents(tmp_path / 'best_model') == before


def test_keep_zero_keeps_every_iteration(tmp_path):
    saver = Checkpointer(tmp_path, keep=0)
    model, optimizer = training_objects()
    for iteration in (1, 2, 3):
        saver.save(iteration, model, optimizer, state(iteration))
    assert sorted(os.listdir(tmp_path)) == ['iter_1', 'iter_2', 'iter_3']


def test_latest_is_the_newest_complete_checkpoint_by_number(tmp_path):
    saver = Checkpointer(tmp_path, keep=0)
    assert saver.latest() is None
    model, optimizer = training_objects()
    for iteration in (9, 10):  # by number, not by name: iter_10 is newer than iter_9
        saver.save(iteration, model, optimizer, state(iteration))
    (tmp_path / 'iter_11.part').mkdir()  # a save still being written
    (tmp_path / 'iter_12').mkdir()  # a folder without train_state.json
    (tmp_path / 'iter_12' / 'model.pdparams').write_bytes(b'half')
    assert saver.latest() == str(tmp_path / 'iter_10')
    assert saver.resolve('latest') == str(tmp_path / 'iter_10')
    assert read_train_state(saver.latest())['iter'] == 10


def test_resume_latest_in_an_empty_folder_says_it_starts_from_scratch(tmp_path, log_lines):
    assert Checkpointer(tmp_path / 'empty').resolve('latest') is None
    assert f"--resume_model latest: no checkpoint in {tmp_path / 'empty'}; starting from scratch" in log_lines


@pytest.fixture
def crash_at_the_second_file_of_iter_4(monkeypatch):
    """The disk fills up while model.pdopt, the second file of iter_4 (or of best_model/ after it), is written."""
    original = checkpointer.save_state
    crashes = {'armed': False}

    def save_state(values, path):
        if crashes['armed'] and path.endswith('model.pdopt'):
            raise OSError('disk full')
        original(values, path)
    monkeypatch.setattr(checkpointer, 'save_state', save_state)
    return crashes


def test_an_interrupted_save_leaves_the_previous_checkpoint_as_the_latest(tmp_path, crash_at_the_second_file_of_iter_4):
    saver = Checkpointer(tmp_path)
    model, optimizer = training_objects()
    saver.save(2, model, optimizer, state(2))
    before = folder_contents(tmp_path / 'iter_2')
    one_step(model, optimizer)
    crash_at_the_second_file_of_iter_4['armed'] = True
    with pytest.raises(OSError, match='disk full'):
        saver.save(4, model, optimizer, state(4))
    assert saver.latest() == str(tmp_path / 'iter_2')
    assert folder_contents(tmp_path / 'iter_2') == before
    assert not (tmp_path / 'iter_4').exists()  # no half-written folder under a checkpoint's name


def test_an_interrupted_rewrite_of_best_model_keeps_the_previous_best(tmp_path, crash_at_the_second_file_of_iter_4):
    saver = Checkpointer(tmp_path)
    model, optimizer = training_objects()
    saver.save_best(model, optimizer, state(2))
    before = folder_contents(tmp_path / 'best_model')
    one_step(model, optimizer)
    crash_at_the_second_file_of_iter_4['armed'] = True
    with pytest.raises(OSError, match='disk full'):
        saver.save_best(model, optimizer, state(4))
    assert folder_contents(tmp_path / 'best_model') == before  # the old weights with the old optimizer state


def test_a_crash_at_the_final_rename_leaves_the_previous_checkpoint_as_the_latest(tmp_path, monkeypatch):
    saver = Checkpointer(tmp_path)
    model, optimizer = training_objects()
    saver.save(2, model, optimizer, state(2))
    original_replace = os.replace

    def replace(source, target):
        if os.path.isdir(source) and str(target).endswith('iter_4'):
            raise OSError('power cut')
        original_replace(source, target)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match='power cut'):
        saver.save(4, model, optimizer, state(4))
    assert saver.latest() == str(tmp_path / 'iter_2')
    assert not (tmp_path / 'iter_4').exists()


def test_resume_restores_weights_and_optimizer_and_says_when_the_data_order_changed(tmp_path, log_lines):
    saver = Checkpointer(tmp_path)
    model, optimizer = training_objects(seed=0)
    one_step(model, optimizer)
    data_order = checkpointer.data_order_settings(train_images=8, batch_size=2, processes=1, iters=6)
    saver.save(3, model, optimizer, dict(state(3), data_order=data_order))

    restored, restored_optimizer = training_objects(seed=1)
    saved = saver.resume(saver.latest(), restored, restored_optimizer,
                         data_order=dict(data_order, batch_size=1))
    assert saved['iter'] == 3
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    velocities = checkpointer.optimizer_state_by_structure(model, optimizer)
    restored_velocities = checkpointer.optimizer_state_by_structure(restored, restored_optimizer)
    assert velocities.keys() == restored_velocities.keys()
    for key, value in velocities.items():
        np.testing.assert_array_equal(np.asarray(restored_velocities[key]), np.asarray(value), err_msg=key)
    assert f"Resumed from {tmp_path / 'iter_3'}: continuing at iteration 4" in log_lines
    assert (f"Resuming with other settings than {tmp_path / 'iter_3'} was made with (batch_size 2 -> 1): "
            "training continues, but not bitwise as the uninterrupted run would have") in log_lines


def test_resume_latest_continues_the_run_of_the_newest_checkpoint_under_its_run_id(tmp_path):
    model, optimizer = training_objects()
    earlier, newer = Checkpointer(tmp_path, keep=0), Checkpointer(tmp_path, keep=0)
    earlier.save(2, model, optimizer, state(2))
    newer.save(5, model, optimizer, state(5))
    resumed = Checkpointer(tmp_path, keep=1)
    folder, saved = resumed.start_run('latest')
    assert (folder, saved['iter'], resumed.run_id) == (str(tmp_path / 'iter_5'), 5, newer.run_id)
    resumed.save(6, model, optimizer, state(6))
    assert sorted(os.listdir(tmp_path)) == ['iter_2', 'iter_6']  # its run's iter_5 pruned, the other run's kept


def test_a_truncated_train_state_is_named_in_one_sentence(tmp_path):
    state_file = tmp_path / 'iter_4' / 'train_state.json'
    state_file.parent.mkdir()
    state_file.write_text('{"iter": 4, "se')
    with pytest.raises(CheckpointError) as refused:
        read_train_state(str(state_file.parent))
    assert str(refused.value) == (f"{state_file}: not valid JSON for a checkpoint's train state "
                                  "(Unterminated string starting at: line 1 column 13 (char 12))")


@pytest.mark.parametrize('content, reason', [
    ('[4]', "it holds a list, not a mapping"),
    ('{"seed": 0}', "it has no whole-number 'iter'"),
    ('{"iter": "4", "seed": 0}', "it has no whole-number 'iter'"),
    ('{"iter": 4, "seed": 0, "run_id": "../../elsewhere"}', "its 'run_id' is not 32 hexadecimal digits"),
    ('{"iter": 4, "seed": 0, "best": [0.5]}', "its 'best' is not a mapping of a number 'miou' and a whole-number 'iter'"),
    ('{"iter": 4, "seed": 0, "data_order": 8}', "its 'data_order' is not a mapping"),
])
def test_a_damaged_train_state_is_named_in_one_sentence(tmp_path, content, reason):
    (tmp_path / 'iter_4').mkdir()
    (tmp_path / 'iter_4' / 'train_state.json').write_text(content)
    with pytest.raises(CheckpointError) as refused:
        read_train_state(str(tmp_path / 'iter_4'))
    state_file = tmp_path / 'iter_4' / 'train_state.json'
    assert str(refused.value) == f"{state_file} is not a checkpoint's train state: {reason}"
