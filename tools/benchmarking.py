"""Speed and memory of EMANet on this machine: ours against PaddleSeg 2.8.0's, dygraph against exported.

The measuring code behind tools/benchmark.py; it uses the emanet package and is not part of it.

``run_benchmark`` measures, for one set of random weights:

- parameters and multiply-adds (Conv2D layers by forward hooks, the EM unit by its formula);
- eval latency and peak memory of (a) our dygraph model, (b) PaddleSeg's EMANet holding the same
  weights, with glibc's default allocator, (b') the same under emanet's runtime settings
  (``emanet.device.tune_cpu_allocator``), so that model and runtime gains show apart, (c) our
  exported model through Paddle Inference with oneDNN fp32, (d) the same in bf16;
- a training step of (a), (b) and (b'), the cost of flip evaluation, and how often the variants' labels agree;
- the EM unit alone against a non-local block of the same width;
- optionally, fp32 against bf16 labels and mIoU of a trained quick-start model.

Every measurement runs in a fresh Python process, so its peak memory is its own and no variant
warms caches or allocators for the next; rounds repeat every process in alternating order.
A few rows share a process with the row they are compared with, measured after the lighter one
or on the same workload: flip evaluation (after single-scale), PaddleSeg's train step with
Paddle's default threads (before the one with --threads), and the non-local block (after the EM unit).
"""
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import paddleseg
import paddleseg.models
from paddleseg.cvlibs import manager
from paddleseg.models import layers

from emanet.checkpoint import load_weights, save_state
from emanet.config import Builder, ConfigError, build_model, closest, load_config
from emanet.deploy.export import onnx_converter, preprocessed_images, to_onnx, to_openvino
from emanet.deploy.static_graph import export_model, export_stage
from emanet.deploy.backends import load_exported
from emanet.deploy.runtimes import require
from emanet.engine.evaluate import evaluate
from emanet.engine.inference import infer_logits
from emanet.errors import InvalidInput, Unsupported
from emanet.models.losses import CrossEntropyLoss
from emanet.logger import logger
from emanet.models import EMAU, EMANet
from emanet.device import (MKL_AVX2_CPU_TYPE, MKL_CPU_TYPE_VARIABLE, bf16_kind, cpu_info, cpu_vendor,
                            fast_mkl_applied, set_cpu_threads, tune_cpu_allocator)
from emanet.segmenter import InferenceOptions, Segmenter

# Parts a user can leave out with --skip.
PARTS = ('macs', 'paddleseg', 'inference', 'bf16', 'runtimes', 'flip', 'msflip', 'train', 'em_unit')
# Random images the int8 export is calibrated on (latency does not depend on what they show).
CALIBRATION_IMAGES = 8
# The published multi-scale + flip evaluation.
MULTI_SCALES = (0.75, 1.0, 1.25)
# EM unit and non-local block are compared on a feature map [1, 512, H, W]; by default
# (W, H) = (128, 64), the EM head's input for a 1024x512 image at output stride 8.
ATTENTION_CHANNELS = 512
NON_LOCAL_INTER_CHANNELS = 256
EM_UNIT_MACS_FORMULA = '(2T+1)*N*C*K'
AUX_LOSS_COEF = 0.4
# The Cityscapes recipe's optimizer; only the step's cost matters here.
TRAIN_OPTIMIZER = {'learning_rate': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4}
# The input channels PaddleSeg 2.8.0's EMAHead gives its auxiliary head, whatever the backbone.
PADDLESEG_AUX_CHANNELS = 1024
# Every row of the report, in its order; "ours" is emanet, "PaddleSeg" is paddleseg.models.EMANet.
ROWS = {
    'eval_ours': '(a) ours, dygraph eval',
    'eval_paddleseg': "(b) PaddleSeg 2.8.0, dygraph eval, Paddle's defaults (allocator, MKL's path)",
    'eval_paddleseg_fast_mkl': "(b) with MKL's AVX2 path forced (MKL_DEBUG_CPU_TYPE=5)",
    'eval_paddleseg_tuned': "(b') PaddleSeg 2.8.0 model, dygraph eval, emanet's runtime",
    'infer_fp32': '(c) ours, exported, Paddle Inference oneDNN fp32',
    'infer_bf16': '(d) ours, exported, Paddle Inference oneDNN bf16',
    'infer_onnxruntime_fp32': '(e) ours, ONNX, ONNX Runtime fp32',
    'infer_openvino_fp32': '(f) ours, OpenVINO fp32',
    'infer_openvino_bf16': '(g) ours, OpenVINO bf16',
    'infer_openvino_int8': '(h) ours, OpenVINO int8 (NNCF post-training quantization)',
    'eval_ours_flip': 'ours, dygraph eval + horizontal flip',
    'eval_ours_msflip': 'ours, dygraph eval, scales 0.75/1.0/1.25 + flip',
    'train_ours': '(a) ours, train step',
    'train_paddleseg': "(b) PaddleSeg 2.8.0, train step, Paddle's default allocator",
    'train_paddleseg_default_threads': "(b) PaddleSeg 2.8.0, train step, Paddle's defaults (1 math thread)",
    'train_paddleseg_tuned': "(b') PaddleSeg 2.8.0 model, train step, emanet's runtime",
    'em_unit': 'EM unit',
    'non_local': 'non-local block (embedded Gaussian)',
}
# The rows that need an ONNX export (paddle2onnx) and OpenVINO.
RUNTIME_ROWS = ('infer_onnxruntime_fp32', 'infer_openvino_fp32', 'infer_openvino_bf16', 'infer_openvino_int8')
# Each measurement is a fresh process running this module's run_worker (a module beside the tools,
# not part of the emanet package).
WORKER_CODE = ('import sys; sys.path.insert(0, sys.argv[2]); from benchmarking import run_worker; '
               'run_worker(sys.argv[1])')
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))


