"""A demo page of a model in the browser (Gradio; pip install 'emanet-paddle[demo]'):
python tools/demo.py --config CFG --model_path model.pdparams   (weights: with the EM unit's attention maps)
python tools/demo.py --model_path output/inference_model      (a folder written by tools/export.py)
Serves http://127.0.0.1:7860 (--host 0.0.0.0 to serve other machines)."""
import argparse
import logging
import os
import tempfile

from cli import add_backend_flag, add_device_flag, add_verbose_flag, load_config_from_args, positive_int, run_cli
from cli import set_device
from emanet.demo import (DEFAULT_WINDOW, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, Demo, build_demo, example_images,
                         launch, model_from_config, model_from_export, require_gradio)
from emanet.deploy.export import train_crop_size
from emanet.errors import InvalidInput
from emanet.logger import logger
from emanet.test_time import check_window


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model_path', required=True,
                        help='model.pdparams file or URL (with --config), or a folder written by tools/export.py')
    parser.add_argument('--config', help='YAML config file: needed with weights; its val set names the classes')
    parser.add_argument('--host', default='127.0.0.1', help='address to serve on (default: this machine only)')
    parser.add_argument('--port', type=positive_int, help="port (default Gradio's first free one from 7860)")
    parser.add_argument('--crop_size', nargs=2, type=positive_int, metavar=('W', 'H'),
                        help="the page's sliding window (default the config's test_config or training crop, "
                             f"else {DEFAULT_WINDOW[0][0]}x{DEFAULT_WINDOW[0][1]})")
    parser.add_argument('--stride', nargs=2, type=positive_int, metavar=('W', 'H'),
                        help='its stride (default two thirds of the window)')
    parser.add_argument('--max_upload_mb', type=positive_int, default=MAX_UPLOAD_BYTES // 2 ** 20,
                        help='largest upload in MB')
    parser.add_argument('--max_upload_pixels', type=positive_int, default=MAX_UPLOAD_PIXELS,
                        help="most pixels an upload's header may declare")
    parser.add_argument('--examples', type=int, default=4, help='drawn street scenes offered as examples')
    add_device_flag(parser)
    add_backend_flag(parser)
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def sliding_window(args, cfg):
    """((width, height), stride) of the page's sliding window: the flags, else the config's test_config, else
    the training crop, else DEFAULT_WINDOW; the stride by default two thirds of the window."""
    test_config = (cfg.test_config or {}) if cfg is not None else {}
    if args.crop_size:
        crop, stride = args.crop_size, None
    elif test_config.get('crop_size'):
        crop, stride = test_config['crop_size'], test_config.get('stride')
    else:
        train_transforms = (cfg.dic.get('train_dataset') or {}).get('transforms') if cfg is not None else None
        crop, stride = train_crop_size(train_transforms) or DEFAULT_WINDOW[0], None
    stride = args.stride or stride or [max(1, size * 2 // 3) for size in crop]
    check_window(tuple(crop), tuple(stride))
    return tuple(crop), tuple(stride)


def main(args):
    if not os.path.isdir(args.model_path) and args.config is None:
        raise InvalidInput(f"--model_path {args.model_path} is weights: give the --config they were trained with")
    require_gradio()  # before a model is loaded
    logging.getLogger('httpx').setLevel(logging.WARNING)  # Gradio's check that its own server is up, per request
    set_device(args.device)
    if os.path.isdir(args.model_path):
        cfg = load_config_from_args(args, training=False) if args.config else None
        model = model_from_export(args.model_path, backend=args.backend, window=sliding_window(args, cfg))
    else:
        cfg = load_config_from_args(args, training=False)
        model = model_from_config(cfg, args.model_path, window=sliding_window(args, cfg))
    demo = Demo(model, max_bytes=args.max_upload_mb * 2 ** 20, max_pixels=args.max_upload_pixels)
    with tempfile.TemporaryDirectory(prefix='emanet_demo_examples_') as examples_dir:
        try:
            page = build_demo(demo, example_images(examples_dir, args.examples) if args.examples > 0 else ())
            _, url, _ = launch(page, demo, host=args.host, port=args.port, examples_dir=examples_dir, block=False)
            logger.info("Demo page on %s (Ctrl+C stops it)", url)
            page.block_thread()
        finally:
            demo.close()


if __name__ == '__main__':
    run_cli(main, parse_args())
