"""The benchmark run: which rows run on this machine, their processes in alternating rounds, the exports they
share; ``run_benchmark`` returns the results ``report.format_report`` prints."""
import os
import statistics
import tempfile

import numpy as np
import paddle

from emanet.checkpoint import save_state
from emanet.deploy.export import onnx_converter, to_onnx, to_openvino
from emanet.deploy.runtimes import require
from emanet.deploy.static_graph import export_model, export_stage
from emanet.device import bf16_kind, cpu_vendor
from emanet.errors import InvalidInput, Unsupported
from emanet.logger import logger
from perf.folders import RUNTIMES, write_geotiff, write_image
from perf.macs import ATTENTION_CHANNELS, NON_LOCAL_INTER_CHANNELS, count_macs, em_unit_macs, non_local_macs
from perf.measure import build_emanet, machine_info, run_in_subprocess
from perf.quickstart import evaluate_quickstart, label_agreement
from perf.report import ROWS, RUNTIME_ROWS, ratios


# Parts a user can leave out with --skip.
PARTS = ('macs', 'paddleseg', 'inference', 'bf16', 'runtimes', 'flip', 'msflip', 'train', 'em_unit', 'folders',
         'large', 'ray')

# Random images the int8 export is calibrated on (latency does not depend on what they show).
CALIBRATION_IMAGES = 8

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

def plan_image_jobs(skip, device, work_dir, folder_images, folder_size, large_sizes, window, seed, geotiff_sizes=()):
    """The folder and large-image worker processes (run once each, after the rounds), with the images they read
    (written here, so that no worker's peak memory holds an image's making); ``geotiff_sizes``: sides of square
    tiled GeoTIFFs, read and written window by window (``emanet.rasters``)."""
    runtimes = [key for key, (part, _, backend) in RUNTIMES.items()
                if part not in skip and (backend == 'paddle' or device == 'cpu')]
    jobs = []
    if not runtimes:
        return jobs
    folder = os.path.join(work_dir, 'folder')
    reference_path = os.path.join(folder, 'image_00.png')
    os.makedirs(folder, exist_ok=True)
    for index in range(folder_images if 'folders' not in skip else 1):
        write_image(os.path.join(folder, f'image_{index:02d}.png'), folder_size, seed + index)
    for key in runtimes:
        if 'folders' not in skip:
            jobs.append({'name': f'folder_{key}', 'kind': 'folder', 'runtime_path': key, 'folder': folder})
        if 'large' not in skip:
            for size in large_sizes:
                jobs.append({'name': f'large_{key}_{size}', 'kind': 'large_image', 'runtime_path': key,
                             'image_path': os.path.join(work_dir, f'large_{size}.png'), 'size': [size, size],
                             'reference_path': reference_path, 'reference_size': list(folder_size),
                             'window': list(window)})
            for size in geotiff_sizes:
                jobs.append({'name': f'large_{key}_geotiff_{size}', 'kind': 'large_image', 'runtime_path': key,
                             'image_path': os.path.join(work_dir, f'large_{size}.tif'), 'size': [size, size],
                             'reference_path': reference_path, 'reference_size': list(folder_size),
                             'window': list(window)})
    return jobs

def _run_image_jobs(jobs, base, work_dir, seed):
    """{row name: result} of the folder and large-image jobs; each large image is written before its first job
    and removed after its last."""
    measured = {}
    for index, job in enumerate(jobs):
        path = job.get('image_path')
        if path and not os.path.exists(path):
            (write_geotiff if path.endswith('.tif') else write_image)(path, job['size'], seed)
        for name, result in run_in_subprocess(dict(base, **job), work_dir).items():
            measured[name] = result
            logger.info("[BENCH] %s: peak %.0f MB", name, result['peak_mb'])
        if path and all(later.get('image_path') != path for later in jobs[index + 1:]):
            os.remove(path)
    return measured

def _ray_scaling(export_dir, work_dir, images, input_size, seed):
    """``perf.cluster.ray_scaling`` over a folder of ``images`` random images of ``input_size``, or why it cannot run."""
    try:
        from emanet.integrations.ray import require_ray
        require_ray()
    except Unsupported as error:
        return {'skipped': str(error)}
    from perf.cluster import ray_scaling
    folder = os.path.join(work_dir, 'ray_images')
    os.makedirs(folder, exist_ok=True)
    for index in range(images):
        write_image(os.path.join(folder, f'image_{index:02d}.png'), input_size, seed + index)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return ray_scaling(export_dir, folder, work_dir, pythonpath=repo)


