"""tools/benchmark.py end to end at toy sizes (it reports every number; speed is not checked),
and the multiply-add counts it reports."""
import json
import math
import os
import re
import statistics
import sys

import paddle
import paddle.nn as nn
import pytest
from paddle.base import core

import benchmark  # tools/benchmark.py
from perf.macs import count_macs, em_unit_macs  # tools/perf/: the parts of tools/benchmark.py
from perf.quickstart import evaluate_quickstart
from perf.report import ROWS
from perf.run import PARTS
from conftest import ONNX_EXPORT_MISSING, OPENVINO_MISSING, TOOLS

# The benchmark's ONNX Runtime and OpenVINO rows need both.
RUNTIMES_MISSING = ONNX_EXPORT_MISSING or OPENVINO_MISSING
from emanet.checkpoint import save_state
from emanet.config import Builder, build_model, load_config
from emanet.engine.evaluate import evaluate
from emanet.engine.inference import ModelSegmenter
from emanet.models import EMAU

@pytest.mark.slow
def test_benchmark_tool_reports_every_variant(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'bench.json'
    # Without the Ray part, which starts a cluster (tools/perf/cluster.py's is tested in integrations/test_ray.py).
    argv = ['--backbone', 'ResNet18_vd', '--input_size', '128', '64', '--train_size', '64', '32', '--attention_size',
            '32', '16', '--runs', '2', '--rounds', '1', '--warmup', '0', '--threads', '2', '--folder_images', '2',
            '--folder_size', '96', '64', '--large_sizes', '256', '--geotiff_sizes', '256', '--json', str(out),
            '--skip', 'ray']
    # In this process (each row is still measured in a process of its own); the report quotes the command line.
    monkeypatch.setattr(sys, 'argv', [os.path.join(TOOLS, 'benchmark.py')] + argv)
    benchmark.main(benchmark.parse_args(argv))
    results = json.loads(out.read_text())
    report = capsys.readouterr().out

    measured = ['eval_ours', 'eval_paddleseg', 'eval_paddleseg_tuned', 'infer_fp32', 'eval_ours_flip',
                'eval_ours_msflip', 'train_ours', 'train_paddleseg', 'train_paddleseg_default_threads',
                'train_paddleseg_tuned', 'em_unit', 'non_local']
    runtimes = [] if RUNTIMES_MISSING else ['infer_onnxruntime_fp32', 'infer_openvino_fp32', 'infer_openvino_int8']
    measured += runtimes
    if RUNTIMES_MISSING:  # every runtime's row says why, in the export's own sentence
        for name in ('infer_onnxruntime_fp32', 'infer_openvino_fp32', 'infer_openvino_bf16', 'infer_openvino_int8'):
            assert results['variants'][name]['skipped'] == RUNTIMES_MISSING, name
            assert f"| {ROWS[name]} | - | {RUNTIMES_MISSING} |" in report, name
    if core.supports_bfloat16():
        measured.append('infer_bf16')
    else:
        assert results['variants']['infer_bf16']['skipped'].startswith('not supported')
    # Every row is measured, on its input, and the printed table holds the JSON's figures.
    shapes = {'eval': '1x3x64x128', 'infer': '1x3x64x128', 'train': '2x3x32x64', 'em': '1x512x16x32',
              'non': '1x512x16x32'}
    for name in measured:
        variant = results['variants'][name]
        assert len(variant['seconds']) == 2 and min(variant['seconds']) > 0, name
        assert variant['peak_mb'] >= variant['setup_mb'] > 0, (name, variant)
        shape = shapes[name.split('_')[0]]
        assert variant['input_shape'] == [int(size) for size in shape.split('x')], name
        seconds = f"{variant['median_s']:.4f}" if name in ('em_unit', 'non_local') else f"{variant['median_s']:.3f}"
        row = next(line for line in report.splitlines() if line.startswith(f"| {ROWS[name]} | {shape} |"))
        assert f" {seconds} | {variant['peak_mb']:.0f} | {variant['peak_mb'] - variant['setup_mb']:.0f} |" in row, row
    assert results['variants']['train_paddleseg_default_threads']['threads'] is None
    assert results['variants']['train_ours']['threads'] == 2
    # The speed-up column: how much faster our train step is than PaddleSeg's, as the ratios say.
    speedup = results['ratios']['train_ours_speedup_vs_train_paddleseg']
    train_row = next(line for line in report.splitlines() if line.startswith(f"| {ROWS['train_ours']} |"))
    assert train_row.endswith(f"| {speedup:.2f}x faster |" if speedup >= 1.005 else
                              f"| {1 / speedup:.2f}x slower |" if speedup <= 0.995 else '| 1.00x |'), train_row

    # The multiply-adds of a 64x128 input at output stride 8: the EM unit's by its formula.
    macs = results['macs']
    terms, = macs['em_unit_terms']
    assert terms == {'N': 8 * 16, 'C': 512, 'K': 64, 'T': 3}
    assert macs['em_unit_macs'] == 7 * 8 * 16 * 512 * 64
    assert macs['total_macs'] == macs['conv_macs'] + macs['em_unit_macs']
    assert (f"Parameters {macs['params'] / 1e6:.2f} M; {macs['total_macs'] / 1e9:.1f} GMAC at 1x3x64x128 = "
            f"Conv2D layers {macs['conv_macs'] / 1e9:.1f}") in report

    # The same weights: PaddleSeg's model and the exported one label the image as ours does.
    assert results['labels']['eval_paddleseg_vs_eval_ours_pct'] > 99.9
    for name in ['infer_fp32'] + runtimes[:2]:
        assert results['labels'][f'{name}_vs_eval_ours_pct'] > 99.9, name
    if core.supports_bfloat16():
        assert 90 <= results['labels']['infer_bf16_vs_eval_ours_pct'] <= 100
    with open('/proc/cpuinfo') as cpuinfo:
        assert results['machine']['amx'] == ('amx_bf16' in cpuinfo.read())
    assert results['machine']['threads'] == 2

    if not RUNTIMES_MISSING:  # the int8 export's own row: its time and peak memory, measured in its process
        export = results['int8_export']
        assert export['seconds'] > 0 and export['images'] == 8 and 100 < export['peak_mb'] < 24000
        assert re.search(r'int8 export \(NNCF .*8 calibration images .*\): \d+\.\d s, peak \d+ MB', report)

    # A folder end to end against the model alone, and a 256x256 image (PNG, then GeoTIFF) in 128x64 windows, per
    # runtime.
    image_runtimes = ['paddle_fp32'] + ([] if RUNTIMES_MISSING else ['openvino_int8'])
    assert list(results['folders']) == [f'folder_{key}' for key in image_runtimes]
    assert list(results['large_images']) == [f'large_{key}_{kind}256' for key in image_runtimes
                                             for kind in ('', 'geotiff_')]
    for name, folder in results['folders'].items():
        assert folder['images'] == 2 and len(folder['model_s']) == len(folder['end_to_end_s']) == 2, name
        assert folder['end_to_end_images_per_s'] == 2 / statistics.median(folder['end_to_end_s']), name
        assert folder['share_of_model'] == folder['end_to_end_images_per_s'] / folder['model_images_per_s'], name
        assert (f"| {folder['model_images_per_s']:.3f} | {folder['end_to_end_images_per_s']:.3f} "
                f"| {folder['share_of_model']:.0%} | {folder['peak_mb']:.0f} |") in report, name
    for name, large in results['large_images'].items():
        assert (large['size'], large['reference_size'], large['window']) == ([256, 256], [96, 64], [128, 64]), name
        assert large['large_s_per_mpx'] == large['large_s'] / (256 * 256 / 1e6), name
        assert large['peak_mb'] >= large['setup_mb'] > 0, name
        kind = ' GeoTIFF' if '_geotiff_' in name else ''
        assert (f"| 256x256{kind} | 128x64 | {large['large_s']:.1f} | {large['large_s_per_mpx']:.3f} "
                f"| {large['reference_s_per_mpx']:.3f} | {large['s_per_mpx_over_reference']:.2f} "
                f"| {large['peak_mb']:.0f} |") in report, name
        if kind:  # the GeoTIFF written carries the input's georeference and a colour table
            assert large['georeference']['same_crs_transform_size'], name
            assert large['georeference']['colour_table_entries'] >= 19, name
            assert 'GeoTIFF written: EPSG:32633, transform and size of the input: yes, uint8 with a colour table' in report

    assert '| variant | input | median s | peak MB | working MB | vs PaddleSeg dygraph |' in report
    assert '(2T+1)*N*C*K' in report
    assert 'Machine: ' in report
    assert 'Command: python tools/benchmark.py --backbone ResNet18_vd' in report


@pytest.mark.slow
def test_rounds_add_runs_and_the_median_is_over_all_of_them(tmp_path):
    out = tmp_path / 'bench.json'
    skip = ','.join(PARTS)  # all but (a), which is always measured
    benchmark.main(benchmark.parse_args(['--backbone', 'ResNet18_vd', '--input_size', '32', '32', '--runs', '2',
                                         '--rounds', '2', '--warmup', '0', '--threads', '1', '--skip', skip,
                                         '--json', str(out)]))
    variants = json.loads(out.read_text())['variants']
    assert list(variants) == ['eval_ours']
    assert len(variants['eval_ours']['seconds']) == 2 * 2
    assert variants['eval_ours']['median_s'] == statistics.median(variants['eval_ours']['seconds'])


def test_em_unit_formula_counts_the_products_the_unit_runs(monkeypatch):
    batch, channels, height, width, num_bases, stage_num = 2, 8, 5, 7, 4, 3
    counted = []
    matmul = paddle.matmul

    def counting_matmul(x, y, **kwargs):
        out = matmul(x, y, **kwargs)
        counted.append(math.prod(out.shape) * x.shape[-1])  # output elements x the summed dimension
        return out

    monkeypatch.setattr(paddle, 'matmul', counting_matmul)
    unit = EMAU(channels, num_bases, stage_num)
    unit.eval()
    unit(paddle.randn([batch, channels, height, width]))
    assert len(counted) == 2 * stage_num + 1
    assert sum(counted) == em_unit_macs(batch * height * width, channels, num_bases, stage_num)


def test_count_macs_adds_conv_layers_and_the_em_unit():
    model = nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.Conv2D(8, 8, 3, stride=2, padding=1, groups=4),
                          EMAU(8, num_bases=4, stage_num=2))
    macs = count_macs(model, [1, 3, 16, 16])
    conv = 8 * 16 * 16 * 3 * 9 + 8 * 8 * 8 * 2 * 9  # output elements x input channels per group x kernel area
    assert macs['conv_macs'] == conv
    assert macs['em_unit_macs'] == (2 * 2 + 1) * 8 * 8 * 8 * 4
    assert macs['total_macs'] == conv + macs['em_unit_macs']
    assert macs['params'] == sum(p.size for p in model.parameters())


