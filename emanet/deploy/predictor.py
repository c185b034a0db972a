"""An exported model behind the Segmenter interface, through Paddle Inference; oneDNN stays on for CPU."""
import numpy as np
import paddle
from paddle import inference

from emanet.deploy.export import read_deploy_config
from emanet.errors import InvalidInput, Unsupported
from emanet.device import bf16_kind, default_cpu_threads, launcher_gpu_id, parse_device
from emanet.segmenter import Segmenter, build_transforms, undo_transforms

PRECISIONS = ('fp32', 'bf16', 'fp16')
# The EM unit's products, softmax and normalisations (see EMAU) lose too much in fp16; Paddle
# Inference's mixed precision keeps these operators in float32 (matmul also in the exported resize,
# a small share of the work). The convolutions stay in fp16.
FLOAT32_OPS = frozenset({'matmul', 'softmax', 'p_norm', 'maximum', 'divide'})
GPU_MEMORY_POOL_MB = 256


def inference_config(model_file, params_file, device='cpu', precision='fp32', cpu_threads=None):
    """A Paddle Inference config: oneDNN on CPU (bf16 kernels for 'bf16'), CUDA on GPU ('fp16' there).

    ``device`` is 'cpu', 'gpu' or 'gpu:N'. A combination this machine or build cannot run ends in
    one ValueError/RuntimeError sentence. ``cpu_threads`` None: ``emanet.device.default_cpu_threads()``.
    """
    kind, gpu_id = parse_device(device)
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if kind == 'gpu' and not paddle.is_compiled_with_cuda():
        raise Unsupported("device 'gpu' needs PaddlePaddle built with CUDA; this one is CPU-only")
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
            raise InvalidInput("bf16 runs on CPU only (oneDNN); on GPU use fp16 or fp32")
        half = precision == 'fp16'
        config.enable_use_gpu(GPU_MEMORY_POOL_MB, launcher_gpu_id() if gpu_id is None else gpu_id,
                              inference.PrecisionType.Half if half else inference.PrecisionType.Float32)
        if half:
            config.exp_disable_mixed_precision_ops(set(FLOAT32_OPS))
        return config
    if precision == 'fp16':
        raise InvalidInput("fp16 runs on GPU only; on CPU use bf16 or fp32")
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(cpu_threads or default_cpu_threads())
    if precision == 'bf16':
        if bf16_kind() is None:
            raise InvalidInput("bf16 needs a CPU with AVX-512 (oneDNN's bf16 kernels); this one has none, use fp32")
        config.enable_mkldnn_bfloat16()
    return config


class ExportedSegmenter(Segmenter):
    """Label maps from an exported model (a folder with deploy.yaml); ``load_exported`` picks the runtime.

    Single images go through the deploy config's transforms (the config's val transforms at export
    time); labels come back at each image's own size. An 'argmax' export's labels are resized back
    by nearest neighbour; 'softmax'/'none' exports resize the scores first, as the dygraph model does.
    Subclasses run the graph (``infer``): Paddle Inference, ONNX Runtime or OpenVINO.
    """

    backend = None

    def __init__(self, deploy_path):
        self.deploy = read_deploy_config(deploy_path)
        self.output_op = self.deploy['output_op']
        self.num_classes = self.deploy.get('num_classes')
        self.input_shape = self.deploy.get('input_shape') or [None] * 4  # None: any size
        self.transforms = build_transforms(self.deploy['transforms'])

    def infer(self, batch):
        """The graph's output for a contiguous float32 batch [N, 3, h, w]."""
        raise NotImplementedError

    def run(self, batch):
        """The model's raw output for a preprocessed batch [N, 3, h, w] (numpy or Tensor)."""
        batch = np.asarray(batch.numpy() if isinstance(batch, paddle.Tensor) else batch)
        if any(size not in (None, -1) and size != actual for size, actual in zip(self.input_shape, batch.shape)):
            raise InvalidInput(f"the model was exported for input {self.input_shape}, got {list(batch.shape)} after "
                             "preprocessing; add a Resize transform or export without --input_shape")
        return self.infer(np.ascontiguousarray(batch, dtype=np.float32))

    def logits(self, images):
        if self.output_op == 'argmax':
            raise InvalidInput("this model was exported with output_op argmax: it gives labels, not scores "
                             "(export with --output_op softmax or none for scores)")
        return paddle.to_tensor(self.run(images))

    def labels(self, images, trans_info):
        if self.output_op != 'argmax':
            return super().labels(images, trans_info)
        labels = paddle.to_tensor(self.run(images)[:, None].astype(np.float32))  # [N, 1, h, w]
        return undo_transforms(labels, trans_info, labels=True)[:, 0].numpy().astype(np.int32)


class PaddleInferenceSegmenter(ExportedSegmenter):
    """A Paddle export (model.json or model.pdmodel) in Paddle Inference: oneDNN on CPU, CUDA on GPU.

    Args:
        deploy_path: deploy.yaml, or the folder holding it.
        device: 'cpu' (oneDNN), 'gpu' or 'gpu:N'.
        precision: 'fp32'; 'bf16' on a CPU with AVX-512; 'fp16' on GPU.
        cpu_threads: math threads on CPU; None: ``emanet.device.default_cpu_threads()``.
    """

    backend = 'paddle'

    def __init__(self, deploy_path, device='cpu', precision='fp32', cpu_threads=None):
        super().__init__(deploy_path)
        if precision == 'bf16' and self.deploy['model'].endswith('.pdmodel'):
            raise InvalidInput("bf16 needs the model.json export: Paddle 3.3 runs a legacy model.pdmodel in fp32 "
                             "only (export without --legacy_program for bf16)")
        config = inference_config(self.deploy['model'], self.deploy['params'], device, precision, cpu_threads)
        self.predictor = inference.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def infer(self, batch):
        self.input.reshape(batch.shape)
        self.input.copy_from_cpu(batch)
        self.predictor.run()
        return self.output.copy_to_cpu()


# What each backend runs, and the formats of deploy.yaml it reads.
BACKEND_FORMATS = {'paddle': ('paddle',), 'onnxruntime': ('onnx',), 'openvino': ('openvino', 'onnx')}
DEFAULT_BACKEND = {'paddle': 'paddle', 'onnx': 'onnxruntime', 'openvino': 'openvino'}


def load_exported(deploy_path, backend=None, device='cpu', precision='fp32', cpu_threads=None):
    """The exported model in ``deploy_path`` as a Segmenter, in ``backend`` (by default the one its
    format is made for: paddle -> Paddle Inference, onnx -> ONNX Runtime, openvino -> OpenVINO)."""
    deploy_format = read_deploy_config(deploy_path)['format']
    backend = backend or DEFAULT_BACKEND.get(deploy_format)
    if backend not in BACKEND_FORMATS:
        raise InvalidInput(f"backend must be one of {', '.join(BACKEND_FORMATS)}, got '{backend}'")
    if deploy_format not in BACKEND_FORMATS[backend]:
        raise InvalidInput(f"{deploy_path} holds a {deploy_format} model, which {backend} does not run; "
                         f"use --backend {DEFAULT_BACKEND[deploy_format]}")
    if backend == 'paddle':
        return PaddleInferenceSegmenter(deploy_path, device=device, precision=precision, cpu_threads=cpu_threads)
    from emanet.deploy.runtimes import OnnxRuntimeSegmenter, OpenVINOSegmenter
    runtime = OnnxRuntimeSegmenter if backend == 'onnxruntime' else OpenVINOSegmenter
    return runtime(deploy_path, device=device, precision=precision, cpu_threads=cpu_threads)
