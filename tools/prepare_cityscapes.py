"""Write Cityscapes' *_gtFine_labelTrainIds.png: python tools/prepare_cityscapes.py --dataset_root data/cityscapes"""
import argparse

from cli import run_cli
from emanet.data.prepare_cityscapes import SOURCES, SPLITS, make_train_ids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--dataset_root', default='data/cityscapes', help='the folder holding gtFine')
    parser.add_argument('--splits', nargs='+', default=list(SPLITS), help='folders of gtFine to convert')
    parser.add_argument('--workers', type=int, help='processes converting in parallel (default: CPUs, at most 4)')
    parser.add_argument('--source', default='auto', choices=SOURCES,
                        help='map *_gtFine_labelIds.png or render *_gtFine_polygons.json (auto: the PNGs if present)')
    return parser.parse_args(argv)


def main(args):
    counts = make_train_ids(args.dataset_root, splits=args.splits, workers=args.workers, source=args.source)
    print(f'Cityscapes trainIds under {args.dataset_root}/gtFine: {counts.written} written, '
          f'{counts.skipped} already up to date.')


if __name__ == '__main__':
    run_cli(main, parse_args())
