"""Exports for every runtime, each checked against the dygraph model before it is handed out.

- 'paddle': Paddle's static graph (``export_model``), for Paddle Inference on CPU and GPU;
- 'onnx': the same graph through paddle2onnx, for ONNX Runtime (and OpenVINO);
- 'openvino': the ONNX model as OpenVINO IR, in fp32 or int8 (NNCF post-training quantization
  calibrated on training-size crops of training images, ``CalibrationImages``, read one at a time);
- 'paddlex': the Paddle export as the model folder PaddleX 3 reads (``emanet.integrations.paddlex``).

``export_checked`` runs the export and the dygraph model on the same images and refuses to
finish when their labels agree less than the precision allows: a conversion bug (paddle2onnx has
misread float attributes such as BatchNorm's epsilon) never reaches a user. The export is written
into a fresh folder beside ``save_dir`` and moved into place only once it passes, so a failed
export leaves ``save_dir`` as it was; a ``save_dir`` holding anything but an earlier export is
refused before any work (``--save_dir output`` must never touch a training run's checkpoints).
"""
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import paddle

from emanet.deploy.legacy_program import writes_legacy_program
from emanet.deploy.model_card import CARD_FILE, describe_model, store_classes, write_model_card
from emanet.deploy.static_graph import (DEPLOY_FILE, MODEL_PREFIX, default_output_op, export_model,
                                        read_deploy_config, rewrite_deploy_config)
from emanet.deploy.backends import load_exported
from emanet.deploy.runtimes import require
from emanet.engine.evaluate import evaluate
from emanet.errors import InvalidInput, UserError
from emanet.logger import logger
from emanet.segmenter import apply_transforms, build_transforms, read_image

FORMATS = ('paddle', 'onnx', 'openvino', 'paddlex')
ONNX_OPSET = 17
# The least share of pixels whose labels must equal the dygraph model's, by quantization.
MIN_AGREEMENT = {'fp32': 0.9999, 'int8': 0.95}


class ExportCheckError(UserError, RuntimeError):
    """An export's labels differ from the dygraph model's; the message gives the share."""


class ExportFolderError(UserError, ValueError):
    """``save_dir`` holds files that are not an earlier export's: the export will not write there."""


# The files an export of any format writes; a folder holding only these (and deploy.yaml) is an earlier export.
EXPORT_FILES = {DEPLOY_FILE, CARD_FILE} | {f'{MODEL_PREFIX}.{suffix}' for suffix in
                                ('json', 'pdmodel', 'pdiparams', 'pdiparams.info', 'onnx', 'xml', 'bin')} | {
    f'inference.{suffix}' for suffix in ('json', 'pdmodel', 'pdiparams', 'yml', 'onnx')}  # the 'paddlex' format


def check_export_folder(save_dir):
    """Refuse a ``save_dir`` that exists and holds anything but an earlier export, in one sentence."""
    if not os.path.exists(save_dir):
        return
    if not os.path.isdir(save_dir):
        raise ExportFolderError(f"--save_dir {save_dir} is a file, not a folder")
    names = sorted(os.listdir(save_dir))
    foreign = [name for name in names
               if not (name in EXPORT_FILES and os.path.isfile(os.path.join(save_dir, name)))]
    if names and (foreign or DEPLOY_FILE not in names):
        shown = ', '.join((foreign or names)[:3]) + (' ...' if len(foreign or names) > 3 else '')
        raise ExportFolderError(f"--save_dir {save_dir} is not empty and is not an earlier export (it holds "
                                f"{shown}); give a new or empty folder, the export replaces only an earlier export")


