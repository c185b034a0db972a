"""Shared file chores of the data modules: listing what is missing, parallel conversion, atomic PNGs."""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
from tqdm import tqdm

# How many problem files an error message names before it only counts the rest.
MAX_LISTED = 5


def list_some(problems, separator='; '):
    """The first MAX_LISTED problems joined, and how many more there are."""
    listed = separator.join(problems[:MAX_LISTED])
    more = f'{separator}and {len(problems) - MAX_LISTED} more' if len(problems) > MAX_LISTED else ''
    return listed + more


def require_files(paths, description):
    """Raise one error naming up to MAX_LISTED of ``paths`` that are not files, and their count."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {len(paths)} {description} are missing: '
                                f'{list_some(missing, ", ")}.')


def convert_all(convert, tasks, workers=None, description=None):
    """Run ``convert(task)`` for every task in ``workers`` threads, with a progress bar.

    ``convert`` returns whether it wrote its output (False: already up to date).

    Returns: (number written, number skipped).
    """
    workers = workers or min(4, os.cpu_count() or 1)
    written = 0
    with tqdm(total=len(tasks), desc=description, unit='file') as progress, contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(convert, tasks)
        else:
            # Threads, not processes: a child forked after cv2 had run its thread pool in this process
            # hung in its first cv2 call, and spawned ones would import the caller's unguarded __main__
            # again. cv2 and numpy release the GIL for the drawing, decoding and encoding.
            pool = stack.enter_context(ThreadPoolExecutor(workers))
            results = pool.map(convert, tasks, chunksize=max(1, min(32, len(tasks) // (4 * workers))))
        for was_written in results:
            written += was_written
            progress.update()
    return written, len(tasks) - written


def is_up_to_date(output_path, input_path):
    return os.path.exists(output_path) and os.path.getmtime(output_path) >= os.path.getmtime(input_path)


def write_png_atomically(path, array):
    """Write ``array`` as a PNG under a temporary name, then rename it: no reader ever sees half a file."""
    encoded, png = cv2.imencode('.png', array)
    if not encoded:
        raise ValueError(f'could not encode a PNG of shape {array.shape} and dtype {array.dtype} for {path}.')
    partial_path = path + '.part'
    try:
        with open(partial_path, 'wb') as partial:
            partial.write(png.tobytes())
        os.replace(partial_path, path)
    except BaseException:  # also Ctrl-C: leave neither the output nor the partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial_path)
        raise