@pytest.mark.slow
def test_quickstart_rows_score_the_exported_model_as_the_dygraph_model_scores(tiny_config, tmp_path):
    config = tiny_config()
    cfg = load_config(config, opts=['model.backbone.pretrained=None'])
    paddle.seed(3)
    model = build_model(cfg)
    save_state(model.state_dict(), str(tmp_path / 'model.pdparams'))
    bf16 = core.supports_bfloat16()
    result = evaluate_quickstart(config, str(tmp_path / 'model.pdparams'), str(tmp_path), bf16=bf16,
                                 runtimes=not RUNTIMES_MISSING)
    dygraph = evaluate(ModelSegmenter(model), Builder(cfg).val_dataset)
    paths = result['paths']
    assert result['num_images'] == 2
    runtimes = [] if RUNTIMES_MISSING else ['infer_onnxruntime_fp32', 'infer_openvino_fp32']
    for name in ['infer_fp32'] + runtimes:
        assert (paths[name]['miou'], paths[name]['agreement_pct']) == (dygraph['miou'], 100.0), name
    if runtimes:
        assert 0 <= paths['infer_openvino_int8']['agreement_pct'] <= 100  # reported, for any model
    if bf16:
        assert 95 <= paths['infer_bf16']['agreement_pct'] <= 100
