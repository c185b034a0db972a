"""Speed and memory of EMANet, ours against PaddleSeg's: python tools/benchmark.py --json bench.json"""
import argparse
import json
import os
import shlex
import sys

from cli import add_device_flag, positive_int, run_cli
from emanet.config import load_config
from emanet.logger import logger
from perf.measure import model_spec_for_backbone, model_spec_from_config
from perf.report import format_report
from perf.run import PARTS, run_benchmark


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    model = parser.add_mutually_exclusive_group()
    model.add_argument('--config', help='a config whose model (type EMANet) to measure, with random weights')
    model.add_argument('--backbone', default='ResNet50_vd',
                       help='a PaddleSeg backbone under the published EMANet head (the default)')
    parser.add_argument('--num_classes', type=int, help="classes (default: the config's, else 19)")
    parser.add_argument('--input_size', nargs=2, type=int, default=[1024, 512], metavar=('W', 'H'),
                        help='eval input size')
    parser.add_argument('--train_size', nargs=2, type=int, default=[512, 256], metavar=('W', 'H'),
                        help='training crop size')
    parser.add_argument('--train_batch', type=positive_int, default=2, help='images per training step')
    parser.add_argument('--attention_size', nargs=2, type=int, default=[128, 64], metavar=('W', 'H'),
                        help='feature map of the EM unit vs non-local comparison (512 channels)')
    parser.add_argument('--runs', type=positive_int, default=3, help='timed runs per variant and round')
    parser.add_argument('--rounds', type=positive_int, default=3,
                        help='rounds over all variants, in alternating order (the median of every run is reported)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before them')
    parser.add_argument('--threads', type=int, help='CPU math threads for every variant; default every core')
    add_device_flag(parser)
    parser.add_argument('--skip', default='', help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    parser.add_argument('--quickstart_model', help='model.pdparams trained with --quickstart_config: adds '
                                                   'fp32 vs bf16 labels and mIoU on its val images')
    parser.add_argument('--quickstart_config', default='configs/quickstart.yml')
    parser.add_argument('--folder_images', type=positive_int, default=8,
                        help='random images in the folder predicted end to end against the model alone')
    parser.add_argument('--folder_size', nargs=2, type=int, default=[2048, 1024], metavar=('W', 'H'),
                        help="the folder's image size, also the reference of the large images")
    parser.add_argument('--large_sizes', nargs='+', type=positive_int, default=[4096, 16384],
                        help='sides of square images predicted with a sliding window of --input_size (part "large")')
    parser.add_argument('--geotiff_sizes', nargs='*', type=positive_int,
                        help='sides of square tiled GeoTIFFs predicted window by window (part "large"; default 4096 '
                             'when rasterio, the [geo] extra, is installed; 65536 is the 4.3-gigapixel run)')
    parser.add_argument('--ray_images', type=positive_int, default=64,
                        help='images of --input_size labelled on a local Ray cluster of one, then two nodes (part "ray")')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs')
    parser.add_argument('--json', help='write every number to this file')
    return parser.parse_args(argv)


def geotiff_sizes(given):
    """The GeoTIFF rows asked for, else one of 4096 when rasterio is there to read it."""
    if given is not None:
        return given
    try:
        import rasterio  # noqa: F401
    except ImportError:
        logger.info("[BENCH] no GeoTIFF row: reading and writing GeoTIFFs needs pip install emanet-paddle[geo]")
        return []
    return [4096]


def main(args):
    if args.config:
        cfg = load_config(args.config)
        model_spec = model_spec_from_config(cfg, args.num_classes)
        transforms = cfg.val_dataset_cfg.get('transforms')
    else:
        model_spec = model_spec_for_backbone(args.backbone, args.num_classes or 19)
        transforms = None
    skip = [part.strip() for part in args.skip.split(',') if part.strip()]
    command = ' '.join(shlex.quote(arg) for arg in ['python', 'tools/benchmark.py'] + sys.argv[1:])
    results = run_benchmark(model_spec, input_size=args.input_size, train_size=args.train_size,
                            train_batch=args.train_batch, attention_size=args.attention_size, runs=args.runs,
                            rounds=args.rounds, warmup=args.warmup, threads=args.threads, device=args.device, skip=skip,
                            quickstart_model=args.quickstart_model, quickstart_config=args.quickstart_config,
                            transforms=transforms, seed=args.seed, command=command, folder_images=args.folder_images,
                            folder_size=args.folder_size, large_sizes=args.large_sizes,
                            geotiff_sizes=geotiff_sizes(args.geotiff_sizes), ray_images=args.ray_images)
    print(format_report(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    run_cli(main, parse_args())
