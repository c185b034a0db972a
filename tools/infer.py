"""Segment images with an exported model: python tools/infer.py --config DIR/deploy.yaml --image_path IMG_OR_DIR
[--is_slide --crop_size W H --stride W H] [--aug_eval --flip_horizontal --scales ...]
[--bands 3 2 1 --scale MIN MAX | --percentile_stretch LOW HIGH --confidence --output_format geotiff]"""
import argparse
import time

from cli import (add_augment_flags, add_backend_flag, add_device_flag, add_raster_flags, augment_flags,
                 raster_options, run_cli)
from emanet.deploy.backends import load_exported
from emanet.deploy.paddle_inference import PRECISIONS
from emanet.engine.predict import predict_images
from emanet.logger import logger
from emanet.test_time import InferenceOptions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='deploy.yaml written by tools/export.py, or its folder')
    parser.add_argument('--image_path', required=True, help='an image, a folder of images, or a list file')
    parser.add_argument('--save_dir', default='output/result', help='where the masks and overlays go')
    add_device_flag(parser)
    add_backend_flag(parser)
    parser.add_argument('--precision', default='fp32', choices=PRECISIONS,
                        help='bf16 on a CPU that has it (oneDNN, OpenVINO), fp16 on GPU (Paddle Inference)')
    parser.add_argument('--cpu_threads', type=int, default=None, help='math threads on CPU; default every core')
    add_augment_flags(parser)
    add_raster_flags(parser)
    return parser.parse_args(argv)


def main(args):
    options = InferenceOptions.from_config(**augment_flags(args))
    segmenter = load_exported(args.config, backend=args.backend, device=args.device, precision=args.precision,
                              cpu_threads=args.cpu_threads, options=options)
    start = time.perf_counter()
    count = predict_images(segmenter, args.image_path, args.save_dir, palette=segmenter.deploy.get('palette'),
                           output_format=args.output_format,
                           raster_options=raster_options(args))
    seconds = time.perf_counter() - start
    logger.info("Predicted %d images in %.1f s (%.2f images/s); masks in %s/pseudo_color_prediction, overlays in "
                "%s/added_prediction", count, seconds, count / seconds, args.save_dir, args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
