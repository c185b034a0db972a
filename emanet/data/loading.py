"""Data loading for training and evaluation on top of PaddleSeg's datasets and transforms.

Training order and augmentation are functions of (seed, iteration) alone, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have,
whatever the number of loader workers.

A bad sample ends a run in one SampleError naming its file: all of a sample's work happens in
``load_sample``, which checks the files from their headers before anything decodes them.
"""
import contextlib
import os
import random
import signal
import threading

import cv2
import numpy as np
import paddle
from paddle.io import multiprocess_utils as paddle_multiprocess
from paddle.io.dataloader import worker as paddle_worker
from PIL import ExifTags, Image

from emanet.errors import InvalidInput, UserError

# The most pixels an image or label may declare, checked in its header before anything decodes it:
# a file of a few bytes can declare 40000x40000 pixels, and cv2.imread would allocate them all.
# 2^27 (16384x8192) stays below PIL's own refusal, 2 x PIL.Image.MAX_IMAGE_PIXELS (179 million).
MAX_SAMPLE_PIXELS = 2 ** 27
MAX_PIXELS_VARIABLE = 'EMANET_MAX_SAMPLE_PIXELS'
# PIL modes that PaddleSeg reads as one 8-bit class index per pixel (a palette PNG gives its indices).
LABEL_MODES = ('L', 'P', '1')
# EXIF orientations that turn an image by a quarter: cv2.imread applies them, PIL's header size does not.
QUARTER_TURNS = (5, 6, 7, 8)


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


class SampleError(UserError, RuntimeError):
    """An image or label that cannot be used; the message names the files.

    Policy: training and evaluation stop at the first such sample rather than skip it, since
    skipping would silently change the data (and break exact resuming). Fix or remove the file
    and continue with ``--resume_model latest``: at most one save interval is lost.
    """


def max_sample_pixels():
    """The pixel limit of images and labels: $EMANET_MAX_SAMPLE_PIXELS if set, else MAX_SAMPLE_PIXELS."""
    text = os.environ.get(MAX_PIXELS_VARIABLE)
    if text is None:
        return MAX_SAMPLE_PIXELS
    if not (text.isascii() and text.isdigit()) or int(text) == 0:  # isdigit() alone takes '²'
        raise InvalidInput(f"{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, got '{text}'")
    return int(text)


def load_sample(dataset, index, max_pixels=None):
    """(image, label, trans_info) of ``dataset[index]``: the image float32 [channels, height, width]
    after the dataset's transforms, the label int64 [height, width] (None in a split without labels).

    All of a sample's work happens here, in one guard: its files checked from their headers
    (``check_files``), PaddleSeg's decoding and transforms, the label's values. Whatever fails ends
    as one SampleError naming the files. ``max_pixels``: by default ``max_sample_pixels()``.
    """
    image_path, label_path = dataset.file_list[index][:2]
    files = image_path if label_path is None else f"{image_path} (label {label_path})"
    if max_pixels is None:
        max_pixels = max_sample_pixels()
    try:
        check_files(image_path, label_path, max_pixels)
        data = dataset[index]
        image = data['img'].astype('float32')
        label = None
        if label_path is not None:
            label = np.asarray(data['label']).astype('int64')
            label = label.reshape(label.shape[-2:])  # PaddleSeg gives val labels as [1, H, W]
            check_label_range(label, dataset, index)
        return image, label, data.get('trans_info', [])
    except SampleError:
        raise
    except Exception as err:  # whatever else PaddleSeg's reading and transforms meet in these files
        reason = ' '.join(f"{err.__class__.__name__}: {err}".split())
        raise SampleError(f"{files}: cannot be used ({reason})") from None


def check_files(image_path, label_path, max_pixels):
    """Refuse a sample whose files are missing, declare more than ``max_pixels`` pixels or are cut short,
    whose image OpenCV cannot decode, whose label is not one 8-bit channel, or whose image and label
    differ in size. From the headers, before anything decodes the files (except the check of a
    JPEG's end, which decodes at 1/8 scale)."""
    with open_header(image_path, max_pixels) as image:
        image_format = image.format
        turned = 'exif' in image.info and image.getexif().get(ExifTags.Base.Orientation) in QUARTER_TURNS
        width, height = image.size[::-1] if turned else image.size
        check_complete(image, image_path)
    if not cv2.haveImageReader(image_path):
        raise SampleError(f"{image_path}: OpenCV, which PaddleSeg reads images with, cannot decode "
                          f"{image_format} images")
    if label_path is None:
        return
    with open_header(label_path, max_pixels) as label:
        check_label_mode(label, label_path)
        label_width, label_height = label.size
        check_complete(label, label_path)
    if (width, height) != (label_width, label_height):
        as_turned = ' as turned by its EXIF orientation' if turned else ''
        raise SampleError(f"{image_path} (label {label_path}): the image is {width}x{height}{as_turned} "
                          f"but its label is {label_width}x{label_height}")


