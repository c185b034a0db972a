"""Pictures of what the EM unit attends to (its bases and responsibility maps), one per image:
python tools/visualize.py --config CFG --model_path PATH --image_path IMG_OR_DIR --save_dir DIR"""
import argparse
import os

from cli import add_device_flag, add_verbose_flag, load_config_from_args, run_cli, set_device
from emanet.config import Builder, build_model
from emanet.engine.attention import save_attention_pictures
from emanet.engine.inference import ModelSegmenter
from emanet.errors import InvalidInput
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file (model and val_dataset are enough)')
    parser.add_argument('--model_path', required=True, help='model.pdparams file or URL (ours or PaddleSeg\'s)')
    parser.add_argument('--image_path', required=True, help='an image, a folder of images, or a list file')
    parser.add_argument('--save_dir', default='output/attention', help='where the pictures go')
    parser.add_argument('--top', type=int, default=10, help='how many bases to show: those holding most pixels')
    add_device_flag(parser)
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(args):
    if os.path.isdir(args.model_path):
        raise InvalidInput(f"{args.model_path} is a folder: attention maps need the weights (.pdparams), "
                         "not an exported model")
    set_device(args.device)
    cfg = load_config_from_args(args, training=False)
    segmenter = ModelSegmenter(build_model(cfg, weights=args.model_path), cfg.val_dataset_cfg.get('transforms') or [])
    written = save_attention_pictures(segmenter, args.image_path, args.save_dir, top=args.top,
                                      palette=getattr(Builder(cfg).val_dataset_class, 'PALETTE', None))
    logger.info("Wrote %d attention pictures to %s", len(written), args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
