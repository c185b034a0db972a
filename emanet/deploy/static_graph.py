"""Export a model for Paddle Inference: a static graph and deploy.yaml, in PaddleSeg's layout.

Paddle 3.3's oneDNN inference cannot run the ``bilinear_interp`` op in any form (size, scale or
fixed shape: it fails on the op's ``scale`` attribute, "ConvertPirAttribute2RuntimeAttribute not
support"), and oneDNN is the fast CPU path. So the exported graph resizes the logits with two
matrix products holding the weights of Paddle's bilinear kernel: labels equal the dygraph
model's up to float-rounding ties. Resizing in numpy after the graph would cost the same
(~0.1 s at 1024x512) but leave the graph without full-size outputs for other runtimes.
"""
import contextlib
import copy
import os

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import yaml

from emanet.deploy.legacy_program import legacy_operators, writes_legacy_program
from emanet.errors import InvalidInput, MissingFile, short_text
from emanet.untrusted import load_mapping
from emanet.logger import drop_stderr_lines, ignore_warnings, logger

OUTPUT_OPS = ('argmax', 'softmax', 'none')
EXPORT_FORMATS = ('paddle', 'onnx', 'openvino')
DEPLOY_FILE = 'deploy.yaml'
MODEL_PREFIX = 'model'
# PaddleSeg's layers build BatchNorm instead of SyncBatchNorm while this is set.
EXPORT_STAGE_VARIABLE = 'PADDLESEG_EXPORT_STAGE'
# What Paddle prints while it traces and saves a model, none of it about the exported model: a C++
# log line because Paddle 3.3's own paddle.add hands its `out=None` to the graph builder, and its
# legacy executor's start;
TRACING_LOG_LINES = ('not support input out tensor', 'New Executor is Running')
# a warning when the `place` of a traced value is read, and two about Paddle's own legacy tracing.
TRACING_WARNINGS = ("Tensor do not have 'place' interface", 'paddle.amp.auto_cast is an experimental features',
                    'The Attr(force_cpu) of Op(fill_constant)')


def resize_bilinear_by_matmul(logits, size, align_corners):
    """Bilinear resize of logits [N, C, h, w] to ``size`` (H, W) as two matrix products.

    Each row of the weight matrices holds the two weights Paddle's CPU bilinear kernel uses
    (float32, half-pixel centres unless ``align_corners``) and zeros elsewhere, so the values
    equal ``F.interpolate``'s up to float rounding.
    """
    shape = paddle.shape(logits)  # [N, C, h, w]
    rows = _interpolation_weights(shape[2], size[0], align_corners)  # [H, h]
    cols = _interpolation_weights(shape[3], size[1], align_corners)  # [W, w]
    # oneDNN's matmul misreads a 4-D conv output broadcast against a 2-D matrix; 3-D reads right.
    planes = paddle.reshape(logits, [-1, shape[2], shape[3]])  # [N*C, h, w]
    resized = paddle.matmul(rows, paddle.matmul(planes, cols, transpose_y=True))  # [N*C, H, W]
    return paddle.reshape(resized, [shape[0], shape[1], size[0], size[1]])


def _interpolation_weights(in_size, out_size, align_corners):
    """Weights [out_size, in_size] of 1-D linear interpolation, computed as Paddle's kernel does."""
    in_size = paddle.cast(in_size, 'int64')
    in_float = paddle.cast(in_size, 'float32')
    out_float = paddle.cast(out_size, 'float32')
    positions = paddle.arange(out_size, dtype='float32')  # [out]
    if align_corners:
        ratio = (in_float - 1) / paddle.maximum(out_float - 1, paddle.ones_like(out_float))
        source = ratio * positions
    else:
        # The kernel uses ratio 0 for a single output pixel: it reads the first input pixel.
        ratio = paddle.where(out_float > 1, in_float / out_float, paddle.zeros_like(out_float))
        source = paddle.clip(ratio * (positions + 0.5) - 0.5, min=0.0)
    lower = paddle.floor(source)
    upper_weight = source - lower  # [out]
    lower = paddle.cast(lower, 'int64')
    upper = paddle.minimum(lower + 1, in_size - 1)
    inputs = paddle.arange(in_size, dtype='int64')  # [in]
    return (paddle.cast(inputs[None, :] == lower[:, None], 'float32') * (1 - upper_weight)[:, None]
            + paddle.cast(inputs[None, :] == upper[:, None], 'float32') * upper_weight[:, None])


