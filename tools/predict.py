"""Predict images: python tools/predict.py --config CFG --model_path PATH --image_path IMG_OR_DIR --save_dir out/"""
import argparse

from cli import add_model_flags, add_raster_flags, raster_options, run_cli, segmenter_from_args
from emanet.config import Builder
from emanet.engine.predict import predict_images
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_flags(parser)
    parser.add_argument('--image_path', required=True, help='an image, a folder of images, or a list file')
    parser.add_argument('--save_dir', default='output/result', help='where the masks and overlays go')
    parser.add_argument('--save_format', default='pseudo_color', choices=['pseudo_color', 'cityscapes'],
                        help="'cityscapes': PNGs of official label ids for the Cityscapes evaluator/server")
    add_raster_flags(parser)
    return parser.parse_args(argv)


def main(args):
    cfg, segmenter = segmenter_from_args(args)
    dataset_class = Builder(cfg).val_dataset_class
    count = predict_images(segmenter, args.image_path, args.save_dir,
                           palette=getattr(dataset_class, 'PALETTE', None), save_format=args.save_format,
                           label_ids=getattr(dataset_class, 'LABEL_IDS', None), output_format=args.output_format,
                           raster_options=raster_options(args))
    if args.save_format == 'cityscapes':
        logger.info("Predicted %d images; label-id PNGs in %s", count, args.save_dir)
    else:
        logger.info("Predicted %d images; masks in %s/pseudo_color_prediction, overlays in %s/added_prediction",
                    count, args.save_dir, args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
