"""Convert weights to safetensors: python tools/convert_weights.py --src model.pdparams --dst model.safetensors

--src may be a URL, such as a released model of the README's table (downloaded once into the cache).
The pickle is read without running any code; the .safetensors file holds the same keys and the same
tensors, bit for bit, cannot carry code, and loads wherever a .pdparams does (--model_path, pretrained).
"""
import argparse

from cli import run_cli
from emanet.checkpoint import convert_to_safetensors
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, help='the .pdparams file or URL to convert')
    parser.add_argument('--dst', required=True, help='the .safetensors file to write')
    return parser.parse_args(argv)


def main(args):
    count = convert_to_safetensors(args.src, args.dst)
    logger.info("Wrote the %d tensors of %s to %s", count, args.src, args.dst)


if __name__ == '__main__':
    run_cli(main, parse_args())
