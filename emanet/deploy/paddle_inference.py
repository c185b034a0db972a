"""Paddle Inference runs a Paddle export (model.json or model.pdmodel): oneDNN on CPU, CUDA on GPU."""
import paddle
from paddle import inference

from emanet.deploy.exported import ExportedSegmenter
from emanet.errors import InvalidInput, Unsupported
from emanet.device import bf16_kind, default_cpu_threads, launcher_gpu_id, parse_device

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


class PaddleInferenceSegmenter(ExportedSegmenter):
    """A Paddle export (model.json or model.pdmodel) in Paddle Inference: oneDNN on CPU, CUDA on GPU.

    Args:
        deploy_path: deploy.yaml, or the folder holding it.
        device: 'cpu' (oneDNN), 'gpu' or 'gpu:N'.
        precision: 'fp32'; 'bf16' on a CPU with AVX-512; 'fp16' on GPU.
        cpu_threads: math threads on CPU; None: ``emanet.device.default_cpu_threads()``.
    """

    backend = 'paddle'

    def __init__(self, deploy_path, device='cpu', precision='fp32', cpu_threads=None, options=None):
        super().__init__(deploy_path, options)
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
