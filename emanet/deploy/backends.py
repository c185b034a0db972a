"""Which runtime runs which export format, and ``load_exported``, the one way to open an exported folder.

Paddle Inference is always there; ONNX Runtime and OpenVINO (``emanet.deploy.runtimes``) are optional and
imported only when asked for.
"""
from emanet.deploy.paddle_inference import PaddleInferenceSegmenter
from emanet.deploy.static_graph import read_deploy_config
from emanet.errors import InvalidInput

# What each backend runs, and the formats of deploy.yaml it reads.
BACKEND_FORMATS = {'paddle': ('paddle',), 'onnxruntime': ('onnx',), 'openvino': ('openvino', 'onnx')}
DEFAULT_BACKEND = {'paddle': 'paddle', 'onnx': 'onnxruntime', 'openvino': 'openvino'}


def load_exported(deploy_path, backend=None, device='cpu', precision='fp32', cpu_threads=None,
                  options=None):
    """The exported model in ``deploy_path`` as a Segmenter, in ``backend`` (by default the one its
    format is made for: paddle -> Paddle Inference, onnx -> ONNX Runtime, openvino -> OpenVINO), run with
    the test-time ``options`` (an ``InferenceOptions``; flips, scales and windows need a logits export)."""
    deploy_format = read_deploy_config(deploy_path)['format']
    backend = backend or DEFAULT_BACKEND.get(deploy_format)
    if backend not in BACKEND_FORMATS:
        raise InvalidInput(f"backend must be one of {', '.join(BACKEND_FORMATS)}, got '{backend}'")
    if deploy_format not in BACKEND_FORMATS[backend]:
        raise InvalidInput(f"{deploy_path} holds a {deploy_format} model, which {backend} does not run; "
                         f"use --backend {DEFAULT_BACKEND[deploy_format]}")
    if backend == 'paddle':
        return PaddleInferenceSegmenter(deploy_path, device=device, precision=precision, cpu_threads=cpu_threads,
                                        options=options)
    from emanet.deploy.runtimes import OnnxRuntimeSegmenter, OpenVINOSegmenter
    runtime = OnnxRuntimeSegmenter if backend == 'onnxruntime' else OpenVINOSegmenter
    return runtime(deploy_path, device=device, precision=precision, cpu_threads=cpu_threads, options=options)
