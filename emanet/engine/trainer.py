"""The training loop: PaddleSeg's config and components, a loop that works on Paddle 3.

One call, ``train(cfg, ...)``, runs single-process or data-parallel (under
``python -m paddle.distributed.launch``), on CPU or GPU, in fp32, fp16 or bf16.
Checkpoints hold everything needed to continue exactly where a run stopped.
"""
import json
import math
import os
import random
import shutil
import time

import numpy as np
import paddle
import paddle.distributed as dist

from emanet.checkpoint import (float32_state_dict, load_optimizer_state, load_weights,
                               optimizer_state_by_structure, read_state, save_state)
from emanet.config import Builder
from emanet.data.loading import ResumableBatchSampler, TrainSamples, collate_train, running_loader
from emanet.engine.distributed import (average_batch_norm_statistics, average_gradients, data_parallel,
                                       wait_for_peers)
from emanet.engine.attention import log_attention_pictures
from emanet.engine.evaluate import evaluate
from emanet.engine.metrics import json_ready
from emanet.engine.inference import ModelSegmenter
from emanet.errors import InvalidInput, Unsupported, UserError
from emanet.logger import logger
from emanet.models import EMAU
from emanet.runtime import set_device
from emanet.segmenter import InferenceOptions

CHECKPOINT_PREFIX = 'iter_'
STATE_FILE = 'train_state.json'


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


def scaler_state(scaler):
    """A GradScaler's state as plain JSON values ({} without a scaler or when it is disabled)."""
    state = scaler.state_dict() if scaler is not None else {}
    return {key: np.asarray(value).tolist() if key == 'scale' else value for key, value in state.items()}


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


def find_latest_checkpoint(save_dir):
    """The newest complete iter_N folder in save_dir, or None."""
    if not os.path.isdir(save_dir):
        return None
    iters = [int(name[len(CHECKPOINT_PREFIX):]) for name in os.listdir(save_dir)
             if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
             and os.path.isfile(os.path.join(save_dir, name, STATE_FILE))]
    return os.path.join(save_dir, f'{CHECKPOINT_PREFIX}{max(iters)}') if iters else None


def save_checkpoint(folder, model, optimizer, state, scaler=None, safetensors=False):
    """Write model.pdparams, model.pdopt and train_state.json (with ``safetensors`` also the weights as
    model.safetensors, a file that cannot carry code) into ``folder`` atomically.

    Weights are saved in float32 (under AMP O2, the optimizer's master copies); the GradScaler's
    state goes into train_state.json. The files go to ``folder.part`` first; the rename to
    ``folder`` happens only once all are written, so a crash leaves the previous checkpoint
    as the newest complete one.
    """
    partial = folder + '.part'
    shutil.rmtree(partial, ignore_errors=True)
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


def remove_old_checkpoints(save_dir, keep):
    iters = sorted(int(name[len(CHECKPOINT_PREFIX):]) for name in os.listdir(save_dir)
                   if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit())
    for it in iters[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(save_dir, f'{CHECKPOINT_PREFIX}{it}'), ignore_errors=True)


def weighted_loss(losses, logits, label):
    """Sum of coef_i * loss_i(logit_i, label), pairing the config's losses with the model's outputs."""
    coefs, types = losses['coef'], losses['types']
    if len(coefs) != len(logits):
        raise InvalidInput(f"the model returns {len(logits)} outputs in training but loss.coef has "
                         f"{len(coefs)} entries; give one coefficient per output")
    parts = [coef * loss(logit, label) for coef, loss, logit in zip(coefs, types, logits)]
    return sum(parts), parts


