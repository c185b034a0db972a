"""Evaluate a model: python tools/val.py --config CFG --model_path PATH_OR_URL [--aug_eval --flip_horizontal ...]

--model_path may also be a folder written by tools/export.py: the exported model is then evaluated
in its runtime (--backend, --precision), with the same flips, scales and sliding window.
"""
import argparse

from cli import add_model_flags, inference_options, run_cli, segmenter_from_args
from emanet.config import Builder
from emanet.engine.evaluate import evaluate


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument('--num_workers', type=int, default=0, help='data loader processes')
    parser.add_argument('--save_json', help='also write the metrics to this JSON file')
    return parser.parse_args(argv)


def main(args):
    cfg, segmenter = segmenter_from_args(args)
    note = None
    if inference_options(args, cfg) != segmenter.options:
        note = f"exported model (output_op {segmenter.output_op}): test_config not applied"
    evaluate(segmenter, Builder(cfg).val_dataset, num_workers=args.num_workers, save_json=args.save_json, note=note)


if __name__ == '__main__':
    run_cli(main, parse_args())
