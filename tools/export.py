"""Export for deployment, checked against the dygraph model:
python tools/export.py --config CFG --model_path PATH --save_dir DIR [--format paddle|onnx|openvino] [--precision int8]"""
import argparse

from cli import add_verbose_flag, load_config_from_args, run_cli
from emanet.config import Builder, ConfigError, build_model
from emanet.deploy.convert import FORMATS, export_checked, preprocessed_images
from emanet.deploy.export import OUTPUT_OPS, export_stage
from emanet.engine.predict import list_images
from emanet.logger import drop_stderr_lines, ignore_warnings, logger

# Paddle's notes while it traces the model, neither about the exported model: a C++ log line
# because Paddle 3.3's own paddle.add hands its `out=None` to the graph builder,
PADDLE_ADD_NOTE = 'not support input out tensor'
# and a Python warning when the `place` of a traced value is read.
TRACED_PLACE_NOTE = "Tensor do not have 'place' interface"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file (model and val_dataset are enough)')
    parser.add_argument('--model_path', required=True, help='model.pdparams file or URL')
    parser.add_argument('--save_dir', default='output/inference_model', help='where the model and deploy.yaml go')
    parser.add_argument('--format', default='paddle', choices=FORMATS,
                        help='paddle (Paddle Inference, CPU and GPU), onnx (ONNX Runtime) or openvino')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'int8'],
                        help='int8: post-training quantization for OpenVINO, calibrated on training images')
    parser.add_argument('--calibration_images', type=int, default=32,
                        help='int8: how many images of the training set calibrate the quantization')
    parser.add_argument('--calibration_dir', help="int8: calibrate on this folder's images instead")
    parser.add_argument('--check_images', type=int, default=8,
                        help='val images on which the export must label as the dygraph model does')
    parser.add_argument('--min_agreement', type=float,
                        help='least share of equal labels (default 0.9999 for fp32, 0.95 for int8)')
    parser.add_argument('--input_shape', nargs=4, type=int, metavar=('N', 'C', 'H', 'W'),
                        help='fix the input shape; by default any batch size, height and width')
    parser.add_argument('--output_op', choices=OUTPUT_OPS, default='argmax',
                        help='appended to the logits: labels (argmax), probabilities (softmax) or none')
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def dataset_images(cfg, split, count):
    """Paths of the first ``count`` images of the config's ``split`` ('train' or 'val'), or [] without one."""
    if f'{split}_dataset' not in cfg.dic:
        return []
    dataset = getattr(Builder(cfg), f'{split}_dataset')
    step = max(1, len(dataset.file_list) // count)  # spread over the set rather than its first city
    return [files[0] for files in dataset.file_list[::step][:count]]


def main(args):
    cfg = load_config_from_args(args, training=False)
    transforms = cfg.val_dataset_cfg.get('transforms')
    if not transforms:
        raise ConfigError(f"{args.config}: val_dataset has no transforms; the export stores them for inference")
    calibration = None
    if args.precision == 'int8':
        paths = (list_images(args.calibration_dir)[0][:args.calibration_images] if args.calibration_dir
                 else dataset_images(cfg, 'train', args.calibration_images))
        if not paths:
            raise ConfigError(f"{args.config}: int8 calibration needs images: a train_dataset, or --calibration_dir")
        calibration = preprocessed_images(paths, transforms)
    check_paths = dataset_images(cfg, 'val', args.check_images)
    check_images = preprocessed_images(check_paths, transforms)
    if not check_images:
        raise ConfigError(f"{args.config}: the export is checked on val images, and the val set has none")
    with export_stage():
        model = build_model(cfg, weights=args.model_path)
    with drop_stderr_lines(PADDLE_ADD_NOTE), ignore_warnings(TRACED_PLACE_NOTE):
        export_checked(model, args.save_dir, transforms, check_images, export_format=args.format,
                       input_shape=args.input_shape, output_op=args.output_op, calibration=calibration,
                       min_agreement=args.min_agreement)
    logger.info("Exported %s %s to %s", args.format, args.precision, args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
