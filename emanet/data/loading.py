"""Data loading for training and evaluation on top of PaddleSeg's datasets and transforms.

Training order and augmentation are functions of (seed, iteration) alone, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have,
whatever the number of loader workers.
"""
import contextlib
import random
import signal
import threading

import numpy as np
import paddle
from paddle.io import multiprocess_utils as paddle_multiprocess
from PIL import Image


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


class SampleError(RuntimeError):
    """An image or label that cannot be used; the message names the files.

    Policy: training and evaluation stop at the first such sample rather than skip it, since
    skipping would silently change the data (and break exact resuming). Fix or remove the file
    and continue with ``--resume_model latest``: at most one save interval is lost.
    """


def load_sample(dataset, index):
    """``dataset[index]``, with unreadable files and image/label size mismatches named in one error."""
    image_path, label_path = dataset.file_list[index][:2]
    files = image_path if label_path is None else f"{image_path} (label {label_path})"
    try:
        if label_path is not None:
            with Image.open(image_path) as image, Image.open(label_path) as label:
                if image.size != label.size:
                    raise SampleError(f"{files}: the image is {image.size[0]}x{image.size[1]} "
                                      f"but its label is {label.size[0]}x{label.size[1]}")
        return dataset[index]
    except SampleError:
        raise
    except AttributeError:  # PaddleSeg calls .astype on what cv2.imread returned: None
        raise SampleError(f"{files}: the image cannot be decoded (corrupt, or not an image)") from None
    except Exception as err:
        raise SampleError(f"{files}: cannot be read ({err.__class__.__name__}: {err})") from None


# Paddle's DataLoader cannot carry an exception out of its reader: with num_workers=0 the
# main thread then waits forever, with workers it raises a SystemError without the message.
# So a bad sample travels as data: a one-element "image" (no real image is 1-D) and its
# message as uint8 bytes. (Zero-size arrays cannot cross the workers' shared memory.)
def _error_sample(err):
    return np.zeros(1, 'float32'), np.frombuffer(str(err).encode(), np.uint8).copy()


def _is_error(images):
    return len(images.shape) == 1


def raise_if_error(images, second):
    """Raise the SampleError a loader worker packed into a batch (see ``_error_sample``)."""
    if _is_error(images):
        raise SampleError(bytes(np.asarray(second).astype(np.uint8)).decode())


@contextlib.contextmanager
def batches(loader):
    """Iterate ``loader`` (a paddle DataLoader) inside the block; when the block ends, also in an
    exception, its reader thread and worker processes end and the process's SIGCHLD handling is
    as it was before.

    Paddle stops the workers only when the iterator is garbage-collected, and a traceback keeps
    the iterator alive. And a loader with workers installs a Python SIGCHLD handler (Paddle's check
    for dead workers) for the rest of the process: with it in place, a later child process exiting
    (a ``subprocess.run``) crashed a process in which OpenVINO, ONNX Runtime and Paddle Inference had
    run (a segmentation fault in the test suite; gone with the handler restored).
    """
    restore_sigchld = threading.current_thread() is threading.main_thread()
    sigchld_handler = signal.getsignal(signal.SIGCHLD) if restore_sigchld else None
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        iterator._try_shutdown_all()  # what the iterator's __del__ would do, now
        if restore_sigchld and signal.getsignal(signal.SIGCHLD) is not sigchld_handler:
            signal.signal(signal.SIGCHLD, sigchld_handler)
            paddle_multiprocess._SIGCHLD_handler_set = False  # the next loader with workers sets it again


def check_label_range(label, dataset, index):
    num_classes = dataset.num_classes
    ignore_index = getattr(dataset, 'ignore_index', 255)
    bad = (label >= num_classes) | (label < 0)
    bad &= label != ignore_index
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise SampleError(f"{dataset.file_list[index][1]}: label values {values} are outside "
                          f"[0, {num_classes}) and are not the ignore index {ignore_index}")


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
        try:
            data = load_sample(self.dataset, index)
            label = data['label'].astype('int64')
            check_label_range(label, self.dataset, index)
        except SampleError as err:
            return _error_sample(err)
        return data['img'].astype('float32'), label

    def __len__(self):
        return len(self.dataset)


def collate_train(samples):
    """Stack (image, label) samples into a batch; a bad sample makes the whole batch its error."""
    for image, label in samples:
        if _is_error(image):
            return image, label
    return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])


class EvalSamples(paddle.io.Dataset):
    """(image, label, trans_info) for evaluation, one image at a time (sizes may differ).

    ``indices``: the dataset's images to take (this process's share), by default all.
    """

    def __init__(self, dataset, indices=None):
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __getitem__(self, position):
        index = self.indices[position]
        try:
            data = load_sample(self.dataset, index)
            label = data['label'].astype('int64')
            label = label.reshape(label.shape[-2:])  # PaddleSeg gives val labels as [1, H, W]
            check_label_range(label, self.dataset, index)
        except SampleError as err:
            return (*_error_sample(err), [])
        return data['img'].astype('float32'), label, data.get('trans_info', [])

    def __len__(self):
        return len(self.indices)


def collate_one(batch):
    """Batch of one evaluation sample: arrays get a batch axis, trans_info stays as PaddleSeg wrote it."""
    (image, label, trans_info), = batch
    if _is_error(image):
        return image, label, trans_info
    return image[None], label[None], trans_info
