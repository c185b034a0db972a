"""Segment images with an exported model: python tools/infer.py --config DIR/deploy.yaml --image_path IMG_OR_DIR
[--is_slide --crop_size W H --stride W H] [--aug_eval --flip_horizontal --scales ...] [--ray [ADDRESS]]
[--bands 3 2 1 --scale MIN MAX | --percentile_stretch LOW HIGH --confidence --output_format geotiff]"""
import argparse
import time

from cli import (add_augment_flags, add_backend_flag, add_device_flag, add_raster_flags, augment_flags,
                 positive_int, raster_options, run_cli)
from emanet.deploy.backends import load_exported
from emanet.deploy.paddle_inference import PRECISIONS
from emanet.engine.predict import predict_images
from emanet.errors import InvalidInput, Unsupported
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
    parser.add_argument('--ray', nargs='?', const='', metavar='ADDRESS',
                        help="run on a Ray cluster (pip install 'emanet-paddle[ray]'): 'auto', ray://host:port or "
                             "host:port; without ADDRESS as ray.init() finds or starts one. Resumes: images whose "
                             "results are present are skipped (docs/ray.md)")
    parser.add_argument('--ray_actors', type=positive_int, help="with --ray: models run at once (default one per "
                                                                "CPU of the cluster)")
    parser.add_argument('--fail_fast', action='store_true', help="with --ray: stop at the first image that fails "
                                                                 "(by default the others go on and it is listed)")
    return parser.parse_args(argv)


def main(args):
    options = InferenceOptions.from_config(**augment_flags(args))
    if args.ray is not None:
        return run_on_ray(args, options)
    if args.ray_actors or args.fail_fast:
        raise InvalidInput("--ray_actors and --fail_fast apply to a run on Ray: add --ray")
    segmenter = load_exported(args.config, backend=args.backend, device=args.device, precision=args.precision,
                              cpu_threads=args.cpu_threads, options=options)
    start = time.perf_counter()
    count = predict_images(segmenter, args.image_path, args.save_dir, palette=segmenter.deploy.get('palette'),
                           output_format=args.output_format,
                           raster_options=raster_options(args))
    seconds = time.perf_counter() - start
    logger.info("Predicted %d images in %.1f s (%.2f images/s); masks in %s/pseudo_color_prediction, overlays in "
                "%s/added_prediction", count, seconds, count / seconds, args.save_dir, args.save_dir)


def run_on_ray(args, options):
    from emanet.integrations.ray import infer_on_ray
    if args.device != 'cpu':
        raise Unsupported(f"--ray runs its models on the cluster's CPUs; --device {args.device} is not supported with it")
    report = infer_on_ray(args.config, args.image_path, args.save_dir, address=args.ray or None,
                          actors=args.ray_actors, backend=args.backend, precision=args.precision,
                          cpu_threads=args.cpu_threads, options=options, fail_fast=args.fail_fast)
    if report.failed:
        raise InvalidInput(f"{len(report.failed)} of {report.done + len(report.failed)} images could not be "
                           f"labelled (listed above), e.g. {report.failed[0][0]}")


if __name__ == '__main__':
    run_cli(main, parse_args())
