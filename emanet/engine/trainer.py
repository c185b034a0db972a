"""The training loop: PaddleSeg's config and components, a loop that works on Paddle 3.

One call, ``train(cfg, ...)``, runs single-process or data-parallel (under
``python -m paddle.distributed.launch``), on CPU or GPU, in fp32, fp16 or bf16. The loop does the
optimization and saves a checkpoint every save interval (through ``emanet.engine.checkpointer``,
holding everything needed to continue exactly where a run stopped); everything else, the [TRAIN]
line, evaluation, best_model/, VisualDL, are hooks at fixed points of it (``emanet.engine.hooks``).
"""
import math
import os
import random
import time

import numpy as np
import paddle
import paddle.distributed as dist

from emanet.config import Builder
from emanet.data.loading import ResumableBatchSampler, TrainSamples, collate_train, running_loader
from emanet.engine.checkpointer import Checkpointer, data_order_settings
from emanet.engine.distributed import (average_batch_norm_statistics, average_gradients, data_parallel,
                                       wait_for_peers)
from emanet.engine.hooks import NO_BEST, TrainingRun, TrainLog
from emanet.errors import InvalidInput, Unsupported, UserError
from emanet.logger import logger
from emanet.models import EMAU
from emanet.device import set_device


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


def amp_settings(precision, device, amp_level='O1'):
    """(auto_cast kwargs or None, needs a GradScaler) for --precision, refusing what Paddle can't do here."""
    if precision == 'fp32':
        return None, False
    if precision not in ('fp16', 'bf16'):
        raise InvalidInput(f"--precision must be fp32, fp16 or bf16, got '{precision}'")
    if amp_level not in ('O1', 'O2'):
        raise InvalidInput(f"--amp_level must be O1 or O2, got '{amp_level}'")
    if device.startswith('cpu'):
        raise Unsupported(f"--precision {precision} needs a GPU: Paddle's automatic mixed precision "
                           "does nothing on CPU, use --precision fp32 there")
    dtype = 'float16' if precision == 'fp16' else 'bfloat16'
    return {'dtype': dtype, 'level': amp_level}, precision == 'fp16'


def decorate_for_amp(model, optimizer, autocast):
    """For AMP O2: the model's weights in fp16/bf16 with float32 master copies in the optimizer.

    The EM units stay in float32 (their bases are a moving average that half precision would
    stall), as do the norm layers (Paddle's own default). O1 and fp32 change nothing.
    """
    if autocast is None or autocast['level'] != 'O2':
        return model, optimizer
    return paddle.amp.decorate(models=model, optimizers=optimizer, level='O2', dtype=autocast['dtype'],
                               master_weight=True, excluded_layers=[EMAU])


def weighted_loss(losses, logits, label):
    """Sum of coef_i * loss_i(logit_i, label), pairing the config's losses with the model's outputs."""
    coefs, types = losses['coef'], losses['types']
    if len(coefs) != len(logits):
        raise InvalidInput(f"the model returns {len(logits)} outputs in training but loss.coef has "
                         f"{len(coefs)} entries; give one coefficient per output")
    parts = [coef * loss(logit, label) for coef, loss, logit in zip(coefs, types, logits)]
    return sum(parts), parts


def train(cfg, save_dir=None, hooks=None, checkpointer=None, resume_model=None, save_interval=1000, seed=None,
          device='cpu', num_workers=0, precision='fp32', amp_level='O1'):
    """Train the model of a loaded config (``emanet.config.load_config``) and return the final model.

    Every ``save_interval`` iterations and at the last one, ``checkpointer`` writes ``iter_N``
    (by default ``Checkpointer(save_dir)``: in save_dir, 'output' if not given, keeping the newest 5);
    ``resume_model`` is such a folder, or 'latest'; the run continues that checkpoint's run. A new run
    into a save_dir holding another run's checkpoints is refused before any work, in one sentence
    (``Checkpointer.start_run``). Without a ``seed`` a random one is drawn (and saved).
    Everything besides the optimization comes from ``hooks`` (``emanet.engine.hooks``; by default the
    [TRAIN] line every 10 iterations; ``default_hooks`` adds evaluation, best_model/ and VisualDL).
    """
    checkpointer = checkpointer_for(save_dir, checkpointer)
    hooks = [TrainLog()] if hooks is None else list(hooks)
    device = set_device(device)
    autocast, use_scaler = amp_settings(precision, device, amp_level)
    resume_folder, saved = checkpointer.start_run(resume_model, iters=cfg.iters, save_interval=save_interval)
    seed = seed_everything(saved, seed)  # before the model is built, so a seed fixes the initial weights too
    run, loader = prepare_run(cfg, checkpointer, seed, saved, autocast, use_scaler, num_workers)
    if resume_folder:  # into the float32 model, before any O2 cast; the master weights come with the optimizer
        checkpointer.resume(resume_folder, run.model, run.optimizer, run.scaler, run.data_order, warn=run.rank == 0)
    if run.world_size > 1 and device.startswith('gpu'):
        run.model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    run.model, run.optimizer = decorate_for_amp(run.model, run.optimizer, autocast)
    trained_model = data_parallel(run.model)
    os.makedirs(checkpointer.save_dir, exist_ok=True)
    if run.rank == 0:
        logger.info("Training %s for %d iterations (%d images, batch %d x %d processes) on %s, %s, seed %d",
                    type(run.model).__name__, run.total_iters, run.data_order['train_images'], run.batch_size,
                    run.world_size, device, precision, seed)
    run.model.train()
    for hook in hooks:
        hook.before_train(run)
    tic = time.time()
    with running_loader(loader) as batches:
        for iteration, (images, labels) in enumerate(batches, start=run.start_iter + 1):
            run.iteration, run.reader_cost = iteration, time.time() - tic
            paddle.seed(seed + iteration)  # dropout masks depend on the iteration only, for exact resume
            optimization_step(run, trained_model, images, labels)
            run.batch_cost = time.time() - tic
            for hook in hooks:
                hook.after_step(run)
            if iteration % save_interval == 0 or iteration == run.total_iters:
                checkpoint_iteration(run, hooks)
            tic = time.time()
    for hook in hooks:
        hook.after_train(run)
    return run.model


