"""Export for deployment, checked against the dygraph model:
python tools/export.py --config CFG --model_path PATH --save_dir DIR [--format paddle|onnx|openvino|paddlex]
[--precision int8 [--calibration_crop W H]] [--legacy_program] [--paddlex_name EMANet-R101] [--paddlex_onnx]"""
import argparse
import copy
import os
import sys

# Paddle 3.3 writes the legacy program format only in a process started with FLAGS_enable_pir_api=0:
# start again so, before anything is imported or logged.
if '--legacy_program' in sys.argv[1:] and os.environ.get('FLAGS_enable_pir_api') != '0':
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, FLAGS_enable_pir_api='0'))

from cli import add_verbose_flag, load_config_from_args, positive_int, run_cli
from emanet.config import Builder, ConfigError, build_model
from emanet.deploy.export import FORMATS, CalibrationImages, export_checked, preprocessed_images, train_crop_size
from emanet.deploy.model_card import describe_model
from emanet.deploy.static_graph import OUTPUT_OPS, export_stage
from emanet.engine.predict import list_images
from emanet.logger import logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file (model and val_dataset are enough)')
    parser.add_argument('--model_path', required=True, help='model.pdparams file or URL')
    parser.add_argument('--save_dir', default='output/inference_model', help='where the model and deploy.yaml go')
    parser.add_argument('--format', default='paddle', choices=FORMATS,
                        help='paddle (Paddle Inference, CPU and GPU), onnx (ONNX Runtime), openvino, or paddlex '
                             '(the model folder PaddleX 3 reads, see docs/paddlex.md)')
    parser.add_argument('--paddlex_name',
                        help="paddlex format: the model's name in PaddleX, 'EMANet-...' (default from the backbone, "
                             "e.g. EMANet-R101)")
    parser.add_argument('--paddlex_onnx', action='store_true',
                        help="paddlex format: also write inference.onnx, for PaddleX's onnxruntime engine")
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'int8'],
                        help='int8: post-training quantization for OpenVINO, calibrated on training images')
    parser.add_argument('--legacy_program', action='store_true',
                        help='paddle format: write the legacy model.pdmodel (for PaddleSeg\'s deploy/python/infer.py, '
                             'Paddle Inference 2.x, Paddle-Lite) instead of model.json; fp32')
    parser.add_argument('--calibration_images', type=positive_int, default=32,
                        help='int8: how many images of the training set calibrate the quantization')
    parser.add_argument('--calibration_dir', help="int8: calibrate on this folder's images instead")
    parser.add_argument('--calibration_crop', nargs=2, type=int, metavar=('W', 'H'),
                        help="int8: calibrate on crops of this size (default the train transforms' crop_size, "
                             "e.g. 1024 512 for Cityscapes, or the --input_shape; 0 0 takes whole images), "
                             "read one at a time")
    parser.add_argument('--miou_images', type=int, default=-1,
                        help='int8: val images on which the int8 and fp32 mIoU are compared (default all; 0 skips)')
    parser.add_argument('--check_images', type=positive_int, default=8,
                        help='val images on which the export must label as the dygraph model does')
    parser.add_argument('--min_agreement', type=float,
                        help='least share of equal labels (default 0.9999 for fp32, 0.95 for int8)')
    parser.add_argument('--input_shape', nargs=4, type=int, metavar=('N', 'C', 'H', 'W'),
                        help='fix the input shape; by default any batch size, height and width')
    parser.add_argument('--output_op', choices=OUTPUT_OPS,
                        help='appended to the logits: nothing (none: the default, which flips, scales and sliding '
                             'windows need), probabilities (softmax) or labels (argmax: the default of --format '
                             'paddlex and --legacy_program)')
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


