"""Train a model from a PaddleSeg-style config: python tools/train.py --config configs/quickstart.yml --do_eval"""
import argparse
import os

from cli import (add_device_flag, add_paddleseg_train_flags, add_verbose_flag, flags_without_effect,
                 load_config_from_args, positive_int, run_cli, set_device)
from emanet.engine.checkpointer import Checkpointer, folder_for_new_run
from emanet.engine.hooks import ConfigFile, default_hooks
from emanet.engine.trainer import train
from emanet.errors import InvalidInput
from emanet.logger import ignore_warnings, logger
from emanet.segmenter import InferenceOptions

# Paddle's BatchNorm warns at its first training step that it tracks running statistics: nothing to act on.
BATCH_NORM_NOTE = 'When training, we now always track global mean and variance'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file')
    add_device_flag(parser, help='where to train')
    parser.add_argument('--save_dir', default='output', help='folder for checkpoints, logs and config.yml')
    parser.add_argument('--num_workers', type=int, default=0, help='data loader processes')
    parser.add_argument('--do_eval', action='store_true', help='evaluate at every save and keep best_model/')
    parser.add_argument('--use_vdl', action='store_true', help='write VisualDL scalars to save_dir')
    parser.add_argument('--log_attention', action='store_true',
                        help='with --use_vdl --do_eval: at each evaluation, pictures of the EM unit\'s attention '
                             'on the first val images in VisualDL')
    parser.add_argument('--resume_model', help="an iter_N checkpoint folder to continue from, or 'latest'")
    parser.add_argument('--new_run', action='store_true',
                        help="start a new run beside the checkpoints of an earlier one in --save_dir: in the first "
                             "of <save_dir>-2, <save_dir>-3, ... that holds none (without it, such a --save_dir "
                             "is refused)")
    parser.add_argument('--iters', type=positive_int, help='override the config: total iterations')
    parser.add_argument('--batch_size', type=positive_int, help='override the config: images per process')
    parser.add_argument('--learning_rate', type=float, help='override the config: base learning rate')
    parser.add_argument('--save_interval', type=positive_int, default=1000, help='iterations between checkpoints')
    parser.add_argument('--log_iters', type=positive_int, default=10,
                        help='iterations between log lines (the first iteration is logged too, with the ETA)')
    parser.add_argument('--keep_checkpoint_max', type=int, default=5, help='iter_N folders to keep')
    parser.add_argument('--seed', type=int, help='random seed (default: a random one, saved for resuming)')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'fp16', 'bf16'],
                        help='fp16 or bf16: automatic mixed precision, on GPU only (Paddle does none on CPU)')
    parser.add_argument('--amp_level', default='O1', choices=['O1', 'O2'],
                        help='with --precision fp16/bf16: O1 casts operator by operator, O2 also casts the '
                             'weights (BatchNorm stays fp32)')
    parser.add_argument('--save_safetensors', action='store_true',
                        help='also write best_model/ and the final weights as model.safetensors (no pickle, '
                             'cannot carry code; loads wherever a .pdparams does)')
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value, e.g. model.num_bases=32')
    add_verbose_flag(parser)
    add_paddleseg_train_flags(parser)
    return parser.parse_args(argv)


def main(args):
    for note in flags_without_effect(args):
        logger.warning(note)
    if args.new_run and args.resume_model:
        raise InvalidInput("--new_run starts a new run and --resume_model continues one: give one of them")
    cfg = load_config_from_args(args)
    save_dir = folder_for_new_run(args.save_dir) if args.new_run else args.save_dir
    # Nothing is written into save_dir before train() has checked it holds no other run's checkpoints.
    hooks = [ConfigFile(os.path.join(save_dir, 'config.yml')),
             *default_hooks(save_dir, log_iters=args.log_iters, do_eval=args.do_eval,
                            eval_options=InferenceOptions.from_config(cfg.test_config), use_vdl=args.use_vdl,
                            log_attention=args.log_attention)]
    checkpointer = Checkpointer(save_dir, keep=args.keep_checkpoint_max, safetensors=args.save_safetensors)
    set_device(args.device)  # with the CPU allocator tuned (the library leaves it alone)
    with ignore_warnings(BATCH_NORM_NOTE):
        return train(cfg, hooks=hooks, checkpointer=checkpointer, resume_model=args.resume_model,
                     save_interval=args.save_interval, seed=args.seed, device=args.device,
                     num_workers=args.num_workers, precision=args.precision, amp_level=args.amp_level)


if __name__ == '__main__':
    run_cli(main, parse_args())