class InferenceModel(nn.Layer):
    """What gets exported: the model's main logits, then ``output_op``."""

    def __init__(self, model, output_op):
        super().__init__()
        self.model = model
        self.output_op = output_op

    def forward(self, x):
        logits = self.model(x)[0]  # [N, C, H, W]
        if self.output_op == 'argmax':
            return paddle.argmax(logits, axis=1, dtype='int32')  # [N, H, W]
        if self.output_op == 'softmax':
            return F.softmax(logits, axis=1)
        return logits


@contextlib.contextmanager
def export_stage():
    """Set PaddleSeg's export flag, so models built inside use BatchNorm, not SyncBatchNorm."""
    previous = os.environ.get(EXPORT_STAGE_VARIABLE)
    os.environ[EXPORT_STAGE_VARIABLE] = 'True'
    try:
        yield
    finally:
        if previous is None:
            del os.environ[EXPORT_STAGE_VARIABLE]
        else:
            os.environ[EXPORT_STAGE_VARIABLE] = previous


@contextlib.contextmanager
def _traceable(model):
    """``model`` in eval mode with the matmul resize; both undone on exit."""
    if not hasattr(model, 'resize_logits'):
        raise TypeError(f"export_model needs an emanet EMANet (a model with resize_logits), "
                        f"got {type(model).__name__}")
    was_training, resize = model.training, model.resize_logits
    model.eval()
    model.resize_logits = resize_bilinear_by_matmul
    try:
        yield model
    finally:
        model.resize_logits = resize
        if was_training:
            model.train()


def default_output_op(export_format='paddle', legacy=False):
    """What an export appends to the logits unless told: nothing ('none'), so that flips, scales and
    sliding windows can average its logits as they average the dygraph model's; labels ('argmax')
    where the reader expects them: PaddleX's predictor, and the legacy program that PaddleSeg's
    deploy/python/infer.py runs without --with_argmax."""
    return 'argmax' if export_format == 'paddlex' or legacy else 'none'


def export_model(model, save_dir, transforms_cfg, input_shape=None, output_op=None):
    """Write ``model`` as a static inference model plus deploy.yaml into ``save_dir``.

    Build the model inside ``export_stage()``, as tools/export.py does, so that PaddleSeg layers
    make plain BatchNorm rather than SyncBatchNorm. In a process started with
    ``FLAGS_enable_pir_api=0`` the program is written in the legacy format (model.pdmodel, for
    PaddleSeg's deploy/python/infer.py, Paddle Inference 2.x and Paddle-Lite), else as model.json.

    Args:
        model: an emanet EMANet; it is left as it was.
        transforms_cfg (list[dict]): the config's val transforms, e.g. [{'type': 'Normalize'}];
            inference rebuilds them, so images are preprocessed as in evaluation.
        input_shape: [N, 3, H, W] to fix the input size; None accepts any batch size, H and W.
        output_op: 'argmax' (int32 labels [N, H, W]), 'softmax' (probabilities [N, C, H, W])
            or 'none' (logits [N, C, H, W]); None: ``default_output_op``.
    Returns:
        The path of deploy.yaml.
    """
    legacy = writes_legacy_program()
    output_op = output_op or default_output_op(legacy=legacy)
    if output_op not in OUTPUT_OPS:
        raise InvalidInput(f"output_op must be one of {', '.join(OUTPUT_OPS)}, got '{output_op}'")
    shape = [None, 3, None, None] if input_shape is None else [int(v) for v in input_shape]
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidInput(f"input_shape must be N 3 H W, got {' '.join(map(str, input_shape))}")
    os.makedirs(save_dir, exist_ok=True)
    with _traceable(model), (legacy_operators() if legacy else contextlib.nullcontext()):
        with paddle.no_grad():  # EMANet does not store its number of classes; its logits tell
            num_classes = int(model(paddle.zeros([1, 3, 64, 64]))[0].shape[1])
        # A copy of shape: InputSpec turns its None into -1 in place.
        input_spec = [paddle.static.InputSpec(list(shape), 'float32', name='x')]
        with drop_stderr_lines(*TRACING_LOG_LINES), ignore_warnings(*TRACING_WARNINGS):
            static_model = paddle.jit.to_static(InferenceModel(model, output_op), input_spec=input_spec,
                                                full_graph=True)
            paddle.jit.save(static_model, os.path.join(save_dir, MODEL_PREFIX))
    # Paddle 3 writes the program as model.json (PIR); the legacy program format is model.pdmodel.
    model_file = MODEL_PREFIX + ('.pdmodel' if legacy else '.json')
    path = write_deploy_config(save_dir, {
        'format': 'paddle',
        'model': model_file,
        'params': MODEL_PREFIX + '.pdiparams',
        'transforms': copy.deepcopy(list(transforms_cfg)),
        'input_shape': shape,
        'output_op': output_op,
        'output_dtype': 'int32' if output_op == 'argmax' else 'float32',
        'num_classes': num_classes,
    })
    logger.info("Exported the inference model (output_op %s, input %s) to %s",
                output_op, shape, save_dir)
    return path


