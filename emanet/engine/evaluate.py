"""Evaluation: mIoU and friends over a dataset, with flip, multi-scale and sliding-window inference."""
import contextlib
import json
import time

import paddle
import paddle.distributed as dist
from tqdm import tqdm

from emanet.data.loading import EvalSamples, collate_one, raise_if_error
from emanet.engine.distributed import process_share
from emanet.engine.inference import infer_logits, reverse_transform
from emanet.engine.metrics import SegMetrics, format_report
from emanet.logger import logger

# test_config keys (PaddleSeg's) that evaluate() and predict() understand.
AUGMENT_KEYS = ('aug_eval', 'scales', 'flip_horizontal', 'flip_vertical', 'is_slide', 'crop_size', 'stride')


def augment_options(test_config=None, **overrides):
    """Merge a config's ``test_config`` with command-line overrides (those not None win)."""
    options = {key: value for key, value in (test_config or {}).items() if key in AUGMENT_KEYS}
    unknown = [key for key in (test_config or {}) if key not in AUGMENT_KEYS]
    if unknown:
        raise ValueError(f"test_config has unknown key '{unknown[0]}'; known: {', '.join(AUGMENT_KEYS)}")
    options.update({key: value for key, value in overrides.items() if value is not None})
    return options


def predict_logits(model, images, aug_eval=False, scales=1.0, flip_horizontal=False, flip_vertical=False,
                   is_slide=False, crop_size=None, stride=None):
    """Logits [N, C, H, W] for a batch; flips and scales apply only with ``aug_eval``."""
    if not aug_eval:
        scales, flip_horizontal, flip_vertical = (1.0,), False, False
    scales = (scales,) if isinstance(scales, (int, float)) else tuple(scales)
    return infer_logits(model, images, scales=scales, flip_horizontal=flip_horizontal,
                        flip_vertical=flip_vertical, is_slide=is_slide, crop_size=crop_size, stride=stride)


def evaluate(model, dataset, num_workers=0, save_json=None, autocast=None, **augment):
    """Evaluate ``model`` on ``dataset`` (a PaddleSeg dataset in 'val' mode); log and return the metrics.

    Predictions are mapped back to the label's resolution (undoing the val transforms)
    before they are compared with it. Under ``paddle.distributed.launch`` every process
    evaluates its share of the images and the confusion matrices are summed, so the metrics
    equal a single process's exactly. ``autocast``: ``paddle.amp.auto_cast`` arguments, for a
    model trained with mixed precision (evaluation during training runs as training does).
    """
    share = process_share(len(dataset))
    loader = paddle.io.DataLoader(EvalSamples(dataset, share), batch_size=1, num_workers=num_workers,
                                  collate_fn=collate_one, return_list=True)
    metrics = metrics_for(dataset)
    model.eval()
    logger.info("Start evaluating (total_samples: %d, processes: %d)...", len(dataset), dist.get_world_size())
    start = time.time()
    with paddle.no_grad():
        for image, label, trans_info in tqdm(loader, desc='evaluate', unit='image',
                                             disable=dist.get_rank() != 0):
            raise_if_error(image, label)
            with paddle.amp.auto_cast(**autocast) if autocast else contextlib.nullcontext():
                logits = predict_logits(model, paddle.to_tensor(image), **augment)
            logits = reverse_transform(logits.astype('float32'), trans_info)
            metrics.update(paddle.argmax(logits, axis=1).numpy(), label)
    metrics.sum_over_processes()
    return report_metrics(metrics, save_json, seconds=time.time() - start)


def metrics_for(dataset):
    """An empty SegMetrics with the dataset's classes, ignore index and class names."""
    return SegMetrics(dataset.num_classes, getattr(dataset, 'ignore_index', 255),
                      class_names=getattr(dataset, 'CLASS_NAMES', None))


def report_metrics(metrics, save_json=None, **extra):
    """Compute, log (the grep-able [EVAL] line and the per-class table) and optionally save metrics."""
    result = dict(metrics.compute(), **extra)
    logger.info("%s", format_report(result))
    if save_json and dist.get_rank() == 0:
        with open(save_json, 'w') as f:
            json.dump(result, f, indent=2)
    return result
