"""Segment images with an exported model through Paddle Inference; oneDNN stays on for CPU."""
import os

import cv2
import numpy as np
import paddle
import paddle.distributed as dist
from paddle import inference
from paddle.base import core
from paddleseg.cvlibs import manager
from paddleseg.transforms import Compose
from PIL import Image
from tqdm import tqdm

from emanet.deploy.export import read_deploy_config
from emanet.engine.distributed import process_share
from emanet.engine.evaluate import metrics_for, report_metrics
from emanet.engine.inference import reverse_transform
from emanet.engine.predict import color_map, list_images, save_pseudo_color
from emanet.runtime import launcher_gpu_id, parse_device

PRECISIONS = ('fp32', 'bf16', 'fp16')
# The EM unit's products, softmax and normalisations (see EMAU) lose too much in fp16; Paddle
# Inference's mixed precision keeps these operators in float32. The convolutions stay in fp16.
FLOAT32_OPS = frozenset({'bmm', 'softmax', 'p_norm', 'maximum', 'divide'})
GPU_MEMORY_POOL_MB = 256


def inference_config(model_file, params_file, device='cpu', precision='fp32', cpu_threads=None):
    """A Paddle Inference config: oneDNN on CPU (bf16 kernels for 'bf16'), CUDA on GPU ('fp16' there).

    ``device`` is 'cpu', 'gpu' or 'gpu:N'. A combination this machine or build cannot run ends in
    one ValueError/RuntimeError sentence. ``cpu_threads`` None uses every core.
    """
    kind, gpu_id = parse_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if kind == 'gpu' and not paddle.is_compiled_with_cuda():
        raise RuntimeError("device 'gpu' needs PaddlePaddle built with CUDA; this one is CPU-only")
    config = inference.Config(model_file, params_file)
    config.disable_glog_info()
    return configure(config, kind, gpu_id, precision, cpu_threads)


def configure(config, kind, gpu_id, precision, cpu_threads=None):
    """Apply device and precision to ``config`` (an ``inference.Config``) and return it."""
    # With a fixed input shape, Paddle 3.3's inplace pass breaks the EM unit's last product under
    # oneDNN (its output is wrong by ~90%). Whether it does on GPU cannot be checked here; the pass
    # only saves memory, so it is off on every device.
    config.delete_pass('inplace_pass')
    if kind == 'gpu':
        if precision == 'bf16':
            raise ValueError("bf16 runs on CPU only (oneDNN); on GPU use fp16 or fp32")
        half = precision == 'fp16'
        config.enable_use_gpu(GPU_MEMORY_POOL_MB, launcher_gpu_id() if gpu_id is None else gpu_id,
                              inference.PrecisionType.Half if half else inference.PrecisionType.Float32)
        if half:
            config.exp_disable_mixed_precision_ops(set(FLOAT32_OPS))
        return config
    if precision == 'fp16':
        raise ValueError("fp16 runs on GPU only; on CPU use bf16 or fp32")
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(cpu_threads or os.cpu_count())
    if precision == 'bf16':
        if not core.supports_bfloat16():
            raise ValueError("bf16 needs a CPU with AVX-512 (oneDNN's bf16 kernels); this one has none, use fp32")
        config.enable_mkldnn_bfloat16()
    return config


def build_transforms(transforms_cfg):
    """PaddleSeg's Compose of transforms given as config dicts, e.g. [{'type': 'Normalize'}]."""
    transforms = []
    for transform_cfg in transforms_cfg:
        kwargs = dict(transform_cfg)
        name = kwargs.pop('type')
        if name not in manager.TRANSFORMS.components_dict:
            raise ValueError(f"unknown transform '{name}' in the deploy config")
        transforms.append(manager.TRANSFORMS[name](**kwargs))
    return Compose(transforms)


