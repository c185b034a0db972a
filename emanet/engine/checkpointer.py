"""The one owner of a training run's checkpoints: ``Checkpointer`` saves, finds, prunes and resumes them.

A checkpoint is a folder holding model.pdparams (the weights in float32), model.pdopt (the optimizer's
state keyed by structured names, with the lr schedule and any AMP master weights), train_state.json
(iteration, seed, best score, data order, evaluation, GradScaler, run id) and, when asked, model.safetensors.
A run writes ``save_dir/iter_N`` at each save and ``save_dir/best_model`` for the best evaluation.

Writes are atomic: the files go to ``<folder>.<run id>.part``, each synced to disk, and the folder takes its
name only once all are written. A crash while saving leaves the previous checkpoint as it was, and
only folders holding train_state.json count as checkpoints.

Ownership is a record, not a name. Every checkpoint records the id of the run that wrote it (``run_id`` in
train_state.json, written atomically with it), and a run deletes or replaces only the folders that record
its own id, and the leftovers of its own interrupted saves (named with its id). A resumed run continues the
run id of the checkpoint it resumes; one resumed from a checkpoint without a run id (an earlier release)
gets a new id and never deletes the folders without one.

Before any work, ``Checkpointer.start_run`` refuses a save_dir where the run could destroy what it did not
write: a new run refuses one holding any entry named like a checkpoint (``iter_*``, ``best_model*``:
another run's, or the user's own), a resumed run one where another run's best_model/ or an iter_N it will
save sits. Other files (config.yml, VisualDL records of a run that saved no checkpoint) hold no work that
training could lose: a new run trains beside them (and rewrites config.yml).
"""
import itertools
import json
import os
import re
import shutil
import uuid

import numpy as np

from emanet.checkpoint import (CheckpointError, float32_state_dict, load_optimizer_state, load_weights,
                               optimizer_state_by_structure, read_state, save_state)
from emanet.engine.metrics import json_ready
from emanet.errors import UserError
from emanet.logger import logger
from emanet.untrusted import UnreadableFile, load_json

CHECKPOINT_PREFIX = 'iter_'
BEST_MODEL = 'best_model'
STATE_FILE = 'train_state.json'
# ASCII digits only: str.isdigit() also takes '²', which int() refuses.
CHECKPOINT_NAME = re.compile(r'iter_([0-9]+)')
RUN_ID = re.compile(r'[0-9a-f]{32}')


class SaveDirInUse(UserError, FileExistsError):
    """--save_dir holds checkpoints, or folders named like them, that this run did not write."""


def new_run_id():
    return uuid.uuid4().hex


