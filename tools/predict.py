"""Predict images: python tools/predict.py --config CFG --model_path PATH --image_path IMG_OR_DIR --save_dir out/"""
import argparse

from emanet.cli import (add_augment_flags, add_device_flag, add_verbose_flag, augment_flags, load_config_from_args,
                        run_cli)
from emanet.config import Builder, build_model
from emanet.engine.evaluate import augment_options
from emanet.engine.predict import predict
from emanet.runtime import set_device
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file')
    parser.add_argument('--model_path', required=True, help='model.pdparams file or URL')
    parser.add_argument('--image_path', required=True, help='an image, a folder of images, or a list file')
    parser.add_argument('--save_dir', default='output/result', help='where the masks and overlays go')
    parser.add_argument('--save_format', default='pseudo_color', choices=['pseudo_color', 'cityscapes'],
                        help="'cityscapes': PNGs of official label ids for the Cityscapes evaluator/server")
    add_device_flag(parser)
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_augment_flags(parser)
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(args):
    set_device(args.device)
    cfg = load_config_from_args(args, training=False)
    model = build_model(cfg, weights=args.model_path)
    builder = Builder(cfg)
    count = predict(model, builder.val_transforms, args.image_path, args.save_dir,
                    palette=getattr(builder.val_dataset_class, 'PALETTE', None), save_format=args.save_format,
                    **augment_options(cfg.test_config, **augment_flags(args)))
    if args.save_format == 'cityscapes':
        logger.info("Predicted %d images; label-id PNGs in %s", count, args.save_dir)
    else:
        logger.info("Predicted %d images; masks in %s/pseudo_color_prediction, overlays in %s/added_prediction",
                    count, args.save_dir, args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
