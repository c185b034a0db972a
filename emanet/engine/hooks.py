"""What runs beside the optimization in ``emanet.engine.trainer.train``: hooks at fixed points of its loop.

The loop calls every hook, in the order of the list, at four points:

- ``before_train(run)`` once, when the model, optimizer and loader are ready (resumed if asked);
- ``after_step(run)`` after each optimizer step, with ``run.iteration``, ``run.loss``, ``run.lr``,
  ``run.reader_cost`` and ``run.batch_cost`` (seconds) set;
- ``before_save(run)`` at each checkpoint (every save interval and the last iteration), after the
  processes have averaged their BatchNorm statistics and before the checkpoint is written; what a hook
  puts into ``run.state`` is saved in train_state.json;
- ``after_train(run)`` once, when the last iteration is done (not when training stops with an error).

Every process calls its hooks; a hook that writes files or log lines does so on process 0
(``run.rank == 0``) only. Adding a feature to training is writing a ``HookBase`` subclass and
passing it in ``hooks``. ``default_hooks`` gives the list tools/train.py's flags ask for.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from emanet.config import save_config
from emanet.engine.attention import log_attention_pictures
from emanet.engine.evaluate import evaluate
from emanet.engine.inference import ModelSegmenter
from emanet.errors import InvalidInput
from emanet.logger import logger
from emanet.segmenter import InferenceOptions

NO_BEST = {'miou': -1.0, 'iter': -1}


@dataclass
class TrainingRun:
    """What the hooks see of a training run; the loop updates the fields of the current iteration."""
    cfg: Any  # the loaded config (emanet.config.load_config)
    builder: Any  # its emanet.config.Builder: the datasets
    model: Any  # the model being trained (not the data-parallel wrapper)
    losses: dict  # the config's loss: coef and types
    optimizer: Any
    lr_scheduler: Any
    checkpointer: Any  # emanet.engine.checkpointer.Checkpointer
    sampler: Any  # emanet.data.loading.ResumableBatchSampler: epoch_of(iteration)
    scaler: Any = None  # paddle.amp.GradScaler for fp16
    autocast: Optional[dict] = None  # paddle.amp.auto_cast arguments, None in fp32
    seed: int = 0
    start_iter: int = 0  # the last iteration done before this run (0, or the resumed checkpoint's)
    total_iters: int = 0
    batch_size: int = 0  # images per process
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    data_order: dict = field(default_factory=dict)
    best: dict = field(default_factory=lambda: dict(NO_BEST))  # the best evaluation so far: miou, iter
    iteration: int = 0
    loss: float = 0.0
    lr: float = 0.0
    reader_cost: float = 0.0
    batch_cost: float = 0.0
    state: dict = field(default_factory=dict)  # train_state.json of the checkpoint being saved
    evaluation: Optional[dict] = None  # the metrics of this checkpoint, once evaluated
    scalars: dict = field(default_factory=dict)  # tag -> value, for VisualDL, not yet written

    @property
    def epoch(self):
        """The epoch of the current iteration, from 1."""
        return self.sampler.epoch_of(self.iteration - 1) + 1


class HookBase:
    """Override the points you need; each gets the ``TrainingRun``."""

    def before_train(self, run):
        pass

    def after_step(self, run):
        pass

    def before_save(self, run):
        pass

    def after_train(self, run):
        pass


def format_eta(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class TrainLog(HookBase):
    """The [TRAIN] line every ``log_iters`` iterations, averaged over them, with the ETA; also at the run's
    first iteration (so the ETA comes without waiting ``log_iters``) and its last."""

    def __init__(self, log_iters=10):
        self.log_iters = log_iters

    def before_train(self, run):
        self._start_window()

    def _start_window(self):
        self.window = {'loss': 0.0, 'batch': 0.0, 'reader': 0.0, 'n': 0}

    def after_step(self, run):
        window = self.window
        window['loss'] += run.loss
        window['reader'] += run.reader_cost
        window['batch'] += run.batch_cost
        window['n'] += 1
        if not (run.iteration % self.log_iters == 0 or run.iteration in (run.start_iter + 1, run.total_iters)):
            return
        n = window['n']
        loss, batch_cost = window['loss'] / n, window['batch'] / n
        if run.rank == 0:
            logger.info("[TRAIN] epoch: %d, iter: %d/%d, loss: %.4f, lr: %.6f, batch_cost: %.4f, "
                        "reader_cost: %.5f, ips: %.4f samples/sec | ETA %s",
                        run.epoch, run.iteration, run.total_iters, loss, run.lr, batch_cost, window['reader'] / n,
                        run.batch_size * run.world_size / batch_cost,
                        format_eta(batch_cost * (run.total_iters - run.iteration)))
        run.scalars.update({'Train/loss': loss, 'Train/lr': run.lr, 'Train/batch_cost': batch_cost})
        self._start_window()


class ConfigFile(HookBase):
    """Write the config as loaded to ``path`` when training starts, so only once the save_dir is checked.
    Every process writes it (renaming it into place), so that each machine of a run has it."""

    def __init__(self, path):
        self.path = path

    def before_train(self, run):
        save_config(run.cfg, self.path)


class Evaluation(HookBase):
    """Evaluate on the config's val_dataset at each checkpoint (every process its share), with ``options``
    (the config's test_config); the metrics go to ``run.evaluation``, train_state.json and VisualDL."""

    def __init__(self, options=InferenceOptions()):
        self.options = options

    def before_train(self, run):
        self.dataset = run.builder.val_dataset

    def before_save(self, run):
        segmenter = ModelSegmenter(run.model, options=self.options, autocast=run.autocast)
        run.evaluation = evaluate(segmenter, self.dataset, num_workers=run.num_workers)
        run.model.train()
        run.state['evaluation'] = run.evaluation
        run.scalars.update({'Evaluate/mIoU': run.evaluation['miou'], 'Evaluate/Acc': run.evaluation['acc']})


class BestModel(HookBase):
    """Keep the checkpoint with the best mIoU so far as best_model/ and say which it is. After ``Evaluation``."""

    def before_save(self, run):
        if run.evaluation is None:
            return
        if run.evaluation['miou'] > run.best['miou']:
            run.best = {'miou': run.evaluation['miou'], 'iter': run.iteration}
            run.state['best'] = run.best
            if run.rank == 0:
                run.checkpointer.save_best(run.model, run.optimizer, run.state, run.scaler)
        if run.rank == 0:
            logger.info("[EVAL] The model with the best validation mIoU (%.4f) was saved at iter %d.",
                        run.best['miou'], run.best['iter'])


class VisualDL(HookBase):
    """Write the scalars other hooks report (``run.scalars``) to VisualDL records in ``log_dir``. Put it after them."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.writer = None

    def before_train(self, run):
        if run.rank == 0:
            from visualdl import LogWriter  # imported only when asked for
            self.writer = LogWriter(self.log_dir)

    def after_step(self, run):
        self._write(run)

    def before_save(self, run):
        self._write(run)

    def after_train(self, run):
        if self.writer is not None:
            self.writer.close()

    def _write(self, run):
        for tag, value in run.scalars.items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, run.iteration)
        run.scalars.clear()


class AttentionPictures(HookBase):
    """At each checkpoint, pictures of the EM unit's attention on the first val images, into ``visualdl``'s
    records (a ``VisualDL`` hook of the same run)."""

    def __init__(self, visualdl):
        self.visualdl = visualdl

    def before_save(self, run):
        if run.rank != 0:
            return
        transforms = run.cfg.val_dataset_cfg.get('transforms') or []
        log_attention_pictures(self.visualdl.writer, ModelSegmenter(run.model, transforms, autocast=run.autocast),
                               run.builder.val_dataset, run.iteration)
        run.model.train()


def default_hooks(save_dir, log_iters=10, do_eval=False, eval_options=InferenceOptions(), use_vdl=False,
                  log_attention=False):
    """The hooks of tools/train.py's flags, in the order they need: the [TRAIN] line; with ``do_eval``
    evaluation at each checkpoint and best_model/; with ``use_vdl`` VisualDL records in ``save_dir``; with
    ``log_attention`` (which needs both) attention pictures at each evaluation."""
    if log_attention and not (use_vdl and do_eval):
        raise InvalidInput("log_attention puts pictures into VisualDL at each evaluation: it needs use_vdl and do_eval")
    hooks = [TrainLog(log_iters)]
    visualdl = VisualDL(save_dir) if use_vdl else None
    if do_eval:
        hooks.append(Evaluation(eval_options))
    if log_attention:
        hooks.append(AttentionPictures(visualdl))
    if do_eval:
        hooks.append(BestModel())
    if visualdl is not None:
        hooks.append(visualdl)
    return hooks