class Checkpointer:
    """Checkpoints of one run in ``save_dir``: the newest ``keep`` iter_N folders of the run (all of them when
    ``keep`` is 0 or less) and best_model/. With ``safetensors``, best_model/ and the last iteration's folder
    also hold the weights as model.safetensors, a file that cannot carry code. ``run_id`` is the run's id:
    a new one, or the resumed checkpoint's once ``start_run`` resumes one."""

    def __init__(self, save_dir, keep=5, safetensors=False):
        self.save_dir = os.fspath(save_dir)
        self.keep = keep
        self.safetensors = safetensors
        self.run_id = new_run_id()

    def start_run(self, resume_model=None, iters=None, save_interval=None):
        """Before any work: the checkpoint ``resume_model`` names (folder, train state) or (None, {}), whose run
        this run continues under its run id. Refuses (``SaveDirInUse``) a save_dir holding what this run could
        delete or write over: for a new run any entry named like a checkpoint, for a resumed one another run's
        best_model/ or an iter_N among the saves of ``iters`` and ``save_interval`` (any later one if not given)."""
        folder = self.resolve(resume_model)
        if folder is None:
            foreign = self.foreign_entries()
            if foreign:
                raise SaveDirInUse(
                    f"--save_dir {self.save_dir} holds another run's checkpoints ({_first_names(foreign)}): continue "
                    "that run with --resume_model latest, train into another --save_dir, or start a new run beside "
                    "it with --new_run")
            return None, {}
        saved = read_train_state(folder)
        self._continue_run_of(folder, saved)
        in_the_way = [name for name in self.foreign_entries()
                      if name == BEST_MODEL or _saved_later(checkpoint_iteration(name), saved['iter'], iters,
                                                            save_interval)]
        if in_the_way:
            raise SaveDirInUse(f"--save_dir {self.save_dir} holds {_first_names(in_the_way)} that another run wrote "
                               f"and this run could write over: move {'it' if len(in_the_way) == 1 else 'them'} "
                               "away or resume into another --save_dir")
        return folder, saved

    def save(self, iteration, model, optimizer, state, scaler=None, final=False):
        """Write ``iter_<iteration>`` and drop the run's oldest iter_N folders beyond ``keep``; returns the folder."""
        folder = self._write(f'{CHECKPOINT_PREFIX}{iteration}', model, optimizer, state, scaler,
                             self.safetensors and final)
        self.remove_oldest()
        return folder

    def save_best(self, model, optimizer, state, scaler=None):
        """Write best_model/, replacing the run's previous best only once the new one is complete."""
        return self._write(BEST_MODEL, model, optimizer, state, scaler, self.safetensors)

    def iterations(self):
        """The iterations of the complete iter_N folders in save_dir (of any run), oldest first."""
        return sorted(iteration for iteration, name in self._checkpoint_names()
                      if os.path.isfile(os.path.join(self.save_dir, name, STATE_FILE)))

    def latest(self):
        """The newest complete iter_N folder (of any run: the newest one's run), or None."""
        iterations = self.iterations()
        return os.path.join(self.save_dir, f'{CHECKPOINT_PREFIX}{iterations[-1]}') if iterations else None

    def remove_oldest(self):
        """Delete the run's iter_N folders beyond its newest ``keep`` and the leftovers of its interrupted saves;
        other runs' folders, folders merely named like checkpoints and best_model/ are never among them."""
        own = sorted((iteration, name) for iteration, name in self._checkpoint_names() if self._owns(name))
        doomed = [name for _, name in own[:-self.keep]] if self.keep > 0 else []
        for name in doomed + [name for name in self._entries() if self._is_own_leftover(name)]:
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

    def foreign_entries(self):
        """The entries of save_dir named like a checkpoint or its leftovers that are not this run's, sorted."""
        return sorted(name for name in self._entries()
                      if name.startswith((CHECKPOINT_PREFIX, BEST_MODEL)) and not self._owns(name)
                      and not self._is_own_leftover(name))

    def _continue_run_of(self, folder, saved):
        if 'run_id' in saved:
            self.run_id = saved['run_id']
        else:
            logger.warning("%s records no run id (an earlier release wrote it): this run continues it as run %s "
                           "and never deletes the folders without one", folder, self.run_id)

    def _write(self, name, model, optimizer, state, scaler, safetensors):
        folder = os.path.join(self.save_dir, name)
        if os.path.lexists(folder) and not self._owns(name):
            raise CheckpointError(f"{folder} was written by another run: this run does not replace it")
        save_checkpoint(folder, model, optimizer, state, scaler, safetensors=safetensors, run_id=self.run_id)
        return folder

    def _owns(self, name):
        """Whether save_dir/name is a checkpoint recording this run's id."""
        try:
            return read_train_state(os.path.join(self.save_dir, name)).get('run_id') == self.run_id
        except CheckpointError:
            return False

    def _is_own_leftover(self, name):
        """Whether ``name`` is what an interrupted save of this run left (its staging names carry the run id)."""
        return name.endswith((f'.{self.run_id}.part', f'.{self.run_id}.old'))

    def _entries(self):
        return os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []

    def _checkpoint_names(self):
        """(iteration, name) of every iter_N entry in save_dir; ``iter_9.part`` and ``iter_²`` are not one."""
        for name in self._entries():
            iteration = checkpoint_iteration(name)
            if iteration is not None:
                yield iteration, name