@contextlib.contextmanager
def staged_folder(save_dir):
    """A new, empty folder beside ``save_dir`` to write into; ``publish`` moves it into place.

    If the block fails or is not published, the staging folder (which this process created) is
    removed and ``save_dir`` is untouched.
    """
    os.makedirs(os.path.dirname(os.path.abspath(save_dir)), exist_ok=True)
    staging = _unused_name_beside(save_dir, '.part')
    os.mkdir(staging)  # not mkdtemp, whose folders are private: an export folder is an ordinary one
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unused_name_beside(save_dir, suffix):
    """A hidden name in the folder of ``save_dir`` that nothing holds yet: '.<name>.<random><suffix>'."""
    save_dir = os.path.abspath(save_dir)
    while True:
        name = os.path.join(os.path.dirname(save_dir), f'.{os.path.basename(save_dir)}.{secrets.token_hex(4)}{suffix}')
        if not os.path.lexists(name):
            return name


def publish(staging, save_dir):
    """Move the checked export ``staging`` to ``save_dir``; an earlier export there is replaced
    (its files are export files only, see ``check_export_folder``)."""
    check_export_folder(save_dir)  # again: the folder may have changed while the export ran
    previous = None
    if os.path.isdir(save_dir):
        previous = _unused_name_beside(save_dir, '.old')
        os.replace(save_dir, previous)
    os.replace(staging, save_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def onnx_converter():
    """paddle2onnx, which every ONNX and OpenVINO export goes through; raises ``Unsupported`` in one
    sentence where it is missing (or has no wheel for this Python)."""
    paddle2onnx = require('paddle2onnx', 'Exporting to ONNX or OpenVINO')
    require('onnx_graphsurgeon', 'ONNX constant folding')  # else polygraphy would pip-install it
    return paddle2onnx


def to_onnx(paddle_dir, save_dir):
    """Convert the Paddle export in ``paddle_dir`` to save_dir/model.onnx (+ deploy.yaml)."""
    deploy = read_deploy_config(paddle_dir)
    paddle2onnx = onnx_converter()
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, 'model.onnx')
    paddle2onnx.export(deploy['model'], deploy['params'], save_file=path, opset_version=ONNX_OPSET,
                       enable_onnx_checker=True, optimize_tool='polygraphy')
    if not os.path.isfile(path):  # paddle2onnx logs its errors instead of raising them
        raise RuntimeError(f"paddle2onnx could not convert {deploy['model']} (see the log above)")
    return rewrite_deploy_config(save_dir, deploy, format='onnx', model='model.onnx', params=None)


def to_openvino(onnx_dir, save_dir, calibration=None):
    """Convert the ONNX export in ``onnx_dir`` to OpenVINO IR (model.xml, model.bin) in ``save_dir``;
    with ``calibration`` (a sequence of preprocessed images [3, h, w], such as ``CalibrationImages``,
    which NNCF reads one at a time), quantize it to int8 with NNCF."""
    deploy = read_deploy_config(onnx_dir)
    ov = require('openvino', 'OpenVINO export')
    model = ov.convert_model(deploy['model'])
    quantization = 'fp32'
    if calibration is not None:
        nncf = require('nncf', 'int8 quantization')
        model = nncf.quantize(model, nncf.Dataset(calibration, _batch_of_one), subset_size=len(calibration))
        quantization = 'int8'
    os.makedirs(save_dir, exist_ok=True)
    ov.save_model(model, os.path.join(save_dir, 'model.xml'), compress_to_fp16=False)
    return rewrite_deploy_config(save_dir, deploy, format='openvino', model='model.xml', params='model.bin',
                         quantization=quantization)


def _batch_of_one(image):
    return image[None]


def preprocessed_images(paths, transforms_cfg):
    """Images [3, h, w] float32 prepared by the deploy transforms, one per path."""
    transforms = build_transforms(transforms_cfg)
    return [_preprocess(transforms, path) for path in paths]


def _preprocess(transforms, path):
    return apply_transforms(transforms, read_image(path))[0]


def train_crop_size(train_transforms_cfg):
    """The (width, height) of the crops a model was trained on: the ``crop_size`` of the train transforms
    (PaddleSeg's RandomPaddingCrop, RandomCenterCrop, ...), or None where they have none."""
    for transform in train_transforms_cfg or ():
        size = transform.get('crop_size')
        if size is not None:
            width, height = (size, size) if isinstance(size, int) else size
            return int(width), int(height)
    return None