def em_unit_macs(num_pixels, channels, num_bases, stage_num):
    """Multiply-adds of the EM unit: (2T+1)*N*C*K.

    Each of the T iterations multiplies x^T mu (N*C*K) and x z (N*C*K); the reconstruction
    mu z^T adds one more N*C*K. Softmax and normalisations are O(N*K) and left out.
    """
    return (2 * stage_num + 1) * num_pixels * channels * num_bases


def non_local_macs(num_pixels, channels, inter_channels):
    """Multiply-adds of ``NonLocalBlock``: four 1x1 convs (4*N*C*C') and two N x N products (2*N^2*C')."""
    return 4 * num_pixels * channels * inter_channels + 2 * num_pixels ** 2 * inter_channels


class NonLocalBlock(nn.Layer):
    """Benchmark reference only, not part of EMANet: the embedded-Gaussian non-local block
    (Wang et al., CVPR 2018), the attention EMANet was proposed to replace.

    z = x + BN(W y) with y = softmax_N(theta(x)^T phi(x)) g(x): every pixel attends to all N
    pixels, so time and memory grow with N^2 where the EM unit's grow with N*K.
    """

    def __init__(self, channels, inter_channels):
        super().__init__()
        self.theta = nn.Conv2D(channels, inter_channels, 1)
        self.phi = nn.Conv2D(channels, inter_channels, 1)
        self.g = nn.Conv2D(channels, inter_channels, 1)
        self.out_conv = nn.Conv2D(inter_channels, channels, 1)
        self.out_bn = nn.BatchNorm2D(channels)

    def forward(self, x):
        shape = paddle.shape(x)  # [B, C, H, W]
        theta = self.theta(x).flatten(2).transpose([0, 2, 1])  # [B, N, C']
        phi = self.phi(x).flatten(2)  # [B, C', N]
        g = self.g(x).flatten(2).transpose([0, 2, 1])  # [B, N, C']
        attention = F.softmax(paddle.bmm(theta, phi), axis=2)  # [B, N, N]
        y = paddle.bmm(attention, g).transpose([0, 2, 1])  # [B, C', N]
        y = paddle.reshape(y, [0, 0, shape[2], shape[3]])  # [B, C', H, W]
        return x + self.out_bn(self.out_conv(y))


