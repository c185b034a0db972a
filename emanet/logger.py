"""The one logger: ``logging.getLogger('emanet')``, with PaddleSeg's grep-able line format.

Importing the package adds no handler: its records go to whatever logging the program configured.
``setup_logging()``, which the tools call, prints them as PaddleSeg's logger does (INFO lines to stdout,
each once, not also through the handler Paddle puts on the root logger);
``logging.getLogger('emanet').setLevel(logging.WARNING)`` quiets it.

Also the two switches that keep Paddle's notes a user cannot act on out of the tools' output:
``ignore_warnings`` for Python warnings, ``drop_stderr_lines`` for lines its C++ core writes.
Both name the messages they drop, so errors and any other warning still show.
"""
import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

logger = logging.getLogger('emanet')


class _StdoutHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at each record: a caller may swap it (``contextlib.redirect_stdout``)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(log_file=None, level=logging.INFO):
    """Send the package's log lines to stdout (and a file), once per process, and no longer to the root logger.

    The tools call it; a program that wants the tools' output calls it once.
    """
    formatter = logging.Formatter('%(asctime)s [%(levelname)s] %(message)s', '%Y-%m-%d %H:%M:%S')
    if not any(getattr(h, '_emanet', False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler._emanet = True
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    logger.setLevel(level)
    logger.propagate = False  # Paddle puts a handler on the root logger; print each line once
    return logger


@contextlib.contextmanager
def ignore_warnings(*messages):
    """Inside the block, Python warnings whose text starts with one of ``messages`` are not shown."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings('ignore', message=re.escape(message))
        yield


@contextlib.contextmanager
def drop_stderr_lines(*fragments):
    """Inside the block, lines on stderr that contain one of ``fragments`` are dropped.

    Works on file descriptor 2, so it also catches what C++ code logs. The other lines are
    written out, in order, when the block ends; an exception still propagates as usual.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors='replace').splitlines(keepends=True):
                if not any(fragment in line for fragment in fragments):
                    sys.stderr.write(line)
            sys.stderr.flush()
