"""Data loading for training and evaluation on top of PaddleSeg's datasets and transforms.

Training order and augmentation are functions of (seed, iteration) alone, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have,
whatever the number of loader workers.
"""
import random

import numpy as np
import paddle


def _mix(*values):
    """A 32-bit seed from several integers (a simple, stable hash)."""
    seed = 0
    for v in values:
        seed = (seed * 1000003 + int(v)) % (2 ** 32)
    return seed


class ResumableBatchSampler(paddle.io.BatchSampler):
    """Batches of (epoch, index) pairs for iterations [start_iter, total_iters).

    Each epoch is a permutation seeded by (seed, epoch), split into global batches of
    ``batch_size * world_size`` (the incomplete tail is dropped); rank r takes its slice.
    """

    def __init__(self, dataset_size, batch_size, total_iters, seed, start_iter=0, rank=0, world_size=1):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.total_iters = total_iters
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank
        self.world_size = world_size
        global_batch = batch_size * world_size
        self.batches_per_epoch = dataset_size // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set has {dataset_size} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes)")

    def epoch_of(self, iteration):
        return iteration // self.batches_per_epoch

    def __iter__(self):
        order, order_epoch = None, None
        for iteration in range(self.start_iter, self.total_iters):
            epoch, step = divmod(iteration, self.batches_per_epoch)
            if epoch != order_epoch:
                order = np.random.RandomState(_mix(self.seed, epoch)).permutation(self.dataset_size)
                order_epoch = epoch
            first = (step * self.world_size + self.rank) * self.batch_size
            yield [(epoch, int(i)) for i in order[first:first + self.batch_size]]

    def __len__(self):
        return self.total_iters - self.start_iter


class TrainSamples(paddle.io.Dataset):
    """(image, label) pairs from a PaddleSeg dataset, with augmentation seeded per (seed, epoch, index).

    Labels are checked: a value outside [0, num_classes) that is not the ignore index
    stops training with the file's name instead of a CUDA assert or a silent wrong loss.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = _mix(self.seed, epoch, index)
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        data = self.dataset[index]
        label = data['label'].astype('int64')
        check_label_range(label, self.dataset, index)
        return data['img'].astype('float32'), label

    def __len__(self):
        return len(self.dataset)


def check_label_range(label, dataset, index):
    num_classes = dataset.num_classes
    ignore_index = getattr(dataset, 'ignore_index', 255)
    bad = (label >= num_classes) | (label < 0)
    bad &= label != ignore_index
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise ValueError(f"{dataset.file_list[index][1]}: label values {values} are outside "
                         f"[0, {num_classes}) and are not the ignore index {ignore_index}")


class EvalSamples(paddle.io.Dataset):
    """(image, label, trans_info) for evaluation, one image at a time (sizes may differ)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, index):
        data = self.dataset[index]
        label = data['label'].astype('int64')
        label = label.reshape(label.shape[-2:])  # PaddleSeg gives val labels as [1, H, W]
        check_label_range(label, self.dataset, index)
        return data['img'].astype('float32'), label, data.get('trans_info', [])

    def __len__(self):
        return len(self.dataset)


def collate_one(batch):
    """Batch of one evaluation sample: tensors get a batch axis, trans_info stays as PaddleSeg wrote it."""
    (image, label, trans_info), = batch
    return image[None], label[None], trans_info