def restore_label(label, trans_info):
    """Undo PaddleSeg's transforms on a label map [h, w], last first: resizes by nearest
    neighbour (labels cannot be interpolated), paddings by cropping."""
    for mode, (height, width) in reversed(trans_info):
        if mode == 'resize':
            label = cv2.resize(label, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
        elif mode == 'padding':
            label = label[:height, :width]
        else:
            raise ValueError(f"unknown transform {mode!r} in trans_info; expected 'resize' or 'padding'")
    return label


class Predictor:
    """Label maps from an exported model (``export_model``'s deploy.yaml) via Paddle Inference.

    Images go through the deploy config's transforms, as in evaluation; labels come back at
    each image's own size. With a Resize among the transforms, an 'argmax' export restores
    labels by nearest neighbour; 'softmax'/'none' exports resize the scores first, as
    tools/predict.py does.

    Args:
        deploy_path: deploy.yaml, or the folder holding it.
        device: 'cpu' (oneDNN), 'gpu' or 'gpu:N'.
        precision: 'fp32'; 'bf16' on a CPU with AVX-512; 'fp16' on GPU.
        cpu_threads: math threads on CPU; None uses every core.
    """

    def __init__(self, deploy_path, device='cpu', precision='fp32', cpu_threads=None):
        self.deploy = read_deploy_config(deploy_path)
        self.output_op = self.deploy['output_op']
        self.num_classes = self.deploy.get('num_classes')
        self.input_shape = self.deploy.get('input_shape') or [None] * 4  # None: any size
        self.transforms = build_transforms(self.deploy['transforms'])
        config = inference_config(self.deploy['model'], self.deploy['params'], device, precision, cpu_threads)
        self.predictor = inference.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def preprocess(self, image):
        """(input [3, h, w] float32, trans_info) for an image path or a BGR uint8 array [H, W, 3]."""
        if isinstance(image, (str, os.PathLike)):
            path = str(image)
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"cannot read image: {path}")
        elif not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"an image must be a path or a BGR array [H, W, 3], got {type(image).__name__} "
                             f"of shape {getattr(image, 'shape', None)}")
        data = self.transforms({'img': image.astype('float32'), 'trans_info': [], 'gt_fields': []})
        return data['img'], data['trans_info']

    def predict(self, image):
        """Label map [H, W] (int32) for an image path or a BGR uint8 array, at the image's size."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images):
        """Label maps [H, W] (int32), one per image; images of one preprocessed size run as one batch."""
        inputs, trans_infos = zip(*[self.preprocess(image) for image in images])
        if len({x.shape for x in inputs}) == 1 and self.input_shape[0] in (None, -1, len(inputs)):
            outputs = self.run(np.stack(inputs))
        else:
            outputs = [self.run(x[None])[0] for x in inputs]
        return [self.to_label(output, info) for output, info in zip(outputs, trans_infos)]

    def run(self, batch):
        """The model's raw output for a preprocessed batch [N, 3, h, w]."""
        if any(size not in (None, -1) and size != actual for size, actual in zip(self.input_shape, batch.shape)):
            raise ValueError(f"the model was exported for input {self.input_shape}, got {list(batch.shape)} after "
                             "preprocessing; add a Resize transform or export without --input_shape")
        self.input.reshape(batch.shape)
        self.input.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self.predictor.run()
        return self.output.copy_to_cpu()

    def to_label(self, output, trans_info):
        """Label map at the original image size from one image's output ([h, w] labels or [C, h, w] scores)."""
        if self.output_op == 'argmax':
            return restore_label(output.astype(np.int32), trans_info)
        scores = reverse_transform(paddle.to_tensor(output[None]), trans_info)  # [1, C, H, W]
        return paddle.argmax(scores, axis=1)[0].numpy().astype(np.int32)


def predict_images(predictor, image_path, save_dir):
    """Predict every image under ``image_path`` (an image, a folder or a list file); write
    pseudo-colour masks and overlays to ``save_dir`` as tools/predict.py does. Returns the count."""
    paths, root = list_images(image_path)
    colors = color_map()
    for path in tqdm(paths, desc='infer', unit='image'):
        label = predictor.predict(path).astype(np.uint8)
        name = os.path.splitext(os.path.relpath(path, root))[0]
        save_pseudo_color(path, label, save_dir, name, colors)
    return len(paths)


def evaluate_predictor(predictor, dataset, save_json=None):
    """Metrics of an exported model on a PaddleSeg dataset in 'val' mode (its files, its labels).

    The predictor preprocesses each image with the deploy config's transforms, so the
    dataset's own transforms are not used; labels are compared at their original size.
    Under ``paddle.distributed.launch`` each process takes its share and the counts are summed.
    """
    metrics = metrics_for(dataset)
    files = [dataset.file_list[index] for index in process_share(len(dataset.file_list))]
    for image_path, label_path in tqdm(files, desc='evaluate', unit='image', disable=dist.get_rank() != 0):
        label = np.asarray(Image.open(label_path))
        metrics.update(predictor.predict(image_path), label)
    metrics.sum_over_processes()
    return report_metrics(metrics, save_json)
