"""int8 in OpenVINO: where an exported model's time goes, layer by layer and grouped by kind, optionally under a
capped instruction set (AVX2 only, as on CPUs without VNNI); and what tools/export.py's int8 export costs.

- ``profile_openvino(model, input_shape, isa='AVX2')``: median latency and OpenVINO's per-layer times summed
  by kind (``LAYER_KINDS``) and by kernel (exec_type such as ``jit_avx2_I8``, ``brgconv_avx512_core_vnni``);
- ``export_cost(['--config', ..., '--precision', 'int8'])``: wall time, CPU time and peak memory (VmHWM) of
  one run of tools/export.py.

Each runs in a fresh process: oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, when OpenVINO's CPU plugin loads, and
a process's peak memory is its own only when nothing else ran in it. On the command line:
python tools/perf/int8.py profile model.xml --input_shape 1 3 512 1024 [--isa AVX2]
python tools/perf/int8.py export --config CFG --model_path W --save_dir DIR --format openvino --precision int8
"""
import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(TOOLS_DIR)

# oneDNN's cap on the instruction set it generates code for (values such as AVX2, AVX512_CORE,
# AVX512_CORE_VNNI); OpenVINO's CPU plugin builds its kernels with oneDNN and honours it.
ISA_VARIABLE = 'ONEDNN_MAX_CPU_ISA'

LAYER_KINDS = ('int8 conv', 'fp32 conv', 'EM unit', 'resize + argmax', 'reorder/quantize/convert', 'other')

PROFILE_CODE = ('import sys, json; sys.path.insert(0, sys.argv[1]); from perf.int8 import _profile_here; '
                'print(json.dumps(_profile_here(*json.loads(sys.argv[2]))))')

EXPORT_CODE = '''import os, runpy, sys
tools, repo, peak_path = sys.argv[1:4]
sys.path[:0] = [tools, repo]
sys.argv = [os.path.join(tools, 'export.py')] + sys.argv[4:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    with open('/proc/self/status') as status, open(peak_path, 'w') as out:
        out.write(next(line.split()[1] for line in status if line.startswith('VmHWM:')))
'''


def layer_kind(node_type, exec_type, place):
    """The kind of one executed layer. ``place`` is 'backbone' before the EM unit's first matrix product,
    'em' from there to the last convolution (the classifier), 'output' after it (resize back, argmax)."""
    if node_type == 'Convolution':
        return 'int8 conv' if 'i8' in exec_type.lower() or 'u8' in exec_type.lower() else 'fp32 conv'
    if node_type in ('Reorder', 'FakeQuantize', 'Convert'):
        return 'reorder/quantize/convert'
    if place == 'output':
        return 'resize + argmax'
    if place == 'em':
        return 'EM unit'
    return 'other'


def _profile_here(model_path, input_shape, threads, runs):
    import numpy as np
    import openvino as ov
    config = {'INFERENCE_PRECISION_HINT': 'f32', 'PERF_COUNT': True}
    if threads:
        config['INFERENCE_NUM_THREADS'] = int(threads)
    compiled = ov.Core().compile_model(model_path, 'CPU', config)
    images = np.random.RandomState(0).uniform(-1, 1, input_shape).astype('float32')
    request = compiled.create_infer_request()
    request.infer([images])  # the first call also plans memory
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer([images])
        seconds.append(time.perf_counter() - start)
    order = [op.get_friendly_name() for op in compiled.get_runtime_model().get_ordered_ops()]
    types = {op.get_friendly_name(): op.get_rt_info()['layerType'].astype(str)
             for op in compiled.get_runtime_model().get_ordered_ops()}
    first_product = next((i for i, name in enumerate(order) if types[name] in ('MatMul', 'FullyConnected')
                          or types[name].startswith('FullyConnected')), len(order))
    last_conv = max((i for i, name in enumerate(order) if types[name] == 'Convolution'), default=len(order))
    position = {name: i for i, name in enumerate(order)}
    kinds, kernels = collections.Counter({kind: 0.0 for kind in LAYER_KINDS}), collections.Counter()
    for layer in request.get_profiling_info():
        i = position.get(layer.node_name, 0)
        place = 'output' if i > last_conv else 'em' if i >= first_product else 'backbone'
        time_s = layer.real_time.total_seconds()
        kinds[layer_kind(layer.node_type, layer.exec_type, place)] += time_s
        kernels[f'{layer.node_type} {layer.exec_type}'] += time_s
    return {'isa': os.environ.get(ISA_VARIABLE) or 'native', 'median_s': statistics.median(seconds),
            'seconds': seconds, 'kinds': dict(kinds), 'kernels': dict(kernels.most_common())}


