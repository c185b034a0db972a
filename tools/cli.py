"""What the command-line tools share: flags, config loading, the segmenter --model_path names,
one-sentence errors, and the process settings that make them fast. A module of the tools, not of
the emanet package: every tool imports it first.

Importing it lets MKL take its AVX2 path on AMD CPUs (``use_fast_mkl_on_amd``: MKL reads the variable
at its first use, so before any computation); ``set_device`` also tunes the allocator on CPU and
``run_cli`` prints the package's log lines to stdout.
"""
import argparse
import errno
import os
import sys
import warnings

# Importing paddle warns when ccache is missing, which matters only for compiling C++ extensions.
warnings.filterwarnings('ignore', message='No ccache found', module=r'paddle\.utils\.cpp_extension')

from emanet.config import build_model, load_config  # noqa: E402
from emanet.deploy.backends import BACKEND_FORMATS, load_exported  # noqa: E402
from emanet.deploy.static_graph import read_deploy_config  # noqa: E402
from emanet.engine.distributed import stop_together  # noqa: E402
from emanet.engine.inference import ModelSegmenter  # noqa: E402
from emanet.errors import UserError  # noqa: E402
from emanet.logger import logger, setup_logging  # noqa: E402
from emanet.rasters import RasterOptions  # noqa: E402
from emanet.device import parse_device, tune_cpu_allocator, use_fast_mkl_on_amd  # noqa: E402
from emanet.device import set_device as select_device  # noqa: E402
from emanet.segmenter import InferenceOptions  # noqa: E402

# Errors a user can fix (a file, a flag, a key, a full disk); the tools print their message alone.
# Any other exception is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_OS_ERRORS = tuple(getattr(errno, name) for name in ('ENOSPC', 'EDQUOT', 'EROFS') if hasattr(errno, name))

use_fast_mkl_on_amd()


def set_device(device):
    """The tools' device: ``emanet.device.set_device``, and on CPU large allocations kept in glibc's heap
    (``emanet.device.tune_cpu_allocator``: dygraph about 1.4x faster)."""
    device = select_device(device)
    if device == 'cpu':
        tune_cpu_allocator()
    return device


def is_user_error(err):
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in USER_OS_ERRORS)


def positive_int(text):
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device_flag(text):
    try:
        parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_device_flag(parser, help='where to run'):
    """--device cpu | gpu | gpu:N, checked when the command line is read."""
    parser.add_argument('--device', default='cpu', type=_device_flag,
                        help=f"{help}: 'cpu', 'gpu' or 'gpu:N' (GPU number N; under "
                             "paddle.distributed.launch each process takes its own GPU)")


def add_backend_flag(parser):
    """--backend for an exported model: by default the runtime its format is made for."""
    parser.add_argument('--backend', choices=sorted(BACKEND_FORMATS),
                        help='for an exported model: paddle (Paddle Inference), onnxruntime or openvino; '
                             "by default the one the folder's format is made for")


def add_augment_flags(parser):
    """Test-time flags shared by val.py, predict.py and infer.py (they override test_config)."""
    parser.add_argument('--aug_eval', action='store_true', default=None, help='use flips and scales below')
    parser.add_argument('--scales', nargs='+', type=float, help='scales for multi-scale inference, e.g. 0.75 1.0 1.25')
    parser.add_argument('--flip_horizontal', action='store_true', default=None, help='add a left-right flip')
    parser.add_argument('--flip_vertical', action='store_true', default=None, help='add an up-down flip')
    parser.add_argument('--is_slide', action='store_true', default=None, help='sliding-window inference')
    parser.add_argument('--crop_size', nargs=2, type=int, metavar=('W', 'H'), help='sliding window size')
    parser.add_argument('--stride', nargs=2, type=int, metavar=('W', 'H'), help='sliding window stride')
    parser.add_argument('--slide_batch', type=positive_int, help='sliding windows per model call (default 1)')


def add_raster_flags(parser):
    """Flags for rasters (GeoTIFFs), read and written window by window (emanet.rasters)."""
    parser.add_argument('--output_format', choices=['png', 'geotiff'],
                        help='by default a GeoTIFF (or a TIFF larger than OpenCV reads) gives a GeoTIFF of labels, '
                             'other images PNGs; geotiff: every image read and written window by window')
    parser.add_argument('--bands', nargs='+', type=int, metavar='BAND',
                        help="a raster's bands taken as red green blue (1-based, as GDAL), or one grey band")
    parser.add_argument('--scale', nargs=2, type=float, metavar=('MIN', 'MAX'),
                        help='map raster values MIN..MAX linearly onto 0-255 (16-bit and float rasters)')
    parser.add_argument('--percentile_stretch', nargs=2, type=float, metavar=('LOW', 'HIGH'),
                        help="map each band's LOW..HIGH percentiles (from a decimated read) onto 0-255")
    parser.add_argument('--confidence', action='store_true',
                        help="a raster's output gains a band: the top class's probability x 254 (255: nodata)")


def raster_options(args):
    """The raster flags as one value (emanet.rasters.RasterOptions)."""
    return RasterOptions(bands=tuple(args.bands) if args.bands else None,
                         scale=tuple(args.scale) if args.scale else None,
                         percentile_stretch=tuple(args.percentile_stretch) if args.percentile_stretch else None,
                         confidence=args.confidence)