def write_deploy_config(save_dir, deploy):
    """Write ``deploy`` (file names relative to ``save_dir``) as save_dir/deploy.yaml; return its path."""
    path = os.path.join(save_dir, DEPLOY_FILE)
    with open(path, 'w') as f:
        yaml.safe_dump({'Deploy': deploy}, f, sort_keys=False)
    return path


def rewrite_deploy_config(save_dir, deploy, **changes):
    """save_dir/deploy.yaml: ``deploy`` (as ``read_deploy_config`` gave it, with absolute paths) with ``changes``
    (new file names among them; a None leaves the key out)."""
    fields = {key: value for key, value in deploy.items() if key not in ('model', 'params')}
    fields.update(changes)
    return write_deploy_config(save_dir, {key: value for key, value in fields.items() if value is not None})


def read_deploy_config(path):
    """The ``Deploy`` section of a deploy.yaml (or of the one in folder ``path``), with
    ``model`` and ``params`` turned into paths next to it."""
    if os.path.isdir(path):
        path = os.path.join(path, DEPLOY_FILE)
    if not os.path.isfile(path):
        raise MissingFile(f"deploy config not found: {path}")
    deploy = load_mapping(path, 'a deploy config').get('Deploy')
    required = ('model', 'transforms', 'output_op')
    if not isinstance(deploy, dict) or any(key not in deploy for key in required):
        raise InvalidInput(f"{path}: not a deploy config; expected a 'Deploy' section with "
                         f"{', '.join(required)}")
    folder = os.path.dirname(os.path.abspath(path))
    files = [key for key in ('model', 'params') if deploy.get(key)]  # an ONNX model has no params file
    for key in files:  # an exported folder may come from someone else: it names only its own files
        name = deploy[key]
        if not isinstance(name, str) or os.path.basename(name) != name or name in (os.curdir, os.pardir):
            raise InvalidInput(f"{path}: {key} must be a file name in the deploy config's folder, got {name!r}")
    _check_deploy_fields(deploy, path)
    deploy = dict(deploy, format=deploy.get('format', 'paddle'),
                  **{key: os.path.join(folder, deploy[key]) for key in files})
    for key in files:
        if not os.path.isfile(deploy[key]):
            raise MissingFile(f"{path}: {key} file not found: {deploy[key]}")
    return deploy


def _check_deploy_fields(deploy, path):
    """Refuse, in one sentence naming ``path`` and the key, a deploy section whose values are of the wrong
    kind: an exported folder may come from someone else, and its readers index these values."""
    def refuse(key, expected):
        raise InvalidInput(f"{path}: Deploy.{key} must be {expected}, got {short_text(repr(deploy.get(key)))}")

    if deploy.get('format', 'paddle') not in EXPORT_FORMATS:
        refuse('format', f"one of {', '.join(EXPORT_FORMATS)}")
    if deploy['output_op'] not in OUTPUT_OPS:
        refuse('output_op', f"one of {', '.join(OUTPUT_OPS)}")
    transforms = deploy['transforms']
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and isinstance(t.get('type'), str)
                                                   for t in transforms):
        refuse('transforms', "a list of transforms, each a mapping with a 'type'")
    num_classes = deploy.get('num_classes')
    if num_classes is not None and not (type(num_classes) is int and num_classes > 0):
        refuse('num_classes', "a positive whole number")
    shape = deploy.get('input_shape')
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and
                                  all(v is None or (type(v) is int and (v > 0 or v == -1)) for v in shape)):
        refuse('input_shape', "[N, 3, H, W], each a positive whole number, -1 or null")
    count = num_classes if num_classes is not None else len(deploy.get('class_names') or ())
    names = deploy.get('class_names')
    if names is not None and not (isinstance(names, list) and len(names) == count
                                  and all(isinstance(name, str) for name in names)):
        refuse('class_names', f"a list of {count} names, one per class")
    palette = deploy.get('palette')
    if palette is not None and not (isinstance(palette, list) and len(palette) == count and all(
            isinstance(color, list) and len(color) == 3 and all(type(v) is int and 0 <= v <= 255 for v in color)
            for color in palette)):
        refuse('palette', f"a list of {count} colours [r, g, b], one per class, each of 0 to 255")
