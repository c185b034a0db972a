"""What tools/benchmark.py measures, each in a fresh process: latency and peak memory of eval, inference and a
train step, the EM unit against a non-local block, the machine (CPU, its fp32 peak)."""
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import paddle
import paddleseg.models
from paddleseg.cvlibs import manager
from paddleseg.models import layers

from emanet.checkpoint import load_weights
from emanet.config import ConfigError, closest
from emanet.deploy.backends import load_exported
from emanet.deploy.runtimes import require
from emanet.device import (MKL_AVX2_CPU_TYPE, MKL_CPU_TYPE_VARIABLE, bf16_kind, cpu_info, cpu_vendor,
                           fast_mkl_applied, set_cpu_threads, tune_cpu_allocator)
from emanet.engine.inference import infer_logits
from emanet.errors import InvalidInput
from emanet.models import EMANet, EMAU
from emanet.models.losses import CrossEntropyLoss
from emanet.segmenter import InferenceOptions
from perf.folders import RUNTIMES, folder_speed, large_image_speed, sliding_window
from perf.macs import NonLocalBlock


# The published multi-scale + flip evaluation.
MULTI_SCALES = (0.75, 1.0, 1.25)

AUX_LOSS_COEF = 0.4

# The Cityscapes recipe's optimizer; only the step's cost matters here.
TRAIN_OPTIMIZER = {'learning_rate': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4}

# The input channels PaddleSeg 2.8.0's EMAHead gives its auxiliary head, whatever the backbone.
PADDLESEG_AUX_CHANNELS = 1024

# Each measurement is a fresh process running this module's run_worker (a module beside the tools,
# not part of the emanet package).
WORKER_CODE = ('import sys; sys.path.insert(0, sys.argv[2]); from perf.measure import run_worker; '
               'run_worker(sys.argv[1])')

TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How many times the fp32 rate a precision's multiply-adds can run at, where the CPU has the instructions.
PRECISION_SPEEDUP = {'bf16': ('avx512_bf16', 2), 'int8': ('vnni', 4)}

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
    result, labels = time_calls(lambda: predictor.labels(images, []), spec['runs'], spec['warmup'], spec['device'])
    np.save(spec['labels_path'], labels)
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

def _runtime_segmenter(spec, options=None):
    _, export, backend = RUNTIMES[spec['runtime_path']]
    return load_exported(spec['exports'][export], backend=backend, device=spec['device'], cpu_threads=spec['threads'],
                         options=options)

def measure_folder(spec):
    """A folder end to end against the model alone (``perf.folders.folder_speed``), one runtime, one process."""
    segmenter = _runtime_segmenter(spec)
    setup_mb = current_memory_mb(spec['device'])
    result = folder_speed(segmenter, spec['folder'], repeats=spec['runs'])
    return {spec['name']: dict(result, setup_mb=setup_mb, peak_mb=peak_memory_mb(spec['device']))}

def measure_large_image(spec):
    """A sliding window over a large image after a reference image (``perf.folders.large_image_speed``): the
    process's peak memory is the large image's."""
    segmenter = _runtime_segmenter(spec, sliding_window(spec['window']))
    setup_mb = current_memory_mb(spec['device'])
    result = large_image_speed(segmenter, spec['image_path'], spec['size'], spec['reference_path'],
                               spec['reference_size'])
    return {spec['name']: dict(result, size=spec['size'], reference_size=spec['reference_size'], window=spec['window'],
                               setup_mb=setup_mb, peak_mb=peak_memory_mb(spec['device']))}

def measure_int8_export(spec):
    """The int8 quantization of the ONNX export (NNCF on ``calibration_images`` random images of the eval input,
    as the benchmark's int8 rows use it): its time and this process's peak memory."""
    from emanet.deploy.export import to_openvino
    calibration = [random_images(spec['input_shape'][1:], spec['seed'] + index)
                   for index in range(spec['calibration_images'])]
    start = time.perf_counter()
    to_openvino(spec['exports']['onnx'], spec['exports']['openvino_int8'], calibration)
    return {spec['name']: {'seconds': time.perf_counter() - start, 'images': len(calibration),
                           'input_shape': spec['input_shape'], 'peak_mb': peak_memory_mb(spec['device'])}}

MEASUREMENTS = {'eval': measure_eval, 'inference': measure_inference, 'train': measure_train,
                'attention': measure_attention, 'folder': measure_folder, 'large_image': measure_large_image,
                'int8_export': measure_int8_export}

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
