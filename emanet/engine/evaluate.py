"""Evaluation: the one loop that scores any Segmenter on a dataset (mIoU and friends)."""
import json
import time

import paddle
import paddle.distributed as dist
from tqdm import tqdm

from emanet.data.loading import EvalSamples, collate_one, running_loader
from emanet.engine.distributed import process_share
from emanet.engine.metrics import SegMetrics, format_report, json_ready
from emanet.logger import logger


def evaluate(segmenter, dataset, num_workers=0, save_json=None, note=None):
    """Score ``segmenter`` (any ``emanet.segmenter.Segmenter``) on ``dataset`` (a PaddleSeg dataset
    in 'val' mode); log and return the metrics.

    Images go through the dataset's own transforms; the segmenter maps its labels back to the
    label's resolution before they are compared. Under ``paddle.distributed.launch`` every process
    evaluates its share of the images and the confusion matrices are summed, so the metrics equal a
    single process's exactly. ``note`` ends the [EVAL] line (what differs from the config).
    """
    share = process_share(len(dataset))
    loader = paddle.io.DataLoader(EvalSamples(dataset, share), batch_size=1, num_workers=num_workers,
                                  collate_fn=collate_one, return_list=True)
    metrics = metrics_for(dataset)
    logger.info("Start evaluating (total_samples: %d, processes: %d)...", len(dataset), dist.get_world_size())
    start = time.time()
    with paddle.no_grad(), running_loader(loader) as batches:
        for image, label, trans_info in tqdm(batches, desc='evaluate', unit='image', total=len(loader),
                                             disable=dist.get_rank() != 0):
            metrics.update(segmenter.labels(image, trans_info), label)
    metrics.sum_over_processes()
    return report_metrics(metrics, save_json, seconds=time.time() - start, note=note)


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
            json.dump(json_ready(result), f, indent=2, allow_nan=False)
    return result
