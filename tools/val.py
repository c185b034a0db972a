"""Evaluate a model: python tools/val.py --config CFG --model_path PATH_OR_URL [--aug_eval --flip_horizontal ...]

--model_path may also be a folder written by tools/export.py: the exported model is then
evaluated through Paddle Inference (oneDNN on CPU), with --precision fp32 or bf16.
"""
import argparse

from cli import add_model_flags, run_cli, segmenter_from_args
from emanet.config import Builder
from emanet.deploy.exported import ExportedSegmenter
from emanet.engine.evaluate import evaluate
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument('--num_workers', type=int, default=0, help='data loader processes')
    parser.add_argument('--save_json', help='also write the metrics to this JSON file')
    return parser.parse_args(argv)


def main(args):
    cfg, segmenter = segmenter_from_args(args)
    note = None
    not_applied = [key for key, value in cfg.test_config.items() if value]
    if isinstance(segmenter, ExportedSegmenter) and not_applied:
        note = f"exported model: test_config {', '.join(not_applied)} not applied"
        logger.warning("Exported model: test_config %s not applied; it is evaluated as exported "
                       "(one scale, no flip, whole image)", ', '.join(not_applied))
    evaluate(segmenter, Builder(cfg).val_dataset, num_workers=args.num_workers, save_json=args.save_json, note=note)


if __name__ == '__main__':
    run_cli(main, parse_args())