class CalibrationImages(Sequence):
    """Images for int8 calibration, each read and preprocessed (deploy transforms) only when asked for,
    then cut to ``crop_size``: NNCF holds one at a time, whatever their number and size.

    The model was trained on crops of this size (Cityscapes: 1024x512 out of 2048x1024 images), so
    their activations span the ranges the quantization must cover; a whole Cityscapes image would take
    four times the memory and time per image for no other ranges. Image ``i`` is cut at a place drawn
    from ``RandomState(seed + i)``: the crops spread over the images, the same ones every export.
    An image smaller than the crop is padded with 0 (after Normalize: the padding colour of training's
    RandomPaddingCrop); ``crop_size`` None takes whole images.

    Args:
        paths: image files.
        transforms_cfg: the deploy (val) transforms, e.g. [{'type': 'Normalize'}].
        crop_size: (width, height) of the crops, e.g. ``train_crop_size(train transforms)``, or None.
    """

    def __init__(self, paths, transforms_cfg, crop_size=None, seed=0):
        self.paths = list(paths)
        self.transforms = build_transforms(transforms_cfg)
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise InvalidInput(f"a calibration crop is width height, both positive; got {crop_size}")
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.seed = seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        index = range(len(self.paths))[index]  # IndexError past the end, which ends iteration
        image = _preprocess(self.transforms, self.paths[index])  # [3, h, w]
        if self.crop_size is None:
            return image
        width, height = self.crop_size
        rng = np.random.RandomState(self.seed + index)
        top = rng.randint(max(image.shape[1] - height, 0) + 1)
        left = rng.randint(max(image.shape[2] - width, 0) + 1)
        crop = image[:, top:top + height, left:left + width]
        if crop.shape[1:] == (height, width):
            return np.ascontiguousarray(crop)
        padded = np.zeros((image.shape[0], height, width), image.dtype)
        padded[:, :crop.shape[1], :crop.shape[2]] = crop
        return padded


def label_agreement(exported, model, images):
    """Share of pixels where ``exported`` and the dygraph ``model`` give the same label."""
    model.eval()
    equal = total = 0
    for image in images:
        with paddle.no_grad():
            expected = paddle.argmax(model(paddle.to_tensor(image[None]))[0], axis=1).numpy()
        labels = exported.labels(image[None], [])
        equal += int((labels == expected).sum())
        total += labels.size
    return equal / total


def _check(exported, model, check_images, min_agreement, what, save_dir):
    """The share of labels ``exported`` gives as the dygraph ``model`` does; an error below ``min_agreement``."""
    agreement = label_agreement(exported, model, check_images)
    if agreement < min_agreement:
        raise ExportCheckError(f"the {what} export labels {agreement:.4%} of the pixels as the dygraph model does "
                               f"on {len(check_images)} images, below {min_agreement:.2%}; it was not written to "
                               f"{save_dir}")
    logger.info("Checked the %s export against the dygraph model: %.4f%% of the labels equal on %d images",
                what, agreement * 100, len(check_images))
    return agreement


