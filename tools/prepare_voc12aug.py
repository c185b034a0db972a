"""Write VOC2012's SegmentationClassAug and aug.txt from SBD:
python tools/prepare_voc12aug.py --voc_root data/VOCdevkit --sbd_root data/benchmark_RELEASE"""
import argparse

from cli import run_cli
from emanet.data.prepare_voc import make_voc12_aug


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--voc_root', default='data/VOCdevkit', help='the VOCdevkit folder, holding VOC2012')
    parser.add_argument('--sbd_root', default='data/benchmark_RELEASE', help='the SBD folder, holding dataset/cls')
    parser.add_argument('--workers', type=int, help='processes converting in parallel (default: CPUs, at most 4)')
    return parser.parse_args(argv)


def main(args):
    counts = make_voc12_aug(args.voc_root, args.sbd_root, workers=args.workers)
    print(f'VOC12 aug under {args.voc_root}/VOC2012: {counts.written} labels written, {counts.skipped} already '
          f'up to date, {counts.missing_images} without a JPEG left out; aug.txt lists {counts.aug_names} images.')


if __name__ == '__main__':
    run_cli(main, parse_args())
