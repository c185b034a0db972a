"""The quick-start check: a trained quick-start model exported for every runtime, each path's mIoU on the val set
and its labels' agreement with Paddle Inference fp32."""
import os

import numpy as np

from emanet.config import Builder, build_model, load_config
from emanet.deploy.backends import load_exported
from emanet.deploy.export import preprocessed_images, to_onnx, to_openvino
from emanet.deploy.static_graph import export_model, export_stage
from emanet.device import bf16_kind
from emanet.engine.evaluate import evaluate
from emanet.segmenter import Segmenter


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
