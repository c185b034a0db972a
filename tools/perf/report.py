"""How tools/benchmark.py reports: the rows, the speed ratios between them, and the Markdown table with its
findings."""
from perf.measure import MULTI_SCALES, PRECISION_SPEEDUP


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

def ratios(variants):
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
                 "working MB: peak minus the memory once model and input were ready. (c) to (h) run the logits export "
                 "and its argmax to labels; (a) and (b) return logits.")
    lines += _image_rows(results)
    lines += _ray_rows(results)
    lines += _int8_export_row(results)
    lines += _findings(results)
    lines.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads used, "
                 f"Paddle {machine['paddle']}, PaddleSeg {machine['paddleseg']}, "
                 f"AMX {'yes' if machine['amx'] else 'no'}, "
                 f"AVX-512 bf16 {'yes' if machine['avx512_bf16'] else 'no'}, VNNI {'yes' if machine['vnni'] else 'no'}, "
                 f"MKL_DEBUG_CPU_TYPE {machine['mkl_cpu_type'] or 'unset'} (emanet rows), "
                 f"device {machine['device']}" + (f" ({machine['gpu']})" if 'gpu' in machine else ''))
    lines.append(f"Command: {results['command']}")
    return '\n'.join(lines)

def _runtime_name(row_name):
    return 'OpenVINO int8' if row_name.endswith('openvino_int8') or '_openvino_int8_' in row_name else \
        'Paddle Inference fp32'

def _int8_export_row(results):
    """How long the int8 export's quantization took, and its process's peak memory."""
    export = results.get('int8_export')
    if not export:
        return []
    return ['', f"int8 export (NNCF post-training quantization of the ONNX graph, {export['images']} calibration "
                f"images {_shape(export['input_shape'])}, in a process of its own): {export['seconds']:.1f} s, "
                f"peak {export['peak_mb']:.0f} MB"]

def _image_rows(results):
    """The folder table (end to end against the model alone) and the large-image table (sliding window)."""
    lines = []
    folders, large = results.get('folders') or {}, results.get('large_images') or {}
    if folders:
        lines += ['', 'A folder through tools/infer.py\'s loop (read, prepare, model, argmax, mask PNG and overlay JPEG '
                      'written) against the model alone (the runtime\'s call on preprocessed inputs), same process:',
                  '| runtime | images | model images/s | end-to-end images/s | share of model | peak MB |',
                  '| --- | --- | --- | --- | --- | --- |']
        for name, result in folders.items():
            lines.append(f"| {_runtime_name(name)} | {result['images']} | {result['model_images_per_s']:.3f} "
                         f"| {result['end_to_end_images_per_s']:.3f} | {result['share_of_model']:.0%} "
                         f"| {result['peak_mb']:.0f} |")
    if large:
        lines += ['', 'One image through tools/infer.py\'s loop with a sliding window (streamed), after a '
                      'folder-sized reference image:',
                  '| runtime | image | window | s | s per Mpx | reference s per Mpx | ratio | peak MB | working MB |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        for name, result in large.items():
            kind = ' GeoTIFF' if '_geotiff_' in name else ''
            lines.append(f"| {_runtime_name(name)} | {_shape(result['size'])}{kind} | {_shape(result['window'])} "
                         f"| {result['large_s']:.1f} | {result['large_s_per_mpx']:.3f} "
                         f"| {result['reference_s_per_mpx']:.3f} | {result['s_per_mpx_over_reference']:.2f} "
                         f"| {result['peak_mb']:.0f} | {result['peak_mb'] - result['setup_mb']:.0f} |")
        for name, result in large.items():
            written = result.get('georeference')
            if written:
                same = 'yes' if written['same_crs_transform_size'] else 'NO'
                lines.append(f"{_runtime_name(name)} {_shape(result['size'])} GeoTIFF written: {written['crs']}, "
                             f"transform and size of the input: {same}, "
                             f"{written['dtype']} with a colour table of {written['colour_table_entries']} entries, "
                             f"nodata {written['nodata']:g}.")
    return lines

def _ray_rows(results):
    """tools/infer.py --ray on one node of one CPU against two, and against tools/infer.py on the same CPUs."""
    measured = results.get('ray')
    if not measured:
        return []
    if 'skipped' in measured:
        return ['', f"Ray part: {measured['skipped']}"]
    rows = [('tools/infer.py, 1 math thread', 'infer_py_1_threads'),
            ('tools/infer.py, 2 math threads', 'infer_py_2_threads'),
            ('tools/infer.py --ray, 1 node of 1 CPU', 'ray_1_nodes'),
            ('tools/infer.py --ray, 2 nodes of 1 CPU', 'ray_2_nodes')]
    lines = ['', 'A folder labelled on a local Ray cluster (nodes on this machine of one CPU each, each confined to a '
                 'core of its own) against tools/infer.py on the same CPUs; whole runs, and Ray after its first '
                 'image (actors started):',
             '| path | images | s | images/s | images/s after start-up |', '| --- | --- | --- | --- | --- |']
    for label, key in rows:
        result = measured[key]
        steady = f"{result['steady_images_per_s']:.3f}" if 'steady_images_per_s' in result else '-'
        lines.append(f"| {label} | {result['images']} | {result['seconds']:.1f} | {result['images_per_s']:.3f} "
                     f"| {steady} |")
    lines.append(f"Two nodes over one: {measured['two_nodes_over_one']:.2f}x whole runs, "
                 f"{measured['two_nodes_over_one_steady']:.2f}x after start-up.")
    return lines


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