def export_checked(model, save_dir, transforms_cfg, check_images, export_format='paddle', input_shape=None,
                   output_op=None, calibration=None, min_agreement=None, val_dataset=None,
                   paddlex_name=None, paddlex_onnx=False, description=None):
    """Export ``model`` as ``export_format`` into ``save_dir``, then check it against the dygraph model.

    Args:
        check_images: preprocessed images [3, h, w] that both models label.
        output_op: 'none' (logits), 'softmax' or 'argmax'; None: ``static_graph.default_output_op``.
        calibration: preprocessed images [3, h, w] for int8 quantization (OpenVINO only), a list or a
            lazy sequence (``CalibrationImages``); None keeps fp32.
        min_agreement: the least share of equal labels (default: 99.99% fp32, 95% int8).
        val_dataset: with ``calibration``, a labelled dataset on which the int8 model and the fp32
            graph it was quantized from (both in OpenVINO) are evaluated, to report what int8 costs.
        paddlex_name: the 'paddlex' format's model name ('EMANet-...', see emanet.integrations.paddlex).
        paddlex_onnx: the 'paddlex' format also holds inference.onnx (checked in ONNX Runtime too).
        description: the ``model_card.ModelDescription`` of the card (README.md) and of the classes in
            deploy.yaml; by default what the model itself tells (its classes then named 'class 0'...).
    Returns:
        (path of deploy.yaml, share of labels equal to the dygraph model's, {'fp32': mIoU, 'int8': mIoU}
        or None without ``val_dataset``).
    """
    if export_format not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got '{export_format}'")
    if calibration is not None and export_format != 'openvino':
        raise InvalidInput("int8 quantization is made for OpenVINO: use --format openvino")
    output_op = output_op or default_output_op(export_format, legacy=writes_legacy_program())
    if paddlex_onnx and export_format != 'paddlex':
        raise InvalidInput("an ONNX graph inside the PaddleX folder is for --format paddlex; use --format onnx")
    if export_format == 'paddlex':  # its name and output are checked before any work
        from emanet.integrations.paddlex import check_model_name
        check_model_name(paddlex_name)
        if output_op != 'argmax':
            raise InvalidInput(f"PaddleX's segmentation predictor takes labels: use --output_op argmax, "
                               f"not {output_op}")
    quantization = 'int8' if calibration is not None else 'fp32'
    min_agreement = MIN_AGREEMENT[quantization] if min_agreement is None else min_agreement
    if not check_images:
        raise ValueError("export_checked needs at least one image to check the export on")
    check_export_folder(save_dir)
    if export_format in ('onnx', 'openvino') or paddlex_onnx:
        onnx_converter()  # before any work: says so where paddle2onnx cannot be had
    with staged_folder(save_dir) as staging, tempfile.TemporaryDirectory(prefix='emanet_export_') as work:
        paddle_dir = staging if export_format in ('paddle', 'paddlex') else os.path.join(work, 'paddle')
        export_model(model, paddle_dir, transforms_cfg, input_shape=input_shape, output_op=output_op)
        description = description or describe_model(model)
        store_classes(paddle_dir, description)
        if export_format == 'paddlex':
            from emanet.integrations.paddlex import write_model_folder
            write_model_folder(staging, paddlex_name)
        elif export_format != 'paddle':
            onnx_dir = staging if export_format == 'onnx' else os.path.join(work, 'onnx')
            to_onnx(paddle_dir, onnx_dir)
            if export_format == 'openvino':
                to_openvino(onnx_dir, staging, calibration)
        if export_format == 'paddlex' and paddlex_onnx:  # the ONNX graph beside it, for PaddleX's onnxruntime engine
            onnx_dir = os.path.join(work, 'onnx')
            to_onnx(staging, onnx_dir)
            _check(load_exported(onnx_dir), model, check_images, min_agreement, 'paddlex (ONNX) fp32', save_dir)
            os.replace(os.path.join(onnx_dir, 'model.onnx'), os.path.join(staging, 'inference.onnx'))
        agreement = _check(load_exported(staging), model, check_images, min_agreement,
                           f'{export_format} {quantization}', save_dir)
        miou = None
        if calibration is not None and val_dataset is not None:
            miou = {precision: evaluate(load_exported(folder, backend='openvino'), val_dataset,
                                        note=f'OpenVINO {precision}')['miou']
                    for precision, folder in (('fp32', onnx_dir), ('int8', staging))}
            logger.info("int8 quantization: mIoU %.4f against %.4f in fp32 (%+.4f) on %d val images",
                        miou['int8'], miou['fp32'], miou['int8'] - miou['fp32'], len(val_dataset))
        write_model_card(staging, save_dir, description, agreement, len(check_images), min_agreement, miou)
        publish(staging, save_dir)
    return os.path.join(save_dir, DEPLOY_FILE), agreement, miou