def augment_flags(args):
    return {key: getattr(args, key) for key in
            ('aug_eval', 'scales', 'flip_horizontal', 'flip_vertical', 'is_slide', 'crop_size', 'stride',
             'slide_batch')}


def inference_options(args, cfg):
    """The config's test_config with the command line's test-time flags over it, as one value."""
    return InferenceOptions.from_config(cfg.test_config, **augment_flags(args))


def add_model_flags(parser):
    """The flags of a tool that runs a model on images (val.py, predict.py): the config, the model (weights
    or an exported folder), where and in what precision it runs, its test-time options, overrides."""
    parser.add_argument('--config', required=True, help='YAML config file')
    parser.add_argument('--model_path', required=True,
                        help='model.pdparams file or URL, or a folder written by tools/export.py')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                        help='for an exported model: bf16 on a CPU that has it (oneDNN, OpenVINO), fp16 on GPU')
    add_device_flag(parser)
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides key=value')
    add_backend_flag(parser)
    add_augment_flags(parser)
    add_verbose_flag(parser)


def segmenter_from_args(args):
    """(config, Segmenter) for the flags of ``add_model_flags``, on the device they name."""
    set_device(args.device)
    cfg = load_config_from_args(args, training=False)
    return cfg, load_segmenter(args, cfg)


def load_segmenter(args, cfg):
    """What --model_path names, as a Segmenter run with the test-time options of test_config and the command
    line: a folder written by tools/export.py runs in its runtime (or --backend, in --precision); weights (a
    file or URL) go into the config's model."""
    options = inference_options(args, cfg)
    if os.path.isdir(args.model_path):
        options = options_for_export(args.model_path, options, given=[
            f'--{key}' for key, value in augment_flags(args).items() if value])
        return load_exported(args.model_path, backend=getattr(args, 'backend', None), device=args.device,
                             precision=getattr(args, 'precision', 'fp32'), options=options)
    model = build_model(cfg, weights=args.model_path)
    return ModelSegmenter(model, cfg.val_dataset_cfg.get('transforms') or [], options)


def options_for_export(deploy_path, options, given=()):
    """``options`` for the export in ``deploy_path``. An export without logits cannot average scores: flags
    that ask for it (``given``) are an error (from ``load_exported``), a config's test_config is left
    out with a warning, as PaddleSeg's exported models run."""
    output_op = read_deploy_config(deploy_path)['output_op']
    if options.augmented and output_op != 'none' and not given:
        logger.warning("test_config's flips, scales and sliding window are not applied: %s was exported with "
                       "--output_op %s, which gives no logits to average (export with --output_op none)",
                       deploy_path, output_op)
        return InferenceOptions()
    return options


def add_verbose_flag(parser):
    parser.add_argument('--verbose', action='store_true', help='also log the whole config as loaded')


def add_paddleseg_train_flags(parser):
    """Flags of PaddleSeg's tools/train.py that this trainer has no use for, accepted so that
    command lines from PaddleSeg's documentation run; ``flags_without_effect`` says which were given."""
    parser.add_argument('--use_ema', action='store_true',
                        help="PaddleSeg's; no effect here: no moving average of the weights is kept")
    parser.add_argument('--profiler_options', help="PaddleSeg's; no effect here: this trainer has no profiler hook")
    parser.add_argument('--data_format', default='NCHW', choices=['NCHW', 'NHWC'],
                        help="PaddleSeg's; EMANet runs in NCHW only")
    parser.add_argument('--repeats', type=int, default=1,
                        help="PaddleSeg's; no effect here: --iters alone sets the length of training")


def flags_without_effect(args):
    """One sentence per PaddleSeg flag given with a value that changes nothing in this trainer."""
    notes = []
    if args.use_ema:
        notes.append("--use_ema has no effect in this trainer: it keeps no moving average of the weights; "
                     "checkpoints and evaluation use the trained weights")
    if args.profiler_options:
        notes.append("--profiler_options has no effect in this trainer: it has no profiler hook")
    if args.data_format != 'NCHW':
        notes.append(f"--data_format {args.data_format} is not supported: EMANet and its backbones run in NCHW, "
                     "so training runs in NCHW")
    if args.repeats != 1:
        notes.append("--repeats has no effect in this trainer: it runs --iters iterations however many "
                     "images an epoch holds")
    return notes


def load_config_from_args(args, training=True):
    """The config of --config with the command line's overrides; with --verbose, also logged whole."""
    cfg = load_config(args.config, learning_rate=getattr(args, 'learning_rate', None),
                      batch_size=getattr(args, 'batch_size', None), iters=getattr(args, 'iters', None),
                      opts=getattr(args, 'opts', None), training=training)
    if getattr(args, 'verbose', False):
        logger.info("Config %s as loaded:\n%s", args.config, str(cfg).rstrip())
    return cfg


def run_cli(main, args):
    """Run a tool's main; a user error ends in one line on stderr and exit code 2.

    Under paddle.distributed.launch, one process's error ends the others too, each saying which
    process stopped and why (``stop_together``). Set EMANET_DEBUG=1 to see the full traceback instead.
    """
    setup_logging()
    try:
        with stop_together():
            main(args)
    except Exception as err:
        if not is_user_error(err) or os.environ.get('EMANET_DEBUG'):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
