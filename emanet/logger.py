"""The one logger: ``logging.getLogger('emanet')``, with PaddleSeg's grep-able line format."""
import logging
import sys

logger = logging.getLogger('emanet')


def setup_logging(log_file=None, level=logging.INFO):
    """Send the package's log lines to stdout (and a file), once per process."""
    formatter = logging.Formatter('%(asctime)s [%(levelname)s] %(message)s', '%Y-%m-%d %H:%M:%S')
    if not any(getattr(h, '_emanet', False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
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