def checkpoint_iteration(name):
    """N for a folder name ``iter_N`` (ASCII digits), else None."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _saved_later(iteration, resumed_iter, iters, save_interval):
    """Whether a run resumed after ``resumed_iter`` may save ``iteration`` (each ``save_interval``, and ``iters``)."""
    if iteration is None or iteration <= resumed_iter:
        return False
    if iters is None:
        return True
    return iteration <= iters and (save_interval is None or iteration % save_interval == 0 or iteration == iters)


def _first_names(names, shown=3):
    more = f" and {len(names) - shown} more" if len(names) > shown else ''
    return ', '.join(names[:shown]) + more


def folder_for_new_run(save_dir):
    """Where a new run beside an earlier one trains: ``save_dir`` if it holds no checkpoints a new run would
    refuse, else the first of ``<save_dir>-2``, ``<save_dir>-3``, ... that holds none (said in one line)."""
    save_dir = os.path.normpath(save_dir)
    # Judged by checkpoints, not by existence: the processes of one launch write config.yml before any
    # of them saves, and must all pick the same folder.
    for candidate in itertools.chain([save_dir], (f'{save_dir}-{number}' for number in itertools.count(2))):
        if os.path.isfile(candidate) or Checkpointer(candidate).foreign_entries():
            continue
        if candidate != save_dir:
            logger.info("--new_run: %s holds another run's checkpoints; this run trains into %s", save_dir, candidate)
        return candidate


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


def save_checkpoint(folder, model, optimizer, state, scaler=None, safetensors=False, run_id=None):
    """Write model.pdparams, model.pdopt and train_state.json (with ``safetensors`` also model.safetensors)
    into ``folder`` atomically, recording ``run_id`` (a new one if not given) as the run that wrote it.

    Weights are saved in float32 (under AMP O2, the optimizer's master copies); the GradScaler's
    state goes into train_state.json. The files go to ``folder.<run id>.part`` first; the rename to
    ``folder`` happens only once all are written, so a crash leaves the previous checkpoint
    as the newest complete one, and its leftovers are known as the run's own.
    """
    run_id = run_id or new_run_id()
    partial, previous = f'{folder}.{run_id}.part', f'{folder}.{run_id}.old'
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash of this run's same save
    os.makedirs(partial)
    weights = float32_state_dict(model, optimizer)
    save_state(weights, os.path.join(partial, 'model.pdparams'))
    if safetensors:
        save_state(weights, os.path.join(partial, 'model.safetensors'))
    save_state(optimizer_state_by_structure(model, optimizer), os.path.join(partial, 'model.pdopt'))
    state = dict(state, run_id=run_id)
    if scaler_state(scaler):
        state['grad_scaler'] = scaler_state(scaler)
    with open(os.path.join(partial, STATE_FILE), 'w') as f:
        json.dump(json_ready(state), f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes the checkpoint the newest
    if os.path.isdir(folder):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)


def read_train_state(folder):
    """The train state saved with a checkpoint folder (iteration, seed, best score, run id...); a missing or
    damaged train_state.json ends in one ``CheckpointError`` naming it."""
    state_file = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    try:
        state = load_json(state_file, "a checkpoint's train state")
    except UnreadableFile as err:
        raise CheckpointError(str(err)) from None
    problem = _train_state_problem(state)
    if problem:
        raise CheckpointError(f"{state_file} is not a checkpoint's train state: {problem}")
    return state


def _train_state_problem(state):
    """What makes a parsed train_state.json unusable for resuming and pruning, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a mapping"
    for key in ('iter', 'seed'):
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) or state[key] < 0:
            return f"it has no whole-number '{key}'"
    best = state.get('best', {'miou': -1.0, 'iter': -1})
    if not (isinstance(best, dict) and isinstance(best.get('miou'), (int, float)) and not isinstance(best['miou'], bool)
            and type(best.get('iter')) is int):
        return "its 'best' is not a mapping of a number 'miou' and a whole-number 'iter'"
    for key in ('data_order', 'grad_scaler', 'evaluation'):
        if not isinstance(state.get(key, {}), dict):
            return f"its '{key}' is not a mapping"
    run_id = state.get('run_id')
    if 'run_id' in state and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        return "its 'run_id' is not 32 hexadecimal digits"  # it names the run's leftovers: never a path
    return None


def load_checkpoint(folder, model, optimizer, scaler=None):
    """Restore model, optimizer (with its lr schedule and any master weights), EM bases and the
    GradScaler's loss scale from a checkpoint folder."""
    load_weights(model, os.path.join(folder, 'model.pdparams'))
    optimizer_file = os.path.join(folder, 'model.pdopt')
    load_optimizer_state(model, optimizer, read_state(optimizer_file), source=optimizer_file)
    saved_scaler = read_train_state(folder).get('grad_scaler')
    if scaler is not None and saved_scaler:
        scaler.load_state_dict(saved_scaler)