def profile_openvino(model_path, input_shape, isa=None, threads=None, runs=3):
    """Latency of an OpenVINO model (model.xml or .onnx) on random images, and its last run's per-layer time.

    Args:
        input_shape: [N, 3, H, W] fed to the model.
        isa: cap oneDNN's instruction set, e.g. 'AVX2' for the kernels a CPU without AVX-512 and VNNI runs
            (check ``kernels``: exec types ending in _avx2_I8 rather than _avx512_..._I8); None: the CPU's own.
    Returns:
        {'isa', 'median_s', 'seconds', 'kinds': {kind: seconds}, 'kernels': {'<type> <exec_type>': seconds}}.
    """
    env = dict(os.environ)
    env.pop(ISA_VARIABLE, None)
    if isa:
        env[ISA_VARIABLE] = isa
    process = subprocess.run([sys.executable, '-c', PROFILE_CODE, TOOLS_DIR,
                              json.dumps([str(model_path), list(input_shape), threads, runs])],
                             capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"profiling {model_path} failed:\n" + '\n'.join(process.stderr.splitlines()[-15:]))
    return json.loads(process.stdout.strip().splitlines()[-1])


def export_cost(export_args):
    """Run tools/export.py with ``export_args`` in a fresh process: {'seconds', 'cpu_seconds', 'peak_mb'}.

    cpu_seconds (user + system) moves less than seconds on a machine other jobs share; peak_mb is the
    process's VmHWM, its own high-water mark (not the parent's, as ru_maxrss would be after fork).
    """
    peak_path = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'emanet_export_peak_{os.getpid()}_{time.time_ns()}')
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.run([sys.executable, '-c', EXPORT_CODE, TOOLS_DIR, REPO_DIR, peak_path,
                              *map(str, export_args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open(peak_path) as f:
            peak_mb = int(f.read()) / 1024
    finally:
        if os.path.exists(peak_path):
            os.remove(peak_path)
    if process.returncode != 0:
        raise RuntimeError("tools/export.py failed:\n" + '\n'.join(process.stderr.splitlines()[-15:]))
    return {'seconds': seconds, 'peak_mb': peak_mb,
            'cpu_seconds': (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def format_profile(result):
    """A few lines: latency, then time by kind and the kernels that took the most."""
    total = sum(result['kinds'].values()) or 1.0
    lines = [f"ISA {result['isa']}: median {result['median_s']:.2f} s over {len(result['seconds'])} runs; "
             f"layers' own time {total:.2f} s"]
    lines += [f"  {kind:26s} {seconds:7.3f} s {seconds / total:6.1%}" for kind, seconds in result['kinds'].items()]
    lines += [f"    {kernel:50s} {seconds:7.3f} s" for kernel, seconds in list(result['kernels'].items())[:8]]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    profile = commands.add_parser('profile', help='latency and per-layer time of an OpenVINO model')
    profile.add_argument('model', help='model.xml or model.onnx')
    profile.add_argument('--input_shape', nargs=4, type=int, required=True, metavar=('N', 'C', 'H', 'W'))
    profile.add_argument('--isa', help=f'cap the instruction set ({ISA_VARIABLE}), e.g. AVX2')
    profile.add_argument('--threads', type=int)
    profile.add_argument('--runs', type=int, default=3)
    commands.add_parser('export', help='time and peak memory of tools/export.py; the rest goes to it')
    args, rest = parser.parse_known_args(argv)
    if args.command == 'profile':
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print(format_profile(profile_openvino(args.model, args.input_shape, args.isa, args.threads, args.runs)))
    else:
        cost = export_cost(rest)
        print(f"tools/export.py {' '.join(rest)}: {cost['seconds']:.0f} s, {cost['cpu_seconds']:.0f} CPU s, "
              f"peak {cost['peak_mb']:.0f} MB")


if __name__ == '__main__':
    sys.path.insert(0, TOOLS_DIR)
    main()
