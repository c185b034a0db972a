"""What data-parallel processes agree on: shares of a dataset, sums of counts, BatchNorm statistics.

Every function here is a no-op in a single process, so one code path serves both.
"""
import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn

# Layers with running statistics (_mean, _variance): BatchNorm1D/2D/3D, SyncBatchNorm and the older BatchNorm.
BATCH_NORMS = (nn.layer.norm._BatchNormBase, nn.BatchNorm)


def process_share(count):
    """The indices of ``count`` items that this process takes: rank, rank + world size, ..."""
    return list(range(dist.get_rank(), count, dist.get_world_size()))


def sum_over_processes(array):
    """The element-wise sum of a numpy array over every process (an all-reduce; exact for integers)."""
    if dist.get_world_size() == 1:
        return array
    total = paddle.to_tensor(np.ascontiguousarray(array))
    dist.all_reduce(total)
    return total.numpy()


def average_batch_norm_statistics(model):
    """Give every process the mean of all processes' BatchNorm running means and variances.

    Without SyncBatchNorm (on CPU there is no kernel for it) each rank's statistics follow its own
    share of the data; averaged before an evaluation or a save, every rank holds one model.
    SyncBatchNorm's statistics are already the same everywhere and are left as they are.
    """
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, BATCH_NORMS) and not isinstance(layer, nn.SyncBatchNorm):
            for statistic in (layer._mean, layer._variance):
                total = statistic.clone()
                dist.all_reduce(total)
                paddle.assign(total / world_size, output=statistic)