def count_macs(model, input_shape):
    """Parameters and multiply-adds of ``model`` (in eval mode) for one input of ``input_shape``.

    Conv2D layers are counted by forward hooks (output elements x input channels per group x
    kernel area); each EM unit adds ``em_unit_macs``. BatchNorm, activations, softmax and the
    bilinear resize are not counted. Returns a JSON-serialisable dict.
    """
    counts = {'conv': 0, 'em_unit': 0}
    em_terms = []

    def conv_hook(layer, inputs, output):
        counts['conv'] += int(np.prod(output.shape)) * int(np.prod(layer.weight.shape[1:]))

    def em_unit_hook(layer, inputs):
        batch, channels, height, width = inputs[0].shape
        num_pixels = batch * height * width
        counts['em_unit'] += em_unit_macs(num_pixels, channels, layer.num_bases, layer.stage_num)
        em_terms.append({'N': num_pixels, 'C': channels, 'K': layer.num_bases, 'T': layer.stage_num})

    hooks = []
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, nn.Conv2D):
            hooks.append(layer.register_forward_post_hook(conv_hook))
        elif isinstance(layer, EMAU):
            hooks.append(layer.register_forward_pre_hook(em_unit_hook))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros(input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        if was_training:
            model.train()
    return {
        'params': sum(int(np.prod(p.shape)) for p in model.parameters()),
        'conv_macs': counts['conv'],
        'em_unit_macs': counts['em_unit'],
        'total_macs': counts['conv'] + counts['em_unit'],
        'em_unit_formula': EM_UNIT_MACS_FORMULA,
        'em_unit_terms': em_terms,
        'input_shape': list(input_shape),
    }


def model_spec_from_config(cfg, num_classes=None):
    """EMANet keyword arguments (backbone as a {'type': ...} dict) from a loaded config, without pretrained weights."""
    path = getattr(cfg, 'path', 'config')
    model_cfg = copy.deepcopy(cfg.dic.get('model') or {})
    if model_cfg.pop('type', None) != 'EMANet':
        raise ConfigError(f"{path}: the benchmark needs model.type EMANet")
    model_cfg.pop('pretrained', None)
    if not isinstance(model_cfg.get('backbone'), dict):
        raise ConfigError(f"{path}: model.backbone must be a {{type: ...}} mapping")
    model_cfg['backbone'].pop('pretrained', None)
    if num_classes is not None:
        model_cfg['num_classes'] = num_classes
    return model_cfg


def model_spec_for_backbone(backbone, num_classes=19):
    """The published EMANet head (PaddleSeg's defaults) on ``backbone`` at output stride 8."""
    return {'backbone': {'type': backbone, 'output_stride': 8}, 'num_classes': num_classes}


def build_emanet(model_spec, implementation='ours'):
    """Our EMANet ('ours') or PaddleSeg 2.8.0's ('paddleseg') from a model spec; random weights."""
    kwargs = copy.deepcopy(model_spec)
    backbone_cfg = kwargs.pop('backbone')
    backbone_type = backbone_cfg.pop('type')
    known = manager.BACKBONES.components_dict
    if backbone_type not in known:
        raise InvalidInput(f"unknown backbone '{backbone_type}'{closest(backbone_type, known)}")
    backbone = manager.BACKBONES[backbone_type](**backbone_cfg)
    if implementation == 'ours':
        return EMANet(backbone=backbone, **kwargs)
    model = paddleseg.models.EMANet(backbone=backbone, **kwargs)
    aux_channels = backbone.feat_channels[model.backbone_indices[0]]
    if aux_channels != PADDLESEG_AUX_CHANNELS:
        # PaddleSeg hard-codes the aux head's input to C3 of ResNet50/101; give it this backbone's,
        # as ours does, so that both models hold the same weights.
        model.head.aux[0] = layers.ConvBNReLU(aux_channels, 256, kernel_size=3)
    return model


# --- measurements, run inside a worker process ---------------------------------------------------

def current_memory_mb(device):
    """Memory in use now: RSS on CPU, allocated device memory on GPU."""
    if device == 'gpu':
        return paddle.device.cuda.memory_allocated() / 2 ** 20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def peak_memory_mb(device):
    """Peak memory of this process: RSS on CPU, allocated device memory on GPU.

    The CPU peak is VmHWM of /proc/self/status (Linux), not ``ru_maxrss``: a child process's
    ru_maxrss also holds its parent's peak (exec keeps the old high-water mark), so the
    benchmark's own memory would leak into every variant.
    """
    if device == 'gpu':
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def time_calls(call, runs, warmup, device, setup_mb=None):
    """Time ``runs`` calls after ``warmup`` untimed ones: ({seconds, median_s, peak_mb, setup_mb},
    the last call's return value). setup_mb is the memory in use before the first call, unless given."""
    if setup_mb is None:
        setup_mb = current_memory_mb(device)
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        output = call()
        if device == 'gpu':
            paddle.device.synchronize()
        seconds.append(time.perf_counter() - start)
    return {'seconds': seconds, 'median_s': statistics.median(seconds), 'setup_mb': setup_mb,
            'peak_mb': peak_memory_mb(device)}, output


def random_images(shape, seed):
    """Images as the Normalize transform leaves them: uniform in [-1, 1]."""
    return np.random.RandomState(seed).uniform(-1, 1, shape).astype('float32')


def _model_with_shared_weights(spec):
    model = build_emanet(spec['model'], spec['implementation'])
    load_weights(model, spec['weights'])
    return model


def measure_eval(spec):
    """Dygraph eval to full-resolution logits; with spec['flip'], then the same with a horizontal flip.

    Flip runs in the same process: its cost is a ratio to the single-scale time, steadier when
    both are taken together, and its memory can only be higher, so the single-scale peak is read first.
    """
    model = _model_with_shared_weights(spec)
    model.eval()
    images = paddle.to_tensor(random_images(spec['input_shape'], spec['seed']))

    def forward(flip, scales=1.0):
        with paddle.no_grad():
            return infer_logits(model, images, InferenceOptions(aug_eval=flip, flip_horizontal=flip, scales=scales))

    single, logits = time_calls(lambda: forward(False), spec['runs'], spec['warmup'], spec['device'])
    np.save(spec['labels_path'], paddle.argmax(logits, axis=1).numpy().astype('int32'))
    results = {spec['name']: single}
    if spec.get('flip'):
        results[spec['name'] + '_flip'], _ = time_calls(lambda: forward(True), spec['runs'], spec['warmup'],
                                                        spec['device'], setup_mb=single['setup_mb'])
    if spec.get('msflip'):  # one forward per scale and flip: its working memory is about one forward's
        results[spec['name'] + '_msflip'], _ = time_calls(lambda: forward(True, MULTI_SCALES), spec['runs'],
                                                          spec['warmup'], spec['device'], setup_mb=single['setup_mb'])
    return results


def measure_inference(spec):
    """An exported model (spec['export']) in its runtime (spec['backend']) and spec['precision']."""
    predictor = load_exported(spec['exports'][spec['export']], backend=spec['backend'], device=spec['device'],
                              precision=spec['precision'], cpu_threads=spec['threads'])
    images = random_images(spec['input_shape'], spec['seed'])
    result, labels = time_calls(lambda: predictor.run(images), spec['runs'], spec['warmup'], spec['device'])
    np.save(spec['labels_path'], labels.astype('int32'))
    return {spec['name']: result}


def measure_train(spec):
    """One SGD step (momentum) on CE + 0.4 aux CE over a random batch and random labels.

    With spec['default_threads_first'], the step is first timed with Paddle's default number of
    math threads (as PaddleSeg's trainer runs it), then with spec['threads']: same workload, same process.
    """
    model = _model_with_shared_weights(spec)
    model.train()
    optimizer = paddle.optimizer.Momentum(parameters=model.parameters(), **TRAIN_OPTIMIZER)
    loss_fn = CrossEntropyLoss()
    batch, _, height, width = spec['input_shape']
    images = paddle.to_tensor(random_images(spec['input_shape'], spec['seed']))
    num_classes = spec['model']['num_classes']
    labels = paddle.to_tensor(np.random.RandomState(spec['seed'] + 1).randint(
        0, num_classes, (batch, height, width)).astype('int64'))

    def step():
        logits = model(images)
        loss = sum(coef * loss_fn(logit, labels) for coef, logit in zip((1.0, AUX_LOSS_COEF), logits))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    results = {}
    setup_mb = current_memory_mb(spec['device'])
    if spec.get('default_threads_first'):
        results[spec['name'] + '_default_threads'], _ = time_calls(step, spec['runs'], spec['warmup'],
                                                                   spec['device'])
        set_cpu_threads(spec['threads'])
    results[spec['name']], _ = time_calls(step, spec['runs'], spec['warmup'], spec['device'], setup_mb=setup_mb)
    return results


def measure_attention(spec):
    """The EM unit, then the non-local block, alone in eval mode on the same random feature map.

    One process for both: the non-local block's N x N attention needs far more memory than the
    EM unit's N x K responsibilities, so the EM unit's peak is read first and the block's is its own.
    """
    paddle.seed(spec['seed'])
    channels = spec['input_shape'][1]
    blocks = {'em_unit': EMAU(channels, spec['num_bases'], spec['stage_num']),
              'non_local': NonLocalBlock(channels, spec['inter_channels'])}
    features = paddle.randn(spec['input_shape'])
    setup_mb = current_memory_mb(spec['device'])
    results = {}
    for name, block in blocks.items():
        block.eval()

        def call():
            with paddle.no_grad():
                return block(features)

        results[name], _ = time_calls(call, spec['runs'], spec['warmup'], spec['device'], setup_mb=setup_mb)
    return results


MEASUREMENTS = {'eval': measure_eval, 'inference': measure_inference, 'train': measure_train,
                'attention': measure_attention}


def run_worker(spec_path):
    """Entry point of a worker process: run the measurement in ``spec_path``, write {row name: result}."""
    with open(spec_path) as f:
        spec = json.load(f)
    paddle.set_device(spec['device'])
    if not spec.get('default_threads_first'):
        set_cpu_threads(spec['threads'])
    if spec.get('runtime', 'emanet') == 'emanet':
        tune_cpu_allocator()
    results = MEASUREMENTS[spec['kind']](spec)
    with open(spec['result_path'], 'w') as f:
        json.dump(results, f)


def run_in_subprocess(spec, work_dir):
    """Run one measurement in a fresh Python process and return its {row name: result}."""
    name = spec['name']
    spec = dict(spec, result_path=os.path.join(work_dir, f'{name}.result.json'))
    spec_path = os.path.join(work_dir, f'{name}.spec.json')
    with open(spec_path, 'w') as f:
        json.dump(spec, f)
    env = dict(os.environ)
    if spec.get('runtime') == 'paddle' and not spec.get('fast_mkl') and fast_mkl_applied():
        # As PaddleSeg's users run it: MKL picks its code path by CPU vendor (empty: emanet leaves it alone).
        env[MKL_CPU_TYPE_VARIABLE] = ''
    if spec.get('fast_mkl'):
        env[MKL_CPU_TYPE_VARIABLE] = MKL_AVX2_CPU_TYPE
    process = subprocess.run([sys.executable, '-c', WORKER_CODE, spec_path, TOOLS_DIR], capture_output=True,
                             text=True, env=env)
    if process.returncode != 0:
        tail = '\n'.join(process.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark variant {name} failed (exit code {process.returncode}):\n{tail}")
    with open(spec['result_path']) as f:
        return json.load(f)


# --- the whole benchmark -------------------------------------------------------------------------

def fp32_peak_gmacs(threads, size=2048, repeats=5):
    """A practical fp32 peak of this CPU, in GMAC/s: a large matrix product in OpenVINO (oneDNN's
    AVX-512/AMX kernels, unlike the MKL path Paddle's dygraph takes on AMD) on ``threads`` threads;
    None without OpenVINO (the report then leaves the shares of the peak out)."""
    try:
        ov = require('openvino', 'the CPU peak estimate')
    except RuntimeError:
        return None
    from openvino import opset13 as ops
    rng = np.random.RandomState(0)
    x = ops.parameter([size, size], np.float32)
    product = ov.Model([ops.matmul(x, ops.constant(rng.rand(size, size).astype('float32')), False, False)], [x])
    compiled = ov.Core().compile_model(product, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32',
                                                        'INFERENCE_NUM_THREADS': int(threads)})
    a = rng.rand(size, size).astype('float32')
    compiled([a])
    start = time.perf_counter()
    for _ in range(repeats):
        compiled([a])
    return size ** 3 * repeats / (time.perf_counter() - start) / 1e9


# How many times the fp32 rate a precision's multiply-adds can run at, where the CPU has the instructions.
PRECISION_SPEEDUP = {'bf16': ('avx512_bf16', 2), 'int8': ('vnni', 4)}


def machine_info(device, threads=None):
    """CPU model, cores, threads (None: one per core), versions, and whether the CPU has AMX and oneDNN bf16."""
    cpu = cpu_info()
    model_name, flags = cpu.model or platform.processor() or 'unknown', cpu.flags
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    info = {
        'cpu': model_name,
        'fp32_peak_gmacs': fp32_peak_gmacs(threads or len(os.sched_getaffinity(0))) if device == 'cpu' else None,
        'cores': cores,
        'threads': threads or cores,
        'device': device,
        'paddle': paddle.__version__,
        'paddleseg': paddleseg.__version__,
        'python': platform.python_version(),
        'vendor': cpu_vendor(),
        'amx': 'amx_bf16' in flags,
        'avx512_bf16': 'avx512_bf16' in flags,
        'vnni': bool({'avx512_vnni', 'avx_vnni'} & flags),
        'mkl_cpu_type': os.environ.get(MKL_CPU_TYPE_VARIABLE),
        'bf16_supported': bf16_kind() is not None,
    }
    if device == 'gpu':
        info['gpu'] = paddle.device.cuda.get_device_name()
    return info


def plan_jobs(skip, device, threads, bf16_supported):
    """The worker processes to run, as partial specs ({'name', 'kind', ...}), in order;
    and {row name: reason} for rows this machine cannot measure."""
    jobs, unavailable = [], {}
    jobs.append({'name': 'eval_ours', 'kind': 'eval', 'implementation': 'ours', 'flip': 'flip' not in skip,
                 'msflip': 'msflip' not in skip})
    if 'paddleseg' not in skip:
        jobs.append({'name': 'eval_paddleseg', 'kind': 'eval', 'implementation': 'paddleseg', 'runtime': 'paddle'})
        if cpu_vendor() == 'AuthenticAMD':  # elsewhere MKL takes its fast path anyway
            jobs.append({'name': 'eval_paddleseg_fast_mkl', 'kind': 'eval', 'implementation': 'paddleseg',
                         'runtime': 'paddle', 'fast_mkl': True})
        jobs.append({'name': 'eval_paddleseg_tuned', 'kind': 'eval', 'implementation': 'paddleseg'})
    if 'inference' not in skip:
        jobs.append({'name': 'infer_fp32', 'kind': 'inference', 'export': 'paddle', 'backend': 'paddle',
                     'precision': 'fp32'})
        if 'bf16' not in skip and device == 'cpu' and bf16_supported:
            jobs.append({'name': 'infer_bf16', 'kind': 'inference', 'export': 'paddle', 'backend': 'paddle',
                         'precision': 'bf16'})
        elif 'bf16' not in skip:
            unavailable['infer_bf16'] = ('not supported (oneDNN bf16 needs a CPU with AVX-512)' if device == 'cpu'
                                         else 'not supported on GPU (oneDNN bf16 is CPU-only)')
    if 'runtimes' not in skip and device == 'cpu':
        jobs.append({'name': 'infer_onnxruntime_fp32', 'kind': 'inference', 'export': 'onnx',
                     'backend': 'onnxruntime', 'precision': 'fp32'})
        jobs.append({'name': 'infer_openvino_fp32', 'kind': 'inference', 'export': 'openvino',
                     'backend': 'openvino', 'precision': 'fp32'})
        if bf16_kind() == 'native':
            jobs.append({'name': 'infer_openvino_bf16', 'kind': 'inference', 'export': 'openvino',
                         'backend': 'openvino', 'precision': 'bf16'})
        else:
            unavailable['infer_openvino_bf16'] = 'not fast here (the CPU has neither AVX-512 bf16 nor AMX)'
        jobs.append({'name': 'infer_openvino_int8', 'kind': 'inference', 'export': 'openvino_int8',
                     'backend': 'openvino', 'precision': 'fp32'})
    if 'train' not in skip:
        jobs.append({'name': 'train_ours', 'kind': 'train', 'implementation': 'ours'})
        if 'paddleseg' not in skip:
            jobs.append({'name': 'train_paddleseg', 'kind': 'train', 'implementation': 'paddleseg',
                         'runtime': 'paddle', 'default_threads_first': device == 'cpu' and threads > 1})
            jobs.append({'name': 'train_paddleseg_tuned', 'kind': 'train', 'implementation': 'paddleseg'})
    if 'em_unit' not in skip:
        jobs.append({'name': 'attention', 'kind': 'attention'})
    return jobs, unavailable


def label_agreement(labels_a, labels_b):
    """Percentage of pixels where two label maps agree."""
    return float((np.asarray(labels_a) == np.asarray(labels_b)).mean() * 100)


class _RecordingSegmenter(Segmenter):
    """Another segmenter's labels, kept in order for comparing precisions on the same images."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.outputs = []

    def labels(self, images, trans_info):
        labels = self.segmenter.labels(images, trans_info)
        self.outputs.append(labels)
        return labels


def _convert_for_runtimes(paddle_dir, work_dir, input_shape, seed):
    """The Paddle export as ONNX, OpenVINO fp32 and OpenVINO int8 (calibrated on random images)."""
    exports = {name: os.path.join(work_dir, name) for name in ('onnx', 'openvino', 'openvino_int8')}
    to_onnx(paddle_dir, exports['onnx'])
    to_openvino(exports['onnx'], exports['openvino'])
    calibration = [random_images(input_shape[1:], seed + index) for index in range(CALIBRATION_IMAGES)]
    to_openvino(exports['onnx'], exports['openvino_int8'], calibration)
    return exports


# The quick-start checks: (row, export, backend, precision); the first is the reference.
QUICKSTART_PATHS = (('infer_fp32', 'paddle', 'paddle', 'fp32'), ('infer_bf16', 'paddle', 'paddle', 'bf16'),
                    ('infer_onnxruntime_fp32', 'onnx', 'onnxruntime', 'fp32'),
                    ('infer_openvino_fp32', 'openvino', 'openvino', 'fp32'),
                    ('infer_openvino_bf16', 'openvino', 'openvino', 'bf16'),
                    ('infer_openvino_int8', 'openvino_int8', 'openvino', 'fp32'))
QUICKSTART_CALIBRATION_IMAGES = 32


def evaluate_quickstart(config_path, weights, work_dir, device='cpu', threads=None, bf16=True, runtimes=True):
    """Export a trained quick-start model for every runtime (int8 calibrated on its training images);
    each path's mIoU over the val set and its labels' agreement with Paddle Inference fp32."""
    cfg = load_config(config_path)
    with export_stage():
        model = build_model(cfg, weights=weights)
    transforms = cfg.val_dataset_cfg.get('transforms') or []
    exports = {'paddle': os.path.join(work_dir, 'quickstart_export')}
    export_model(model, exports['paddle'], transforms, output_op='argmax')
    if runtimes:
        builder = Builder(cfg)
        step = max(1, len(builder.train_dataset.file_list) // QUICKSTART_CALIBRATION_IMAGES)
        calibration = preprocessed_images([files[0] for files in builder.train_dataset.file_list[::step]
                                           ][:QUICKSTART_CALIBRATION_IMAGES], transforms)
        exports.update({name: os.path.join(work_dir, f'quickstart_{name}')
                        for name in ('onnx', 'openvino', 'openvino_int8')})
        to_onnx(exports['paddle'], exports['onnx'])
        to_openvino(exports['onnx'], exports['openvino'])
        to_openvino(exports['onnx'], exports['openvino_int8'], calibration)
    dataset = Builder(cfg).val_dataset
    result = {'config': config_path, 'weights': weights, 'num_images': len(dataset), 'paths': {}}
    reference = None
    for name, export, backend, precision in QUICKSTART_PATHS:
        if export not in exports or (precision == 'bf16' and not bf16) or (backend == 'openvino' and precision == 'bf16'
                                                                            and bf16_kind() != 'native'):
            continue
        recorded = _RecordingSegmenter(load_exported(exports[export], backend=backend, device=device,
                                                     precision=precision, cpu_threads=threads))
        path = {'miou': evaluate(recorded, dataset)['miou']}
        if reference is None:
            reference = recorded
        pairs = list(zip(reference.outputs, recorded.outputs))
        path['agreement_pct'] = sum(int((a == b).sum()) for a, b in pairs) / sum(a.size for a, _ in pairs) * 100
        result['paths'][name] = path
    return result


def run_benchmark(model_spec, input_size=(1024, 512), train_size=(512, 256), train_batch=2,
                  attention_size=(128, 64), runs=3, rounds=3, warmup=1, threads=None, device='cpu', skip=(),
                  quickstart_model=None, quickstart_config='configs/quickstart.yml', transforms=None,
                  seed=0, command=''):
    """Run every measurement and return the results as a JSON-serialisable dict.

    Args:
        model_spec: from ``model_spec_from_config`` or ``model_spec_for_backbone``.
        input_size, train_size: (width, height) of the eval input and of the training crops.
        attention_size: (width, height) of the feature map for the EM unit and the non-local block.
        runs, rounds: each round runs every variant's process once, timing ``runs`` calls after
            ``warmup``; rounds alternate the order, so that a slow spell of a shared machine
            falls on every variant rather than on one. Medians are over all rounds.
        threads: CPU math threads for every variant; None uses every core this process may use.
        skip: names from ``PARTS`` to leave out.
        quickstart_model: a checkpoint trained with ``quickstart_config``; adds fp32 vs bf16 labels and mIoU.
        transforms: the val transforms stored with the export (they do not affect the timings).
    """
    unknown = [part for part in skip if part not in PARTS]
    if unknown:
        raise InvalidInput(f"unknown part to skip '{unknown[0]}'; known: {', '.join(PARTS)}")
    if runs < 1 or rounds < 1 or warmup < 0:
        raise InvalidInput(f"need runs >= 1, rounds >= 1 and warmup >= 0, got runs {runs}, rounds {rounds}, "
                         f"warmup {warmup}")
    runtimes_missing = None
    if 'runtimes' not in skip and device == 'cpu':
        try:
            onnx_converter()
            require('openvino', 'OpenVINO export and inference')
        except Unsupported as error:  # no paddle2onnx (3.13) or usable OpenVINO (3.9): the rows say why
            runtimes_missing = str(error)
            skip = tuple(skip) + ('runtimes',)
    paddle.set_device(device)
    machine = machine_info(device, threads)
    threads = machine['threads']
    width, height = input_size
    train_width, train_height = train_size
    eval_shape = [1, 3, height, width]
    attention_shape = [1, ATTENTION_CHANNELS, attention_size[1], attention_size[0]]
    results = {'command': command, 'machine': machine, 'model': model_spec, 'seed': seed,
               'runs': runs, 'rounds': rounds, 'warmup': warmup, 'variants': {}, 'labels': {}}

    with tempfile.TemporaryDirectory(prefix='emanet_benchmark_') as work_dir:
        paddle.seed(seed)
        with export_stage():
            model = build_emanet(model_spec)
        weights = os.path.join(work_dir, 'weights.pdparams')
        save_state(model.state_dict(), weights)
        if 'macs' not in skip:
            results['macs'] = count_macs(model, eval_shape)
            logger.info("[BENCH] %.1f M parameters, %.1f GMAC at %s", results['macs']['params'] / 1e6,
                        results['macs']['total_macs'] / 1e9, 'x'.join(map(str, eval_shape)))
        exports = {'paddle': os.path.join(work_dir, 'export')}
        if 'inference' not in skip or 'runtimes' not in skip:
            export_model(model, exports['paddle'], transforms or [{'type': 'Normalize'}], output_op='argmax')
        if 'runtimes' not in skip and device == 'cpu':
            exports.update(_convert_for_runtimes(exports['paddle'], work_dir, eval_shape, seed))
        attention = {'num_bases': model.head.emau.num_bases, 'stage_num': model.head.emau.stage_num,
                     'inter_channels': NON_LOCAL_INTER_CHANNELS}
        del model

        jobs, unavailable = plan_jobs(skip, device, threads, machine['bf16_supported'])
        if runtimes_missing:
            unavailable.update({name: runtimes_missing for name in RUNTIME_ROWS})
        base = {'device': device, 'threads': threads, 'runs': runs, 'warmup': warmup, 'seed': seed,
                'model': model_spec, 'weights': weights, 'exports': exports}
        shapes = {'eval': eval_shape, 'inference': eval_shape,
                  'train': [train_batch, 3, train_height, train_width], 'attention': attention_shape}
        measured = {}
        for round_index in range(rounds):
            for job in (jobs if round_index % 2 == 0 else jobs[::-1]):
                spec = dict(base, input_shape=shapes[job['kind']], **job)
                if job['kind'] in ('eval', 'inference'):
                    spec['labels_path'] = os.path.join(work_dir, f"{job['name']}.labels.npy")
                if job['kind'] == 'attention':
                    spec.update(attention)
                for name, result in run_in_subprocess(spec, work_dir).items():
                    measured[name] = _merge_rounds(measured.get(name), result)
                    measured[name].update(label=ROWS[name], input_shape=spec['input_shape'],
                                          threads=None if name.endswith('_default_threads') else threads)
                    logger.info("[BENCH] round %d/%d, %s: median %.3f s, peak %.0f MB", round_index + 1, rounds,
                                ROWS[name], result['median_s'], result['peak_mb'])
        measured.update({name: {'label': ROWS[name], 'skipped': reason} for name, reason in unavailable.items()})
        results['variants'] = {name: measured[name] for name in ROWS if name in measured}

        results['labels'] = _compare_labels(work_dir, results['variants'])
        if quickstart_model:
            results['quickstart'] = evaluate_quickstart(
                quickstart_config, quickstart_model, work_dir, device=device, threads=threads,
                bf16=any(job['name'] == 'infer_bf16' for job in jobs), runtimes='runtimes' not in skip)
    results['ratios'] = _ratios(results['variants'])
    results['attention'] = attention
    num_pixels = attention_size[0] * attention_size[1]
    results['attention_macs'] = {
        'em_unit': em_unit_macs(num_pixels, ATTENTION_CHANNELS, attention['num_bases'], attention['stage_num']),
        'non_local': non_local_macs(num_pixels, ATTENTION_CHANNELS, NON_LOCAL_INTER_CHANNELS)}
    return results


def _merge_rounds(earlier, result):
    """One row's timings over the rounds so far: every run's seconds, their median, the highest peak."""
    if earlier is None:
        return dict(result)
    seconds = earlier['seconds'] + result['seconds']
    return dict(earlier, seconds=seconds, median_s=statistics.median(seconds),
                peak_mb=max(earlier['peak_mb'], result['peak_mb']), setup_mb=min(earlier['setup_mb'], result['setup_mb']))


def _compare_labels(work_dir, variants):
    """Label agreement (% of pixels) of every eval/inference variant with (a), on the same random input."""
    reference = os.path.join(work_dir, 'eval_ours.labels.npy')
    agreement = {}
    for name in variants:
        path = os.path.join(work_dir, f'{name}.labels.npy')
        if name != 'eval_ours' and os.path.exists(path) and os.path.exists(reference):
            agreement[f'{name}_vs_eval_ours_pct'] = label_agreement(np.load(path), np.load(reference))
    return agreement


def _ratios(variants):
    """Speed ratios: how many times faster each variant is than its reference (>1: faster)."""
    def median(name):
        return variants.get(name, {}).get('median_s')

    ratios = {}
    for name in variants:
        reference = _reference_of(name)
        if name != reference and median(name) and median(reference):
            ratios[f'{name}_speedup_vs_{reference}'] = median(reference) / median(name)
    for augmented in ('flip', 'msflip'):
        if median(f'eval_ours_{augmented}') and median('eval_ours'):
            ratios[f'{augmented}_over_single_scale'] = median(f'eval_ours_{augmented}') / median('eval_ours')
    if median('train_ours') and median('train_paddleseg_default_threads'):
        # Ours as our trainer can run it against PaddleSeg's model as PaddleSeg's trainer runs it.
        ratios['train_ours_speedup_vs_train_paddleseg_default_threads'] = (
            median('train_paddleseg_default_threads') / median('train_ours'))
    for kind in ('eval', 'train'):
        # Same runtime settings on both sides: what the model itself gains.
        ours, theirs = median(f'{kind}_ours'), median(f'{kind}_paddleseg_tuned')
        if ours and theirs:
            ratios[f'{kind}_ours_speedup_vs_{kind}_paddleseg_tuned'] = theirs / ours
    return ratios


def _reference_of(name):
    """The row a row's speed is compared with; None for flip and ms+flip, reported as ratios to single-scale."""
    if name.startswith('train'):
        return 'train_paddleseg'
    if name in ('em_unit', 'non_local'):
        return 'non_local'
    return None if name in ('eval_ours_flip', 'eval_ours_msflip') else 'eval_paddleseg'


# --- the report ----------------------------------------------------------------------------------

def _speedup(seconds, reference_seconds):
    if not seconds or not reference_seconds:
        return '-'
    ratio = reference_seconds / seconds
    if abs(ratio - 1) < 0.005:
        return '1.00x'
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def _shape(shape):
    return 'x'.join(map(str, shape))


def format_report(results):
    """The results as markdown: the main table, the attention table, then one line per finding."""
    variants, machine = results['variants'], results['machine']
    lines = ['| variant | input | median s | peak MB | working MB | vs PaddleSeg dygraph |',
             '| --- | --- | --- | --- | --- | --- |']
    attention_rows = []
    for name, result in variants.items():
        if name in ('em_unit', 'non_local'):
            attention_rows.append((name, result))
            continue
        if 'skipped' in result:
            lines.append(f"| {result['label']} | - | {result['skipped']} | - | - | - |")
            continue
        reference = variants.get(_reference_of(name)) or {}
        lines.append(f"| {result['label']} | {_shape(result['input_shape'])} | {result['median_s']:.3f} "
                     f"| {result['peak_mb']:.0f} | {result['peak_mb'] - result['setup_mb']:.0f} "
                     f"| {_speedup(result['median_s'], reference.get('median_s'))} |")
    if attention_rows:
        settings = results['attention']
        lines += ['', f"EM unit (K={settings['num_bases']} bases, T={settings['stage_num']} steps) against a "
                      f"non-local block (embedded Gaussian, C'={settings['inter_channels']}), both alone:",
                  '| block | input | GMAC | median s | peak MB | working MB | vs non-local |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for name, result in attention_rows:
            lines.append(f"| {result['label']} | {_shape(result['input_shape'])} "
                         f"| {results['attention_macs'][name] / 1e9:.2f} | {result['median_s']:.4f} "
                         f"| {result['peak_mb']:.0f} | {result['peak_mb'] - result['setup_mb']:.0f} "
                         f"| {_speedup(result['median_s'], variants['non_local']['median_s'])} |")
    lines.append('')
    lines.append("Median of --runs after --warmup. Peak MB: the process's peak RSS (GPU: allocated memory); "
                 "working MB: peak minus the memory once model and input were ready. (c) and (d) run Paddle "
                 "Inference (oneDNN on CPU) to argmax labels; (a) and (b) return logits.")
    lines += _findings(results)
    lines.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads used, "
                 f"Paddle {machine['paddle']}, PaddleSeg {machine['paddleseg']}, "
                 f"AMX {'yes' if machine['amx'] else 'no'}, "
                 f"AVX-512 bf16 {'yes' if machine['avx512_bf16'] else 'no'}, VNNI {'yes' if machine['vnni'] else 'no'}, "
                 f"MKL_DEBUG_CPU_TYPE {machine['mkl_cpu_type'] or 'unset'} (emanet rows), "
                 f"device {machine['device']}" + (f" ({machine['gpu']})" if 'gpu' in machine else ''))
    lines.append(f"Command: {results['command']}")
    return '\n'.join(lines)


def _peak_shares(results):
    """Each exported path's multiply-add rate, as a share of what this CPU's cores can do in its precision."""
    machine, macs = results['machine'], results.get('macs')
    if not macs or not machine.get('fp32_peak_gmacs'):
        return []
    shares = []
    for name, variant in results['variants'].items():
        if not name.startswith('infer_') or 'median_s' not in variant:
            continue
        precision = name.rsplit('_', 1)[1]
        flag, factor = PRECISION_SPEEDUP.get(precision, (None, 1))
        peak = machine['fp32_peak_gmacs'] * (factor if flag is None or machine.get(flag) else 1)
        rate = macs['total_macs'] / variant['median_s'] / 1e9
        shares.append(f"{ROWS[name].split(', ', 1)[1]} {rate:.0f} GMAC/s ({rate / peak:.0%})")
    fastest = min((v['median_s'], name) for name, v in results['variants'].items()
                  if name.startswith('infer_') and 'median_s' in v)
    lines = [f"Exported paths' rate of multiply-adds, as a share of this CPU's peak in their precision (fp32: a "
             f"{machine['fp32_peak_gmacs']:.0f} GMAC/s matrix product in OpenVINO; bf16 x2 with AVX-512 bf16, int8 x4 with "
             "VNNI): " + ', '.join(shares) + '.']
    for reference in ('eval_paddleseg', 'eval_paddleseg_fast_mkl'):
        if 'median_s' in results['variants'].get(reference, {}):
            lines.append(f"Fastest exported path, {ROWS[fastest[1]]}: {fastest[0]:.3f} s, "
                         f"{_speedup(fastest[0], results['variants'][reference]['median_s'])} than {ROWS[reference]}.")
    return lines


def _findings(results):
    lines = []
    macs = results.get('macs')
    if macs:
        terms = ', '.join(f"N={t['N']}, C={t['C']}, K={t['K']}, T={t['T']}" for t in macs['em_unit_terms'])
        lines.append(f"Parameters {macs['params'] / 1e6:.2f} M; {macs['total_macs'] / 1e9:.1f} GMAC at "
                     f"{_shape(macs['input_shape'])} = Conv2D layers {macs['conv_macs'] / 1e9:.1f} (forward hooks) "
                     f"+ EM unit {macs['em_unit_macs'] / 1e9:.2f} ({macs['em_unit_formula']}, {terms}); "
                     "BatchNorm, activations, softmax and resizing not counted.")
    ratios, labels = results['ratios'], results['labels']
    if 'flip_over_single_scale' in ratios:
        lines.append(f"Flip evaluation costs {ratios['flip_over_single_scale']:.2f}x single-scale (target <= 1.9x).")
    if 'msflip_over_single_scale' in ratios:
        lines.append(f"Multi-scale ({'/'.join(map(str, MULTI_SCALES))}) + flip evaluation costs "
                     f"{ratios['msflip_over_single_scale']:.2f}x single-scale, one forward at a time "
                     "(its working MB is about a single forward's at the largest scale).")
    same_runtime = [f"{kind} {_speedup(1, ratios[f'{kind}_ours_speedup_vs_{kind}_paddleseg_tuned'])}"
                    for kind in ('eval', 'train') if f'{kind}_ours_speedup_vs_{kind}_paddleseg_tuned' in ratios]
    if same_runtime:
        lines.append("Model alone, against (b') under the same runtime settings: ours is "
                     + ', '.join(same_runtime) + " (eval: no auxiliary head).")
    if 'train_ours_speedup_vs_train_paddleseg_default_threads' in ratios:
        speedup = _speedup(1, ratios['train_ours_speedup_vs_train_paddleseg_default_threads'])
        lines.append(f"Train step: ours with {results['machine']['threads']} math threads is {speedup} than "
                     "PaddleSeg's model as PaddleSeg's trainer runs it (Paddle's defaults: 1 math thread, "
                     "default allocator).")
    names = {'eval_paddleseg': '(b) PaddleSeg', 'infer_fp32': '(c) exported fp32', 'infer_bf16': '(d) exported bf16'}
    agreement = [f"{names[name]} {labels[f'{name}_vs_eval_ours_pct']:.2f}%" for name in names
                 if f'{name}_vs_eval_ours_pct' in labels]
    if agreement:
        lines.append("Labels agreeing with (a) on a random input, random weights: " + ', '.join(agreement) + '.')
    lines += _peak_shares(results)
    quickstart = results.get('quickstart')
    if quickstart:
        lines.append(f"Quick-start model, {quickstart['num_images']} val images: mIoU and labels equal to "
                     "Paddle Inference fp32's, per path: " + ', '.join(
                         f"{ROWS[name].split(', ', 1)[1]} {path['miou']:.4f} ({path['agreement_pct']:.2f}%)"
                         for name, path in quickstart['paths'].items()) + '.')
    return lines
