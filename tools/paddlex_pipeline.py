"""Run an EMANet folder (tools/export.py --format paddlex) in PaddleX's semantic-segmentation pipeline, or
serve it with PaddleX's own serving app (POST /semantic-segmentation). PaddleX's CLI cannot load a plugin,
so this registers EMANet first and then hands over to PaddleX:

python tools/paddlex_pipeline.py --model_dir DIR --input IMG_OR_DIR [--save_dir DIR]
python tools/paddlex_pipeline.py --model_dir DIR --serve [--host 127.0.0.1] [--port 8080]
python tools/paddlex_pipeline.py --model_dir DIR --write_config semantic_segmentation.yaml
(--pipeline_config YAML instead of --model_dir: a PaddleX pipeline config naming an EMANet folder)
"""
import argparse

import yaml

from cli import run_cli
from emanet.errors import InvalidInput
from emanet.integrations import paddlex as emanet_paddlex
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--model_dir', help='an EMANet folder written by tools/export.py --format paddlex')
    source.add_argument('--pipeline_config', help="a PaddleX semantic_segmentation pipeline YAML naming one")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument('--input', help="an image or a folder of images for the pipeline's predict")
    action.add_argument('--serve', action='store_true', help="serve with PaddleX's app until interrupted")
    action.add_argument('--write_config', metavar='YAML', help='write the pipeline config for --model_dir and stop')
    parser.add_argument('--save_dir', default='output/paddlex', help="where PaddleX's pictures and JSON go")
    parser.add_argument('--host', default='127.0.0.1', help='serving: the address to listen on')
    parser.add_argument('--port', type=int, default=8080, help='serving: the port')
    parser.add_argument('--device', help="PaddleX's device, e.g. cpu, gpu:0 (default: PaddleX's choice)")
    parser.add_argument('--engine', choices=['paddle', 'onnxruntime'],
                        help="PaddleX's inference engine (default paddle; onnxruntime needs inference.onnx)")
    return parser.parse_args(argv)


def main(args):
    if args.write_config:
        if not args.model_dir:
            raise InvalidInput("--write_config writes the pipeline config of a --model_dir")
        with open(args.write_config, 'w') as f:
            yaml.safe_dump(emanet_paddlex.pipeline_config(args.model_dir), f, sort_keys=False)
        logger.info("Wrote %s: paddlex.create_pipeline(config=...) runs it once emanet.integrations.paddlex."
                    "register() was called", args.write_config)
        return
    options = {key: value for key, value in (('device', args.device), ('engine', args.engine)) if value}
    if args.serve:
        emanet_paddlex.serve(args.model_dir, args.pipeline_config, host=args.host, port=args.port, **options)
        return
    pipeline, _ = emanet_paddlex.create_pipeline(args.model_dir, args.pipeline_config, **options)
    count = 0
    for result in pipeline.predict(args.input):
        result.save_to_img(args.save_dir)
        result.save_to_json(args.save_dir)
        count += 1
    logger.info("PaddleX's pipeline segmented %d images; pictures and JSON in %s", count, args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
