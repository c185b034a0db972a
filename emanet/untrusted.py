"""The one door for bytes this package did not write: small text files (configs, deploy.yaml,
train_state.json) and the budgets every reader of untrusted bytes keeps.

A config, a checkpoint, an archive or a URL someone shared can be hostile. Each reader of such bytes
bounds its work by an explicit budget, named here once, and ends in success or one ``UserError`` naming
the file: never a traceback, a hang, or memory out of proportion to the input.

| budget | where it applies | default |
| --- | --- | --- |
| ``MAX_TEXT_BYTES`` | a YAML or JSON file read whole | 16 MiB |
| ``MAX_TEXT_VALUES`` | values a YAML file's aliases expand to | 100,000 |
| ``MAX_TEXT_DEPTH`` | nesting of a YAML or JSON file | 100 |

Budgets a user may set (``EMANET_DOWNLOAD_TIMEOUT``, ``_DEADLINE``, ``_LOCK_WAIT``, ``EMANET_MAX_DOWNLOAD_BYTES``)
are read by ``budget_from_environment``: anything but a positive number is one sentence naming the variable.

The readers behind the door keep their own budgets beside their code, listed here so that one page
holds them all: the pickle reader (``emanet.safe_pickle``: nesting, instructions, shared values, each
array's bytes against the file's size), downloads and archives (``emanet.download``: bytes, time,
redirects, members, header sizes), images and labels (``emanet.data.loading``: pixels declared in a header),
a TIFF's first directory (``emanet.rasters.read_tiff_header``: its tag count; the pixels are GDAL's to read).
Every one of them has a fuzz target in ``tests/fuzz``.
"""
import json
import os

import yaml

from emanet.errors import InvalidInput

MAX_TEXT_BYTES = 16 << 20
# More values than any real config holds (the published ones have a few hundred), counted with
# YAML aliases expanded, as PaddleSeg's merging and printing would expand them.
MAX_TEXT_VALUES = 100_000
MAX_TEXT_DEPTH = 100


class UnreadableFile(InvalidInput):
    """A file that is missing, too large, not UTF-8 text or not the structured text it should be."""


def read_text(path, what, max_bytes=MAX_TEXT_BYTES):
    """The UTF-8 text of the file ``path`` (``what`` it is, for messages), at most ``max_bytes`` long."""
    try:
        with open(path, 'rb') as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError:
        raise UnreadableFile(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{path}: a folder, not {what}") from None
    except OSError as err:
        raise UnreadableFile(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise UnreadableFile(f"{path}: larger than {max_bytes} bytes, too large for {what}")
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError:
        raise UnreadableFile(f"{path}: not UTF-8 text, so not {what}") from None


def load_yaml(path, what, max_bytes=MAX_TEXT_BYTES):
    """The value of the YAML file ``path``, read with YAML's safe loader; None for an empty file.

    Refused in one sentence: a file that is not YAML, one whose aliases expand past MAX_TEXT_VALUES
    values (a billion-laughs file) or whose nesting passes MAX_TEXT_DEPTH.
    """
    text = read_text(path, what, max_bytes)
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        reason = ' '.join(str(err).split()) if isinstance(err, yaml.YAMLError) else 'nested too deeply'
        raise UnreadableFile(f"{path}: not valid YAML for {what} ({reason})") from None
    _check_size(value, path, what)
    return value


def load_json(path, what, max_bytes=MAX_TEXT_BYTES):
    """The value of the JSON file ``path``; refused in one sentence when it is not JSON or nests too deeply."""
    text = read_text(path, what, max_bytes)
    try:
        value = json.loads(text)
    except ValueError as err:  # JSONDecodeError, and numbers with too many digits for int()
        raise UnreadableFile(f"{path}: not valid JSON for {what} ({err})") from None
    except RecursionError:
        raise UnreadableFile(f"{path}: nested more deeply than Python reads, not {what}") from None
    _check_size(value, path, what)
    return value


def load_mapping(path, what, loader=load_yaml, max_bytes=MAX_TEXT_BYTES):
    """``loader``'s value of ``path``, which must be a mapping (an empty file gives {})."""
    value = loader(path, what, max_bytes)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableFile(f"{path}: {what} is a mapping of keys, this file holds a {type(value).__name__}")
    return value


def budget_from_environment(variable, default, kind=float):
    """The budget ``variable`` sets (a positive number of ``kind``), else ``default``; one sentence when it is
    not such a number."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value != value or value == float('inf'):
        unit = 'whole number' if kind is int else 'number'
        raise InvalidInput(f"{variable} must be a positive {unit}, got '{text}'")
    return value


def _check_size(value, path, what):
    """Refuse a value whose shared (aliased) parts expand past MAX_TEXT_VALUES values, or nested past
    MAX_TEXT_DEPTH. Stops counting at the limit, so a billion-laughs file costs MAX_TEXT_VALUES steps."""
    count, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_TEXT_VALUES:
            raise UnreadableFile(f"{path}: its aliases expand to more than {MAX_TEXT_VALUES} values; "
                                 f"refused as {what}")
        if depth > MAX_TEXT_DEPTH:
            raise UnreadableFile(f"{path}: nested more than {MAX_TEXT_DEPTH} levels; refused as {what}")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)