def calibration_crop(args, cfg):
    """(width, height) of the int8 calibration crops, or None for whole images: --calibration_crop, else the
    fixed --input_shape, else the crop the model was trained on."""
    fixed = None if args.input_shape is None else (args.input_shape[3], args.input_shape[2])
    if args.calibration_crop is not None:
        asked = None if args.calibration_crop == [0, 0] else tuple(args.calibration_crop)
        if fixed is not None and asked != fixed:
            raise ConfigError(f"--calibration_crop {args.calibration_crop[0]} {args.calibration_crop[1]} differs from "
                              f"the fixed --input_shape, whose W H ({fixed[0]} {fixed[1]}) the crops must have")
        return asked
    if fixed is not None:
        return fixed
    return train_crop_size((cfg.dic.get('train_dataset') or {}).get('transforms'))


def first_images(dataset, count):
    """``dataset`` cut to its first ``count`` images (all for a negative count)."""
    subset = copy.copy(dataset)
    subset.file_list = dataset.file_list if count < 0 else dataset.file_list[:count]
    return subset


def main(args):
    if args.legacy_program and (args.format != 'paddle' or args.precision != 'fp32'):
        raise ConfigError("--legacy_program is a format of the fp32 Paddle export: use it with --format paddle")
    cfg = load_config_from_args(args, training=False)
    transforms = cfg.val_dataset_cfg.get('transforms')
    if not transforms:
        raise ConfigError(f"{args.config}: val_dataset has no transforms; the export stores them for inference")
    paddlex_name = None
    if args.format == 'paddlex':
        from emanet.integrations.paddlex import default_model_name, paddlex_transforms
        paddlex_name = args.paddlex_name or default_model_name(cfg.dic.get('model') or {})
        transforms, dropped = paddlex_transforms(transforms)
        if dropped:
            logger.info("PaddleX format: left out %s (for batching in evaluation; one image needs none)",
                        ', '.join(dropped))
    elif args.paddlex_name:
        raise ConfigError("--paddlex_name names the model of --format paddlex")
    calibration = None
    if args.precision == 'int8':
        paths = (list_images(args.calibration_dir)[0][:args.calibration_images] if args.calibration_dir
                 else dataset_images(cfg, 'train', args.calibration_images))
        if not paths:
            raise ConfigError(f"{args.config}: int8 calibration needs images: a train_dataset, or --calibration_dir")
        calibration = CalibrationImages(paths, transforms, calibration_crop(args, cfg))
        logger.info("int8: calibrating on %d images%s", len(calibration),
                    ', whole' if calibration.crop_size is None else ', crops of %dx%d' % calibration.crop_size)
    check_paths = dataset_images(cfg, 'val', args.check_images)
    if calibration is not None and calibration.crop_size is not None:
        # The dygraph model on a whole Cityscapes image (2048x1024) alone peaks at 4.7 GB: int8 is checked
        # on crops of the calibration size, other crops of the val images.
        check_images = CalibrationImages(check_paths, transforms, calibration.crop_size, seed=len(calibration))
    else:
        check_images = preprocessed_images(check_paths, transforms)
    if not check_images:
        raise ConfigError(f"{args.config}: the export is checked on val images, and the val set has none")
    with export_stage():
        model = build_model(cfg, weights=args.model_path)
    val_dataset = None
    if calibration is not None and args.miou_images:
        val_dataset = first_images(Builder(cfg).val_dataset, args.miou_images)
    description = describe_model(model, cfg.dic.get('model'), Builder(cfg).val_dataset_class,
                                 weights=args.model_path, config=args.config)
    export_checked(model, args.save_dir, transforms, check_images, export_format=args.format,
                   input_shape=args.input_shape, output_op=args.output_op, calibration=calibration,
                   min_agreement=args.min_agreement, val_dataset=val_dataset, paddlex_name=paddlex_name,
                   paddlex_onnx=args.paddlex_onnx, description=description)
    logger.info("Exported %s %s%s to %s (its model card: README.md)", args.format, args.precision,
                ' (legacy program, model.pdmodel)' if args.legacy_program else
                f' (PaddleX model name {paddlex_name})' if paddlex_name else '', args.save_dir)


if __name__ == '__main__':
    run_cli(main, parse_args())