def format_eta(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train(cfg, save_dir='output', device='cpu', num_workers=0, do_eval=False, use_vdl=False,
          resume_model=None, save_interval=1000, log_iters=10, keep_checkpoint_max=5, seed=None,
          precision='fp32', amp_level='O1', eval_options=InferenceOptions(), log_attention=False,
          save_safetensors=False):
    """Train the model of a loaded config (``emanet.config.load_config``) and return the final model.

    Checkpoints land in ``save_dir/iter_N`` every ``save_interval`` iterations (and at the
    end); with ``do_eval`` each is evaluated (with ``eval_options``, the config's test_config)
    and the best by mIoU is copied to ``save_dir/best_model``. ``resume_model`` is an iter_N
    folder, or 'latest'. With ``log_attention`` (and ``use_vdl``, ``do_eval``) each evaluation also
    puts pictures of the EM unit's attention on the first val images into VisualDL. With
    ``save_safetensors`` best_model/ and the last iteration's folder also hold model.safetensors.
    """
    if log_attention and not (use_vdl and do_eval):
        raise InvalidInput("log_attention puts pictures into VisualDL at each evaluation: it needs use_vdl and do_eval")
    device = set_device(device)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    autocast, use_scaler = amp_settings(precision, device, amp_level)

    start_iter, best, saved = 0, {'miou': -1.0, 'iter': -1}, None
    if resume_model == 'latest':
        resume_model = find_latest_checkpoint(save_dir)
        if resume_model is None:
            logger.warning("--resume_model latest: no checkpoint in %s; starting from scratch", save_dir)
    if resume_model:
        saved = read_train_state(resume_model)
        if seed is not None and seed != saved['seed']:
            logger.warning("Resuming with the checkpoint's seed %d, not --seed %d", saved['seed'], seed)
        start_iter, seed, best = saved['iter'], saved['seed'], saved['best']
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    # Seeded before the model is built, so a seed fixes the initial weights too.
    paddle.seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)

    builder = Builder(cfg)
    model = builder.model
    train_dataset = builder.train_dataset
    val_dataset = builder.val_dataset if do_eval else None
    losses = builder.loss
    optimizer = builder.optimizer
    lr_scheduler = builder.lr_scheduler
    total_iters, batch_size = cfg.iters, cfg.batch_size
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024) if use_scaler else None
    data_order = data_order_settings(len(train_dataset), batch_size, world_size, total_iters)
    if resume_model:
        # Into the float32 model, before any O2 cast; the master weights come with the optimizer.
        load_checkpoint(resume_model, model, optimizer, scaler)
        logger.info("Resumed from %s: continuing at iteration %d", resume_model, start_iter + 1)
        if rank == 0:
            warn_if_not_exact_resume(saved.get('data_order'), data_order, resume_model)
    if world_size > 1 and device.startswith('gpu'):
        model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, optimizer = decorate_for_amp(model, optimizer, autocast)
    trained_model = data_parallel(model)

    sampler = ResumableBatchSampler(len(train_dataset), batch_size, total_iters, seed,
                                    start_iter=start_iter, rank=rank, world_size=world_size)
    loader = paddle.io.DataLoader(TrainSamples(train_dataset, seed), batch_sampler=sampler,
                                  collate_fn=collate_train, num_workers=num_workers, return_list=True,
                                  persistent_workers=num_workers > 0)
    writer = None
    if use_vdl and rank == 0:
        from visualdl import LogWriter
        writer = LogWriter(save_dir)
    os.makedirs(save_dir, exist_ok=True)

    if rank == 0:
        logger.info("Training %s for %d iterations (%d images, batch %d x %d processes) on %s, %s, seed %d",
                    type(model).__name__, total_iters, len(train_dataset), batch_size, world_size,
                    device, precision, seed)
    model.train()
    window = {'loss': 0.0, 'batch': 0.0, 'reader': 0.0, 'n': 0}
    tic = time.time()
    with running_loader(loader) as batches:
        for iteration, (images, labels) in enumerate(batches, start=start_iter + 1):
            reader_cost = time.time() - tic
            paddle.seed(seed + iteration)  # dropout masks depend on the iteration only, for exact resume
            if autocast is not None:
                with paddle.amp.auto_cast(**autocast):
                    logits = trained_model(images)
            else:
                logits = trained_model(images)
            loss, _ = weighted_loss(losses, logits, labels)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at iteration {iteration}; stopped. The last "
                                       f"good checkpoint is {find_latest_checkpoint(save_dir) or 'none'}")
            if scaler is not None:
                scaler.scale(loss).backward()
                average_gradients(trained_model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                average_gradients(trained_model)
                optimizer.step()
            optimizer.clear_grad()
            lr = optimizer.get_lr()
            lr_scheduler.step()

            window['loss'] += loss_value
            window['reader'] += reader_cost
            window['batch'] += time.time() - tic
            window['n'] += 1
            # The run's first iteration is logged too, so its ETA comes before the first log_iters wait.
            if (iteration % log_iters == 0 or iteration in (start_iter + 1, total_iters)) and rank == 0:
                n = window['n']
                batch_cost = window['batch'] / n
                logger.info("[TRAIN] epoch: %d, iter: %d/%d, loss: %.4f, lr: %.6f, batch_cost: %.4f, "
                            "reader_cost: %.5f, ips: %.4f samples/sec | ETA %s",
                            sampler.epoch_of(iteration - 1) + 1, iteration, total_iters, window['loss'] / n,
                            lr, batch_cost, window['reader'] / n, batch_size * world_size / batch_cost,
                            format_eta(batch_cost * (total_iters - iteration)))
                if writer is not None:
                    writer.add_scalar('Train/loss', window['loss'] / n, iteration)
                    writer.add_scalar('Train/lr', lr, iteration)
                    writer.add_scalar('Train/batch_cost', batch_cost, iteration)
                window = {'loss': 0.0, 'batch': 0.0, 'reader': 0.0, 'n': 0}

            if iteration % save_interval == 0 or iteration == total_iters:
                # Every rank evaluates its share and saves nothing; rank 0 writes the one checkpoint.
                average_batch_norm_statistics(model)
                evaluation = None
                if do_eval:
                    evaluation = evaluate(ModelSegmenter(model, options=eval_options, autocast=autocast),
                                          val_dataset, num_workers=num_workers)
                    if log_attention and rank == 0:
                        val_transforms = cfg.val_dataset_cfg.get('transforms') or []
                        log_attention_pictures(writer, ModelSegmenter(model, val_transforms, autocast=autocast),
                                               val_dataset, iteration)
                    model.train()
                    if evaluation['miou'] > best['miou']:
                        best = {'miou': evaluation['miou'], 'iter': iteration}
                if rank == 0:
                    state = {'iter': iteration, 'seed': seed, 'best': best, 'data_order': data_order}
                    if evaluation is not None:
                        state['evaluation'] = evaluation
                        if writer is not None:
                            writer.add_scalar('Evaluate/mIoU', evaluation['miou'], iteration)
                            writer.add_scalar('Evaluate/Acc', evaluation['acc'], iteration)
                        if best['iter'] == iteration:
                            save_checkpoint(os.path.join(save_dir, 'best_model'), model, optimizer, state, scaler,
                                            safetensors=save_safetensors)
                        logger.info("[EVAL] The model with the best validation mIoU (%.4f) was saved at iter %d.",
                                    best['miou'], best['iter'])
                    folder = os.path.join(save_dir, f'{CHECKPOINT_PREFIX}{iteration}')
                    save_checkpoint(folder, model, optimizer, state, scaler,
                                    safetensors=save_safetensors and iteration == total_iters)
                    remove_old_checkpoints(save_dir, keep_checkpoint_max)
                # The others wait for process 0's writes here, not in gloo's next all-reduce, which gives
                # up after 30 seconds (a large checkpoint on a slow disk takes longer).
                wait_for_peers()
            tic = time.time()

    if writer is not None:
        writer.close()
    return model
