"""Evaluate a model: python tools/val.py --config CFG --model_path PATH_OR_URL [--aug_eval --flip_horizontal ...]

--model_path may also be a folder written by tools/export.py: the exported model is then
evaluated through Paddle Inference (oneDNN on CPU), with --precision fp32 or bf16.
"""
import os

import argparse

from emanet.cli import (add_augment_flags, add_device_flag, add_verbose_flag, augment_flags, load_config_from_args,
                        run_cli)
from emanet.config import Builder, build_model
from emanet.deploy.predictor import Predictor, evaluate_predictor
from emanet.engine.evaluate import augment_options, evaluate
from emanet.logger import logger
from emanet.runtime import set_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file')
    parser.add_argument('--model_path', required=True,
                        help='model.pdparams file or URL, or a folder written by tools/export.py')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                        help='for an exported model: bf16 on CPU (oneDNN), fp16 on GPU')
    add_device_flag(parser)
    parser.add_argument('--num_workers', type=int, default=0, help='data loader processes')
    parser.add_argument('--save_json', help='also write the metrics to this JSON file')
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_augment_flags(parser)
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(args):
    set_device(args.device)
    cfg = load_config_from_args(args, training=False)
    if os.path.isdir(args.model_path):
        augment = {k: v for k, v in augment_flags(args).items() if v}
        if augment:
            raise ValueError(f"an exported model is evaluated as exported; drop {', '.join('--' + k for k in augment)}")
        not_applied = [key for key, value in cfg.test_config.items() if value]
        if not_applied:
            logger.warning("Exported model: test_config %s not applied; it is evaluated as exported "
                           "(one scale, no flip, whole image)", ', '.join(not_applied))
        predictor = Predictor(args.model_path, device=args.device, precision=args.precision)
        evaluate_predictor(predictor, Builder(cfg).val_dataset, save_json=args.save_json)
        return
    model = build_model(cfg, weights=args.model_path)
    dataset = Builder(cfg).val_dataset
    evaluate(model, dataset, num_workers=args.num_workers, save_json=args.save_json,
             **augment_options(cfg.test_config, **augment_flags(args)))


if __name__ == '__main__':
    run_cli(main, parse_args())
