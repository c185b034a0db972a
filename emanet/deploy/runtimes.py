"""ONNX Runtime and OpenVINO behind the Segmenter interface, for the ONNX and OpenVINO exports.

Both are optional (``pip install -r requirements-deploy.txt``); they run on CPU. Paddle Inference
(``emanet.deploy.paddle_inference``) stays the runtime for GPUs.
"""
import sys

from emanet.deploy.exported import ExportedSegmenter
from emanet.errors import InvalidInput, Unsupported
from emanet.device import bf16_kind, default_cpu_threads, parse_device

DEPLOY_EXTRA = 'pip install -r requirements-deploy.txt'
# Deploy packages that PyPI has no usable wheel of for every Python: the first and last Python with
# one, and what makes a wheel usable where older ones exist.
WHEEL_PYTHONS = {'paddle2onnx': ((3, 8), (3, 12), ''),
                 'openvino': ((3, 10), (3, 13), " that read this model's ONNX graph")}


def require(module, purpose):
    """Import an optional deploy dependency, or one clear error saying how to install it (or that
    this Python has no wheel of it)."""
    try:
        return __import__(module)
    except ImportError:
        pass
    python = sys.version_info[:2]
    first, last, usable = WHEEL_PYTHONS.get(module, (python, python, ''))
    if not first <= python <= last:
        raise Unsupported(f"{purpose} needs the '{module}' package, which has wheels{usable} for Python "
                          f"{first[0]}.{first[1]} to {last[0]}.{last[1]} only, not for this Python "
                          f"{python[0]}.{python[1]}") from None
    raise Unsupported(f"{purpose} needs the '{module}' package: {DEPLOY_EXTRA}") from None


def _cpu_only(device, backend):
    if parse_device(device)[0] != 'cpu':
        raise InvalidInput(f"{backend} runs here on CPU only; on a GPU use --backend paddle with a Paddle export")


class OnnxRuntimeSegmenter(ExportedSegmenter):
    """An ONNX export in ONNX Runtime (CPU, float32)."""

    backend = 'onnxruntime'

    def __init__(self, deploy_path, device='cpu', precision='fp32', cpu_threads=None, options=None):
        super().__init__(deploy_path, options)
        _cpu_only(device, self.backend)
        if precision != 'fp32':
            raise InvalidInput(f"ONNX Runtime runs this model in fp32 only, got --precision {precision}; "
                             "for bf16 or int8 use --backend openvino")
        ort = require('onnxruntime', 'ONNX Runtime inference')
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = cpu_threads or default_cpu_threads()
        self.session = ort.InferenceSession(self.deploy['model'], session_options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, batch):
        return self.session.run(None, {self.input_name: batch})[0]


class OpenVINOSegmenter(ExportedSegmenter):
    """An OpenVINO (or ONNX) export in OpenVINO on CPU: fp32, or bf16 where the CPU has it.

    The precision is asked for explicitly: on a CPU with bf16, OpenVINO would otherwise compute an
    fp32 model in bf16. An int8 export runs its quantized operations in int8 either way.
    """

    backend = 'openvino'
    PRECISION_HINTS = {'fp32': 'f32', 'bf16': 'bf16'}

    def __init__(self, deploy_path, device='cpu', precision='fp32', cpu_threads=None, options=None):
        super().__init__(deploy_path, options)
        _cpu_only(device, self.backend)
        if precision not in self.PRECISION_HINTS:
            raise InvalidInput(f"OpenVINO runs fp32 or bf16 (an int8 export is int8 either way), got '{precision}'")
        if precision == 'bf16' and bf16_kind() != 'native':
            raise InvalidInput("bf16 needs a CPU with AVX-512 bf16 or AMX; this one has neither, use fp32")
        ov = require('openvino', 'OpenVINO inference')
        config = {'INFERENCE_PRECISION_HINT': self.PRECISION_HINTS[precision]}
        if cpu_threads:
            config['INFERENCE_NUM_THREADS'] = int(cpu_threads)
        self.compiled = ov.Core().compile_model(self.deploy['model'], 'CPU', config)
        self.output_port = self.compiled.output(0)

    def infer(self, batch):
        return self.compiled([batch])[self.output_port]
