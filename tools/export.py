"""Export for Paddle Inference: python tools/export.py --config CFG --model_path PATH --save_dir DIR"""
import argparse

from cli import add_verbose_flag, load_config_from_args, run_cli
from emanet.config import ConfigError, build_model
from emanet.deploy.export import OUTPUT_OPS, export_model, export_stage
from emanet.logger import drop_stderr_lines, ignore_warnings

# Paddle's notes while it traces the model, neither about the exported model: a C++ log line
# because Paddle 3.3's own paddle.add hands its `out=None` to the graph builder,
PADDLE_ADD_NOTE = 'not support input out tensor'
# and a Python warning when the `place` of a traced value is read.
TRACED_PLACE_NOTE = "Tensor do not have 'place' interface"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='YAML config file (model and val_dataset are enough)')
    parser.add_argument('--model_path', required=True, help='model.pdparams file or URL')
    parser.add_argument('--save_dir', default='output/inference_model', help='where model.* and deploy.yaml go')
    parser.add_argument('--input_shape', nargs=4, type=int, metavar=('N', 'C', 'H', 'W'),
                        help='fix the input shape; by default any batch size, height and width')
    parser.add_argument('--output_op', choices=OUTPUT_OPS, default='argmax',
                        help='appended to the logits: labels (argmax), probabilities (softmax) or none')
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(args):
    cfg = load_config_from_args(args, training=False)
    transforms = cfg.val_dataset_cfg.get('transforms')
    if not transforms:
        raise ConfigError(f"{args.config}: val_dataset has no transforms; the export stores them for inference")
    with export_stage():
        model = build_model(cfg, weights=args.model_path)
    with drop_stderr_lines(PADDLE_ADD_NOTE), ignore_warnings(TRACED_PLACE_NOTE):
        export_model(model, args.save_dir, transforms, input_shape=args.input_shape, output_op=args.output_op)


if __name__ == '__main__':
    run_cli(main, parse_args())