def open_header(path, max_pixels):
    """``path`` opened by PIL, which reads its header alone; refused if missing or too large."""
    if not os.path.isfile(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise SampleError(f"{path}: missing: a symbolic link to {os.readlink(path)}, which does not exist")
        raise SampleError(f"{path}: not a file" if os.path.exists(path) else f"{path}: missing")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:  # PIL refuses before telling the size
        raise SampleError(f"{path}: declares more than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels PIL will "
                          "open (PIL.Image.MAX_IMAGE_PIXELS); not decoded") from None
    except Image.UnidentifiedImageError:
        raise SampleError(f"{path}: cannot be opened as an image (not an image, or a damaged one)") from None
    except OSError as err:
        if err.errno is not None:  # the file system's (permission denied...), named by load_sample
            raise
        raise SampleError(f"{path}: the file is cut short or damaged ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise SampleError(f"{path}: declares {width}x{height} pixels, more than the {max_pixels:,} allowed "
                          f"({MAX_PIXELS_VARIABLE}); not decoded")
    return image


def check_complete(image, path):
    """Refuse a PNG or JPEG cut short (cv2 decodes a truncated JPEG without a word, grey where data is
    missing). Ends the use of ``image``."""
    try:
        if image.format == 'PNG':
            image.verify()  # reads every chunk and checks its CRC, without decompressing
        elif image.format in ('JPEG', 'MPO'):  # MPO: a camera's JPEG with more pictures after it
            image.draft(None, (1, 1))  # decoding at 1/8 scale still reads every byte of the scan
            image.load()
    except Exception as err:
        raise SampleError(f"{path}: the file is cut short or damaged ({err})") from None


def check_label_mode(label, path):
    """Refuse a label that is not one 8-bit channel: PaddleSeg would take its channels or bits as they are."""
    channels = len(label.getbands())
    if channels > 1:
        raise SampleError(f"{path}: the label has {channels} channels ({label.mode}); labels are single-channel "
                          "class indices (a grayscale or palette PNG)")
    if label.mode not in LABEL_MODES:
        bits = 16 if label.mode.startswith('I;16') else 32
        raise SampleError(f"{path}: the label is {bits}-bit (PIL mode {label.mode}); labels are 8-bit class indices")


def check_label_range(label, dataset, index):
    num_classes = dataset.num_classes
    ignore_index = getattr(dataset, 'ignore_index', 255)
    bad = (label >= num_classes) | (label < 0)
    bad &= label != ignore_index
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise SampleError(f"{dataset.file_list[index][1]}: label values {values} are outside "
                          f"[0, {num_classes}) and are not the ignore index {ignore_index}")


# Paddle's DataLoader cannot carry an exception out of its reader: with num_workers=0 the
# main thread then waits forever, with workers it raises a SystemError without the message.
# So a bad sample crosses the loader as data: a one-element "image" (no real image is 1-D) and
# its message as uint8 bytes (zero-size arrays cannot cross the workers' shared memory). Only a
# SampleError becomes such data (load_sample lets no other exception out of a sample), and
# ``running_loader`` turns it back into the exception as the batch comes out: no loop checks.
def _error_sample(err):
    return np.zeros(1, 'float32'), np.frombuffer(str(err).encode(), np.uint8).copy()


def _is_error(images):
    return len(images.shape) == 1


def _raised_errors(iterator):
    """The batches of ``iterator``; a batch that carries a SampleError raises it instead."""
    for batch in iterator:
        if _is_error(batch[0]):
            raise SampleError(bytes(np.asarray(batch[1]).astype(np.uint8)).decode())
        yield batch


@contextlib.contextmanager
def running_loader(loader):
    """Run ``loader`` (a paddle DataLoader) for the block, which gets its batches; a bad sample
    raises its SampleError there. When the block ends, also in an exception, the loader's reader
    thread and worker processes end and the process's SIGCHLD handling is as it was before.

    Paddle stops the workers only when the iterator is garbage-collected, and a traceback keeps
    the iterator alive. And a loader with workers installs a Python SIGCHLD handler (Paddle's check
    for dead workers) for the rest of the process: with it in place, a later child process exiting
    (a ``subprocess.run``) crashed a process in which OpenVINO, ONNX Runtime and Paddle Inference had
    run (a segmentation fault in the test suite; gone with the handler restored).

    Paddle's iterator itself is freed when the block ends: the block gets a generator over it, closed
    then. A traceback keeps the caller's frame alive; with it the iterator and its C++ reader
    threads' locks, and a loader worker forked later hung on freeing them (seen in the tests,
    where pytest keeps each failure's traceback).
    """
    restore_sigchld = threading.current_thread() is threading.main_thread()
    sigchld_handler = signal.getsignal(signal.SIGCHLD) if restore_sigchld else None
    iterator = iter(loader)
    each_batch = _raised_errors(iterator)
    try:
        yield each_batch
    finally:
        _stop_reader_thread(iterator)
        iterator._try_shutdown_all()  # what the iterator's __del__ would do, now
        each_batch.close()
        loader._iterator = None  # a loader with persistent workers keeps its iterator for the next pass
        if restore_sigchld and signal.getsignal(signal.SIGCHLD) is not sigchld_handler:
            signal.signal(signal.SIGCHLD, sigchld_handler)
            paddle_multiprocess._SIGCHLD_handler_set = False  # the next loader with workers sets it again


def _stop_reader_thread(iterator):
    """Stop and join the loader's reader thread, the one that moves batches into Paddle's queue.

    Without workers, Paddle's shutdown checks the thread once a second, which costs a whole second at
    the end of every training run and evaluation. With workers, Paddle does not wait for the thread at
    all: it closes the workers' result queue while the thread may be reading it, and the thread lives
    on for up to 5 s (its read's timeout) beside the iterator being taken apart. The thread stops
    within one batch of being told; a thread waiting for a worker's batch is woken by a message
    that Paddle's own reader takes to mean "stop here".
    """
    # Paddle's private attributes, read softly: where one is missing, Paddle's own shutdown does it all
    thread, done = getattr(iterator, '_thread', None), getattr(iterator, '_thread_done_event', None)
    if getattr(iterator, '_shutdown', True) or thread is None or done is None or thread is threading.current_thread():
        return
    done.set()
    if getattr(iterator, '_blocking_queue', None):
        iterator._blocking_queue.close()  # a reader blocked on a full queue wakes up
        iterator._blocking_queue = None
    results = getattr(iterator, '_data_queue', None)
    if getattr(iterator, '_num_workers', 0) > 0 and results is not None and hasattr(paddle_worker, '_ResumeIteration'):
        with contextlib.suppress(ValueError, OSError):  # a queue closed already: nobody reads it
            results.put((paddle_worker._ResumeIteration(), None, None))  # what persistent workers send between epochs
    thread.join(3)  # Paddle's own bound; past it, its shutdown goes on as before


class TrainSamples(paddle.io.Dataset):
    """(image, label, image path) from a PaddleSeg dataset, with augmentation seeded per (seed, epoch, index).

    Labels are checked: a value outside [0, num_classes) that is not the ignore index
    stops training with the file's name instead of a CUDA assert or a silent wrong loss.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.max_pixels = max_sample_pixels()

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = _mix(self.seed, epoch, index)
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        try:
            image, label, _ = load_sample(self.dataset, index, self.max_pixels)
        except SampleError as err:
            return (*_error_sample(err), None)
        return image, label, self.dataset.file_list[index][0]

    def __len__(self):
        return len(self.dataset)


def collate_train(samples):
    """Stack (image, label, image path) samples into a batch (images, labels). A bad sample makes the
    whole batch its error, and so do images that the training transforms left in different sizes."""
    for image, label, _ in samples:
        if _is_error(image):
            return image, label
    path_of_size = {}
    for image, _, path in samples:
        path_of_size.setdefault(image.shape, path)
    if len(path_of_size) > 1:
        sizes = ', '.join(f"{path} is {shape[2]}x{shape[1]}" for shape, path in path_of_size.items())
        return _error_sample(SampleError(f"the images of one training batch differ in size after the transforms: "
                                         f"{sizes}; add a crop or a resize to the training transforms"))
    return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])


class EvalSamples(paddle.io.Dataset):
    """(image, label, trans_info) for evaluation, one image at a time (sizes may differ).

    ``indices``: the dataset's images to take (this process's share), by default all.
    """

    def __init__(self, dataset, indices=None):
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.max_pixels = max_sample_pixels()

    def __getitem__(self, position):
        try:
            return load_sample(self.dataset, self.indices[position], self.max_pixels)
        except SampleError as err:
            return (*_error_sample(err), [])

    def __len__(self):
        return len(self.indices)


def collate_one(batch):
    """Batch of one evaluation sample: arrays get a batch axis, trans_info stays as PaddleSeg wrote it."""
    (image, label, trans_info), = batch
    if _is_error(image):
        return image, label, trans_info
    return image[None], label[None], trans_info