def checkpointer_for(save_dir, checkpointer):
    """``checkpointer``, or a default one in ``save_dir``; both must name the same folder."""
    if checkpointer is None:
        return Checkpointer(save_dir or 'output')
    if save_dir is not None and os.path.abspath(save_dir) != os.path.abspath(checkpointer.save_dir):
        raise InvalidInput(f"save_dir {save_dir} is not the checkpointer's folder {checkpointer.save_dir}: "
                           "give one of them")
    return checkpointer


def seed_everything(saved, seed):
    """The run's seed (a resumed checkpoint's, else ``seed`` or a random one), given to paddle, numpy and random."""
    if saved and seed is not None and seed != saved['seed']:
        logger.warning("Resuming with the checkpoint's seed %d, not --seed %d", saved['seed'], seed)
    seed = saved['seed'] if saved else seed
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    paddle.seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    return seed


def prepare_run(cfg, checkpointer, seed, saved, autocast, use_scaler, num_workers):
    """The ``TrainingRun`` (model, optimizer, GradScaler, sampler, resumed iteration and best score) and the
    loader of this process's batches."""
    builder = Builder(cfg)
    model, train_dataset = builder.model, builder.train_dataset
    losses, optimizer, lr_scheduler = builder.loss, builder.optimizer, builder.lr_scheduler
    world_size, rank = dist.get_world_size(), dist.get_rank()
    start_iter = saved.get('iter', 0)
    sampler = ResumableBatchSampler(len(train_dataset), cfg.batch_size, cfg.iters, seed,
                                    start_iter=start_iter, rank=rank, world_size=world_size)
    loader = paddle.io.DataLoader(TrainSamples(train_dataset, seed), batch_sampler=sampler,
                                  collate_fn=collate_train, num_workers=num_workers, return_list=True,
                                  persistent_workers=num_workers > 0)
    run = TrainingRun(cfg=cfg, builder=builder, model=model, losses=losses, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, checkpointer=checkpointer, sampler=sampler, autocast=autocast,
                      scaler=paddle.amp.GradScaler(init_loss_scaling=1024) if use_scaler else None, seed=seed,
                      start_iter=start_iter, total_iters=cfg.iters, batch_size=cfg.batch_size, rank=rank,
                      world_size=world_size, num_workers=num_workers, best=saved.get('best', dict(NO_BEST)),
                      data_order=data_order_settings(len(train_dataset), cfg.batch_size, world_size, cfg.iters))
    return run, loader


def optimization_step(run, trained_model, images, labels):
    """Forward, loss, backward (gradients averaged over the processes), optimizer and lr step: sets
    ``run.loss`` and ``run.lr`` (the rate this step used)."""
    if run.autocast is not None:
        with paddle.amp.auto_cast(**run.autocast):
            logits = trained_model(images)
    else:
        logits = trained_model(images)
    loss, _ = weighted_loss(run.losses, logits, labels)
    run.loss = float(loss)
    if not math.isfinite(run.loss):
        raise TrainingDiverged(f"loss is {run.loss} at iteration {run.iteration}; stopped. The last "
                               f"good checkpoint is {run.checkpointer.latest() or 'none'}")
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        average_gradients(trained_model)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        average_gradients(trained_model)
        run.optimizer.step()
    run.optimizer.clear_grad()
    run.lr = run.optimizer.get_lr()
    run.lr_scheduler.step()


def checkpoint_iteration(run, hooks):
    """A checkpoint: every process averages its BatchNorm statistics and runs the before_save hooks
    (evaluation, each its share); process 0 writes iter_N, the others wait for it."""
    average_batch_norm_statistics(run.model)
    run.state = {'iter': run.iteration, 'seed': run.seed, 'best': run.best, 'data_order': run.data_order}
    run.evaluation = None
    for hook in hooks:
        hook.before_save(run)
    if run.rank == 0:
        run.checkpointer.save(run.iteration, run.model, run.optimizer, run.state, run.scaler,
                              final=run.iteration == run.total_iters)
    # The others wait for process 0's writes here, not in gloo's next all-reduce, which gives
    # up after 30 seconds (a large checkpoint on a slow disk takes longer).
    wait_for_peers()
