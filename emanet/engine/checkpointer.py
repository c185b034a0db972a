"""The one owner of a training run's checkpoints: ``Checkpointer`` saves, finds, prunes and resumes them.

A checkpoint is a folder holding model.pdparams (the weights in float32), model.pdopt (the optimizer's
state keyed by structured names, with the lr schedule and any AMP master weights), train_state.json
(iteration, seed, best score, data order, evaluation, GradScaler) and, when asked, model.safetensors.
A run writes ``save_dir/iter_N`` at each save and ``save_dir/best_model`` for the best evaluation.

Writes are atomic: the files go to ``<folder>.part``, each synced to disk, and the folder takes its
name only once all are written. A crash while saving leaves the previous checkpoint as it was, and
only folders holding train_state.json count as checkpoints.
"""
import json
import os
import shutil

import numpy as np

from emanet.checkpoint import (float32_state_dict, load_optimizer_state, load_weights,
                               optimizer_state_by_structure, read_state, save_state)
from emanet.engine.metrics import json_ready
from emanet.logger import logger

CHECKPOINT_PREFIX = 'iter_'
BEST_MODEL = 'best_model'
STATE_FILE = 'train_state.json'


class Checkpointer:
    """Checkpoints of one run in ``save_dir``: the newest ``keep`` iter_N folders (all of them when
    ``keep`` is 0 or less) and best_model/. With ``safetensors``, best_model/ and the last
    iteration's folder also hold the weights as model.safetensors, a file that cannot carry code."""

    def __init__(self, save_dir, keep=5, safetensors=False):
        self.save_dir = os.fspath(save_dir)
        self.keep = keep
        self.safetensors = safetensors

    def save(self, iteration, model, optimizer, state, scaler=None, final=False):
        """Write ``iter_<iteration>`` and drop the oldest iter_N folders beyond ``keep``; returns the folder."""
        folder = os.path.join(self.save_dir, f'{CHECKPOINT_PREFIX}{iteration}')
        save_checkpoint(folder, model, optimizer, state, scaler, safetensors=self.safetensors and final)
        self.remove_oldest()
        return folder

    def save_best(self, model, optimizer, state, scaler=None):
        """Write best_model/, replacing the previous best only once the new one is complete."""
        folder = os.path.join(self.save_dir, BEST_MODEL)
        save_checkpoint(folder, model, optimizer, state, scaler, safetensors=self.safetensors)
        return folder

    def iterations(self):
        """The iterations of the complete iter_N folders in save_dir, oldest first."""
        if not os.path.isdir(self.save_dir):
            return []
        return sorted(iteration for iteration, name in self._iter_folders()
                      if os.path.isfile(os.path.join(self.save_dir, name, STATE_FILE)))

    def latest(self):
        """The newest complete iter_N folder, or None."""
        iterations = self.iterations()
        return os.path.join(self.save_dir, f'{CHECKPOINT_PREFIX}{iterations[-1]}') if iterations else None

    def remove_oldest(self):
        """Delete iter_N folders (complete or not) beyond the newest ``keep``; best_model/ is never one of them."""
        if self.keep <= 0:
            return
        for iteration, name in sorted(self._iter_folders())[:-self.keep]:
            shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)

    def resolve(self, resume_model):
        """The folder ``resume_model`` names: itself, the latest checkpoint for 'latest', or None."""
        if resume_model != 'latest':
            return resume_model or None
        latest = self.latest()
        if latest is None:
            logger.warning("--resume_model latest: no checkpoint in %s; starting from scratch", self.save_dir)
        return latest

    def resume(self, folder, model, optimizer, scaler=None, data_order=None, warn=True):
        """Restore a checkpoint folder into the training objects; with ``warn``, one line if ``data_order``
        (``data_order_settings``) differs from the run that wrote it. Returns its train state."""
        load_checkpoint(folder, model, optimizer, scaler)
        saved = read_train_state(folder)
        logger.info("Resumed from %s: continuing at iteration %d", folder, saved['iter'] + 1)
        if warn:
            warn_if_not_exact_resume(saved.get('data_order'), data_order, folder)
        return saved

    def _iter_folders(self):
        """(iteration, name) of every iter_N entry in save_dir; ``iter_9.part`` is not one."""
        for name in os.listdir(self.save_dir):
            number = name[len(CHECKPOINT_PREFIX):]
            if name.startswith(CHECKPOINT_PREFIX) and number.isdigit():
                yield int(number), name


def data_order_settings(train_images, batch_size, processes, iters):
    """What the batches and the learning rate of an iteration depend on, besides the seed."""
    return {'train_images': train_images, 'batch_size': batch_size, 'processes': processes, 'iters': iters}


def warn_if_not_exact_resume(saved, current, checkpoint):
    """One line when a resumed run's data order or schedule differs from the checkpoint's run."""
    if saved is None:
        logger.warning("%s does not record its data order (an older checkpoint): whether this run continues "
                       "it bitwise cannot be checked", checkpoint)
        return
    changed = [key for key, value in current.items() if saved.get(key) != value]
    if changed:
        logger.warning("Resuming with other settings than %s was made with (%s): training continues, but not "
                       "bitwise as the uninterrupted run would have", checkpoint,
                       ', '.join(f"{key} {saved.get(key)} -> {current[key]}" for key in changed))


def scaler_state(scaler):
    """A GradScaler's state as plain JSON values ({} without a scaler or when it is disabled)."""
    state = scaler.state_dict() if scaler is not None else {}
    return {key: np.asarray(value).tolist() if key == 'scale' else value for key, value in state.items()}


def save_checkpoint(folder, model, optimizer, state, scaler=None, safetensors=False):
    """Write model.pdparams, model.pdopt and train_state.json (with ``safetensors`` also model.safetensors)
    into ``folder`` atomically.

    Weights are saved in float32 (under AMP O2, the optimizer's master copies); the GradScaler's
    state goes into train_state.json. The files go to ``folder.part`` first; the rename to
    ``folder`` happens only once all are written, so a crash leaves the previous checkpoint
    as the newest complete one.
    """
    partial = folder + '.part'
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash of this same save
    os.makedirs(partial)
    weights = float32_state_dict(model, optimizer)
    save_state(weights, os.path.join(partial, 'model.pdparams'))
    if safetensors:
        save_state(weights, os.path.join(partial, 'model.safetensors'))
    save_state(optimizer_state_by_structure(model, optimizer), os.path.join(partial, 'model.pdopt'))
    if scaler_state(scaler):
        state = dict(state, grad_scaler=scaler_state(scaler))
    with open(os.path.join(partial, STATE_FILE), 'w') as f:
        json.dump(json_ready(state), f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes the checkpoint the newest
    previous = folder + '.old'
    if os.path.isdir(folder):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)


def read_train_state(folder):
    """The iteration, seed and best score saved with a checkpoint folder."""
    state_file = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    with open(state_file) as f:
        return json.load(f)


def load_checkpoint(folder, model, optimizer, scaler=None):
    """Restore model, optimizer (with its lr schedule and any master weights), EM bases and the
    GradScaler's loss scale from a checkpoint folder."""
    load_weights(model, os.path.join(folder, 'model.pdparams'))
    load_optimizer_state(model, optimizer, read_state(os.path.join(folder, 'model.pdopt')))
    saved_scaler = read_train_state(folder).get('grad_scaler')
    if scaler is not None and saved_scaler:
        scaler.load_state_dict(saved_scaler)