def _convert_for_runtimes(paddle_dir, work_dir):
    """The Paddle export as ONNX and OpenVINO fp32, and where the int8 export goes (``_quantize_int8`` makes it)."""
    exports = {name: os.path.join(work_dir, name) for name in ('onnx', 'openvino', 'openvino_int8')}
    to_onnx(paddle_dir, exports['onnx'])
    to_openvino(exports['onnx'], exports['openvino'])
    return exports

def _quantize_int8(base, input_shape, work_dir):
    """The OpenVINO int8 export (calibrated on random images), made in a worker process that measures its
    time and peak memory: {'seconds', 'images', 'input_shape', 'peak_mb'}."""
    spec = dict(base, name='int8_export', kind='int8_export', input_shape=input_shape,
                calibration_images=CALIBRATION_IMAGES)
    result = run_in_subprocess(spec, work_dir)['int8_export']
    logger.info("[BENCH] int8 export: %.1f s, peak %.0f MB", result['seconds'], result['peak_mb'])
    return result

def run_benchmark(model_spec, input_size=(1024, 512), train_size=(512, 256), train_batch=2,
                  attention_size=(128, 64), runs=3, rounds=3, warmup=1, threads=None, device='cpu', skip=(),
                  quickstart_model=None, quickstart_config='configs/quickstart.yml', transforms=None,
                  seed=0, command='', folder_images=8, folder_size=(2048, 1024), large_sizes=(4096, 16384),
                  geotiff_sizes=(), ray_images=24):
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
        folder_images, folder_size: how many random images of (width, height) a folder holds: ``predict_images``
            over it against the model alone, per runtime (Paddle Inference fp32, OpenVINO int8).
        large_sizes: sides of the square images a sliding window of ``input_size`` crosses, against one folder image.
        geotiff_sizes: the same as tiled GeoTIFFs, read and written window by window (needs rasterio, [geo]).
        ray_images: images of ``input_size`` tools/infer.py --ray labels on a local cluster of one node of one CPU,
            then two (``perf.cluster.ray_scaling``), against tools/infer.py's loop on one and two threads.
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
        if 'inference' not in skip or 'runtimes' not in skip or 'ray' not in skip:
            export_model(model, exports['paddle'], transforms or [{'type': 'Normalize'}], output_op='none')
        if 'runtimes' not in skip and device == 'cpu':
            exports.update(_convert_for_runtimes(exports['paddle'], work_dir))
        attention = {'num_bases': model.head.emau.num_bases, 'stage_num': model.head.emau.stage_num,
                     'inter_channels': NON_LOCAL_INTER_CHANNELS}
        del model

        jobs, unavailable = plan_jobs(skip, device, threads, machine['bf16_supported'])
        if runtimes_missing:
            unavailable.update({name: runtimes_missing for name in RUNTIME_ROWS})
        base = {'device': device, 'threads': threads, 'runs': runs, 'warmup': warmup, 'seed': seed,
                'model': model_spec, 'weights': weights, 'exports': exports}
        if 'openvino_int8' in exports:
            results['int8_export'] = _quantize_int8(base, eval_shape, work_dir)
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
        image_jobs = plan_image_jobs(skip, device, work_dir, folder_images, folder_size, large_sizes, input_size, seed,
                                     geotiff_sizes)
        image_results = _run_image_jobs(image_jobs, dict(base, input_shape=None), work_dir, seed)
        results['folders'] = {name: result for name, result in image_results.items() if name.startswith('folder_')}
        results['large_images'] = {name: result for name, result in image_results.items()
                                   if name.startswith('large_')}

        if 'ray' not in skip and device == 'cpu':
            results['ray'] = _ray_scaling(exports['paddle'], work_dir, ray_images, input_size, seed)
        results['labels'] = _compare_labels(work_dir, results['variants'])
        if quickstart_model:
            results['quickstart'] = evaluate_quickstart(
                quickstart_config, quickstart_model, work_dir, device=device, threads=threads,
                bf16=any(job['name'] == 'infer_bf16' for job in jobs), runtimes='runtimes' not in skip)
    results['ratios'] = ratios(results['variants'])
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
