"""Reading and writing weights: Paddle's .pdparams/.pdopt pickles, read safely, and .safetensors files.

Pickles are read by ``emanet.safe_pickle``, which calls only the makers of numpy arrays and plain
containers and bounds its work by the file's size, so a checkpoint from anyone can neither run code
nor hang the process. A ``.safetensors`` file holds tensors and a JSON header only, so it cannot carry
code at all; ``convert_to_safetensors`` turns a released .pdparams into one.
"""
import json
import logging
import numbers
import os
import struct

import numpy as np
import paddle
import safetensors

from emanet.download import weights_path
from emanet.errors import UserError, short_text
from emanet.safe_pickle import SHARED_VALUES_ALLOWANCE, PickleReader, Refused, Unreadable, plain

logger = logging.getLogger(__name__)  # a child of the "emanet" logger

# PaddleSeg's EMAU kept its bases under another name before April 2021.
LEGACY_KEYS = {'head.emau.bases': 'head.emau.mu'}
# Bookkeeping Paddle adds to some saved files; not a weight.
PADDLE_METADATA_KEYS = ('StructuredToParameterName@@',)

# numpy dtype -> safetensors dtype. Paddle has no uint16 tensors: it pickles bfloat16 as its bits in
# uint16, so uint16 is written as BF16 (bits unchanged) and BF16 is read back as uint16, as from a pickle.
SAFETENSORS_DTYPES = {'bool': 'BOOL', 'uint8': 'U8', 'int8': 'I8', 'int16': 'I16', 'uint16': 'BF16',
                      'int32': 'I32', 'uint32': 'U32', 'int64': 'I64', 'uint64': 'U64',
                      'float16': 'F16', 'float32': 'F32', 'float64': 'F64'}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is unreadable, unsafe, or does not fit the model; the message says which file and keys."""


def read_state(path):
    """The weights or training state in ``path`` as numpy arrays and plain containers, never running code.

    A ``.safetensors`` file gives its tensors; any other file is read as Paddle's pickle. Paddle 3's
    pickled tensors, ``(name, array)`` pairs, come back as arrays. Anything unreadable, unsafe or out of
    proportion to the file's size ends in one ``CheckpointError`` naming the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    with open(path, 'rb') as file:  # buffered: each array's bytes are read once, into the array
        reader = PickleReader(file, os.fstat(file.fileno()).st_size)
        try:
            state = reader.load()
        except Refused as err:
            raise CheckpointError(f"{path}: refused, not a plain Paddle checkpoint ({err})") from None
        except Unreadable as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from None
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable checkpoint ({_reason(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(state).__name__}")
    for key in PADDLE_METADATA_KEYS:
        state.pop(key, None)
    try:
        return plain(state, unfolded_limit=reader.size + SHARED_VALUES_ALLOWANCE)
    except Refused as err:
        raise CheckpointError(f"{path}: refused, not a plain Paddle checkpoint ({err})") from None


def save_state(state, path):
    """Write ``state`` (a state_dict or any dict of tensors/values) so that a crash leaves the old file.

    A path ending in ``.safetensors`` gets a safetensors file, which holds tensors only; any other
    path Paddle's pickle. The file is written beside its name, synced to disk, and only then renamed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tensors = _tensors_only(state, path) if _is_safetensors(path) else None  # refused before anything is written
    os.makedirs(folder, exist_ok=True)
    partial = path + '.part'
    try:
        if tensors is None:
            paddle.save(state, partial)
        else:
            with open(partial, 'wb') as file:
                _write_safetensors(tensors, file)
        with open(partial, 'rb+') as written:  # fsync syncs the file, whichever descriptor wrote it
            os.fsync(written.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    _sync_folder(folder)


def convert_to_safetensors(source, target):
    """Write the weights of ``source`` (a .pdparams file or URL) to ``target``, a .safetensors file.

    The keys stay as in the file (``load_weights`` renames legacy ones, as for the .pdparams) and every
    tensor keeps its dtype, shape and bytes. Returns the number of tensors written.
    """
    if not _is_safetensors(target):
        raise CheckpointError(f"{target}: converted weights go to a file ending in .safetensors")
    state = read_state(weights_path(source))
    save_state(state, target)
    return len(state)


def _is_safetensors(path):
    return os.fspath(path).lower().endswith('.safetensors')


def _reason(err):
    """An exception as one short line: its type and first words."""
    text = ' '.join(str(err).split())
    return f"{err.__class__.__name__}: {text[:200]}" if text else err.__class__.__name__


def _sync_folder(folder):
    """Make the rename durable: on POSIX a name lives in its folder, which is synced like a file."""
    if os.name != 'posix':  # Windows cannot open a folder; its renames are journaled with the file
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems (network, FUSE) refuse fsync on a folder; the file itself is synced
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------
# safetensors


def _tensors_only(state, path):
    """``state`` as little-endian, C-ordered numpy arrays; anything else is not for a safetensors file."""
    tensors = {}
    for key, value in state.items():
        if isinstance(value, paddle.Tensor):
            value = value.numpy()  # bfloat16 comes out as its bits in uint16
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: safetensors names tensors by text, not by a {type(key).__name__}")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: only tensors go to .safetensors; {short_text(repr(key))} holds a "
                                  f"{type(value).__name__} (save training state to a .pdparams/.pdopt file)")
        if value.dtype.name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: {key!r} is {value.dtype.name}, which this writer does not put "
                                  f"in safetensors (it writes {', '.join(SAFETENSORS_DTYPES)})")
        tensors[key] = np.ascontiguousarray(value, value.dtype.newbyteorder('<'))
    return tensors


def _write_safetensors(tensors, file):
    """The safetensors format: the JSON header's length (8 bytes, little-endian), the header, the tensors.

    Written here rather than by safetensors.numpy, which has no bfloat16. Tensors go widest item first,
    so each starts aligned to its item size (the header is padded to 8 bytes), as safetensors does.
    """
    order = sorted(tensors, key=lambda key: (-tensors[key].dtype.itemsize, key))
    header, offset = {}, 0
    for key in order:
        tensor = tensors[key]
        header[key] = {'dtype': SAFETENSORS_DTYPES[tensor.dtype.name], 'shape': list(tensor.shape),
                       'data_offsets': [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    file.write(struct.pack('<Q', len(text)))
    file.write(text)
    for key in order:
        file.write(tensors[key].reshape(-1).view(np.uint8))


def _read_safetensors(path):
    """The tensors of a safetensors file as numpy arrays (bfloat16 as its bits in uint16, as Paddle pickles it).

    safetensors checks the header (its length, its JSON, every tensor's offsets against the file)
    before a tensor is read; each tensor is then copied once out of the file.
    """
    try:
        with safetensors.safe_open(path, framework='np') as file:
            dtypes = {key: file.get_slice(key).get_dtype() for key in file.keys()}
            state = {key: file.get_tensor(key) for key, dtype in dtypes.items() if dtype != 'BF16'}
        brain_floats = [key for key, dtype in dtypes.items() if dtype == 'BF16']
        if brain_floats:
            state.update(_read_bfloat16_bits(path, brain_floats))
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_reason(err)})") from None
    return {key: state[key] for key in dtypes}


def _read_bfloat16_bits(path, keys):
    """numpy has no bfloat16: the bits of these tensors as uint16, at the offsets safe_open has checked."""
    tensors = {}
    with open(path, 'rb') as file:
        (length,) = struct.unpack('<Q', file.read(8))
        header = json.loads(file.read(length))
        for key in keys:
            begin, end = header[key]['data_offsets']
            bits = bytearray(end - begin)
            file.seek(8 + length + begin)
            file.readinto(bits)
            tensors[key] = np.frombuffer(bits, '<u2').reshape(header[key]['shape'])
    return tensors


def upgrade_legacy_keys(state, source=''):
    """Rename keys of older PaddleSeg EMANet checkpoints to today's names, warning once."""
    for old, new in LEGACY_KEYS.items():
        if old in state and new not in state:
            logger.warning("%s: renaming legacy key '%s' to '%s'", source, old, new)
            state[new] = state.pop(old)
    return state


def load_weights(model, path, strict=True):
    """Load weights from a local file or URL into ``model``.

    With ``strict`` every key must match by name, shape and type, else one ``CheckpointError``
    lists what is missing, unexpected, or of another shape or type. Without it, matching keys
    load and the rest are reported as a warning (for fine-tuning on other classes).
    """
    state = upgrade_legacy_keys(read_state(weights_path(path)), source=path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    other_shapes, other_types, fitting = [], [], {}
    for key, tensor in expected.items():
        if key not in state:
            continue
        value = state[key]
        if not _is_array(value):
            other_shapes.append(f"{key}: checkpoint holds a {type(value).__name__}, not an array")
        elif list(np.shape(value)) != list(tensor.shape):
            other_shapes.append(f"{key}: checkpoint {list(np.shape(value))} vs model {list(tensor.shape)}")
        else:
            loadable = _in_dtype_of(value, tensor)
            if loadable.dtype == _numpy_dtype(tensor):
                fitting[key] = loadable
            else:
                other_types.append(f"{key}: checkpoint {loadable.dtype.name} vs model {_dtype_name(tensor)}")
    problems = _describe(missing=missing, unexpected=unexpected, shape_mismatch=other_shapes,
                         type_mismatch=other_types)
    if problems and strict:
        raise CheckpointError(f"{path} does not fit {model.__class__.__name__}: {problems}")
    if not fitting:
        raise CheckpointError(f"{path}: no weight fits {model.__class__.__name__} ({problems})")
    if problems:
        logger.warning("%s: loading the matching weights only; %s", path, problems)
    model.set_state_dict(fitting)
    logger.info("Loaded %d/%d weights of %s from %s", len(fitting), len(expected),
                model.__class__.__name__, path)
    return model


def _is_array(value):
    return isinstance(value, (np.ndarray, np.generic))


def _dtype_name(tensor):
    return str(tensor.dtype).replace('paddle.', '')


def _numpy_dtype(tensor):
    """The numpy dtype Paddle's set_state_dict takes for ``tensor``: its own (bfloat16 as its bits in uint16)."""
    name = _dtype_name(tensor)
    return np.dtype('uint16' if name == 'bfloat16' else name)


def _in_dtype_of(value, tensor):
    """``value`` in ``tensor``'s float32/float64 dtype: half-precision checkpoints (as AMP O2 may
    write them) load into a float32 model without loss, which Paddle's set_state_dict refuses.
    Other values are returned as they are; Paddle takes only its tensors' own dtypes."""
    target = {paddle.float32: np.float32, paddle.float64: np.float64}.get(tensor.dtype)
    value = np.asarray(value)
    if target is None or value.dtype == target:
        return value
    if value.dtype == np.uint16:  # how Paddle pickles bfloat16: the upper half of a float32's bits
        return (value.astype(np.uint32) << 16).view(np.float32).astype(target)
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(target)
    return value


def _describe(limit=8, **keys_by_problem):
    """'missing: a, b; shape mismatch: c: ...', each key shortened: a file's keys may be of any length or type."""
    parts = []
    for problem, keys in keys_by_problem.items():
        if keys:
            shown = [key if isinstance(key, str) else repr(key) for key in keys[:limit]]
            shown = ', '.join(short_text(key, 200) for key in shown)
            parts.append(f"{problem.replace('_', ' ')}: {shown}"
                         + (f' ... ({len(keys)} in all)' if len(keys) > limit else ''))
    return '; '.join(parts)


# Where an optimizer keeps the float32 copies of half-precision parameters (AMP O2), by parameter name.
MASTER_WEIGHTS_KEY = 'master_weights'
# Where it keeps the state of its learning-rate schedule.
SCHEDULE_KEY = 'LR_Scheduler'


def _rename_accumulators(state, renames):
    """Rename optimizer keys '<param name>_<accumulator>' and master weights by the param-name mapping ``renames``."""
    longest = max(map(len, renames), default=0)
    renamed = {}
    for key, value in state.items():
        if key == MASTER_WEIGHTS_KEY:
            renamed[key] = {renames.get(name, name): weight for name, weight in value.items()}
        elif key == SCHEDULE_KEY:
            renamed[key] = value
        else:
            renamed[_renamed_accumulator(key, renames, longest)] = value
    return renamed


def _renamed_accumulator(key, renames, longest):
    """``key`` with its parameter name (the shortest prefix in ``renames`` followed by '_') renamed.

    Only the cuts within the longest name are tried, each with one look-up: a key of megabytes (a file
    may hold any) costs what a short one does, where trying every cut would cost its length squared.
    """
    cut = key.find('_', 0, longest + 1)
    while cut != -1:
        if key[:cut] in renames:
            return renames[key[:cut]] + key[cut:]
        cut = key.find('_', cut + 1, longest + 1)
    return key


def optimizer_state_by_structure(model, optimizer):
    """The optimizer's state with accumulators keyed by structured names ('head.cls.1.weight_velocity_0').

    Paddle keys them by generated tensor names ('conv2d_62.w_0_velocity_0') that change with the
    order layers are built in; structured names load into any process that builds the same model.
    """
    renames = {param.name: name for name, param in model.named_parameters()}
    return _rename_accumulators(optimizer.state_dict(), renames)


def load_optimizer_state(model, optimizer, state, source='the optimizer state'):
    """Inverse of ``optimizer_state_by_structure``: restore accumulators and the lr schedule.

    ``state`` as ``read_state`` gives it from the file ``source``; a part of another type than Paddle's
    optimizer takes ends in one ``CheckpointError`` naming ``source`` and the part.
    """
    _check_optimizer_state(state, optimizer, source)
    renames = {name: param.name for name, param in model.named_parameters()}
    state = _rename_accumulators(state, renames)
    if MASTER_WEIGHTS_KEY in state:  # the optimizer uses them as tensors, as it made them
        state[MASTER_WEIGHTS_KEY] = {name: paddle.to_tensor(np.asarray(weight, np.float32))
                                     for name, weight in state[MASTER_WEIGHTS_KEY].items()}
    try:
        optimizer.set_state_dict(state)
    except AssertionError as err:  # Paddle asserts that every accumulator it keeps is in the state
        raise CheckpointError(f"{source} does not fit this optimizer ({' '.join(str(err).split())[:200]})") from None


def _check_optimizer_state(state, optimizer, source):
    """Paddle's optimizer takes arrays, a dict of float arrays as master weights and its schedule's own
    state; anything else would stop it on an assertion, now or at the first step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a dict of optimizer state, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {short_text(repr(key))} is a {type(key).__name__}, not text")
        if key == MASTER_WEIGHTS_KEY:
            if not isinstance(value, dict):
                raise CheckpointError(f"{source}: {key} holds a {type(value).__name__}, not a dict")
            for name, weight in value.items():
                if not (isinstance(name, str) and _is_array(weight) and np.asarray(weight).dtype.kind == 'f'):
                    raise CheckpointError(f"{source}: {key}.{short_text(name)} holds a {type(weight).__name__}, "
                                          f"not an array of floats")
        elif key != SCHEDULE_KEY and not _is_array(value):
            raise CheckpointError(f"{source}: {short_text(key)} holds a {type(value).__name__}, not an array")
    schedule = optimizer._learning_rate
    if not isinstance(schedule, paddle.optimizer.lr.LRScheduler):
        return  # a constant learning rate: Paddle ignores a saved schedule
    if SCHEDULE_KEY in state:
        _check_like(state[SCHEDULE_KEY], schedule.state_dict(), SCHEDULE_KEY, source)
    elif not isinstance(schedule, paddle.optimizer.lr.LambdaDecay):  # the one schedule Paddle restores without
        raise CheckpointError(f"{source}: {SCHEDULE_KEY} is missing, and the optimizer has a schedule "
                              f"({type(schedule).__name__})")


def _kind(value):
    if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, bool):
        return 'number'
    return type(value).__name__


def _check_like(saved, expected, where, source):
    """``saved`` has the structure of the schedule's own state ``expected``: dicts with its keys, numbers
    where it has numbers (None, a value some schedules have before their first step, goes with anything)."""
    if saved is None or expected is None:
        return
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{source}: {where} holds a {type(saved).__name__}, "
                                  f"where the optimizer's schedule has a dict")
        for key, value in expected.items():
            if key not in saved:
                raise CheckpointError(f"{source}: {where}.{key} is missing")
            _check_like(saved[key], value, f"{where}.{key}", source)
    elif _kind(saved) != _kind(expected):
        raise CheckpointError(f"{source}: {where} holds a {type(saved).__name__}, "
                              f"where the optimizer's schedule has a {type(expected).__name__}")


def float32_state_dict(model, optimizer=None):
    """The model's state_dict in float32, for saving: under AMP O2 a half-precision parameter is
    replaced by the optimizer's float32 master copy (the weights training really holds)."""
    masters = getattr(optimizer, '_master_weights', None) or {}
    names = {name: param.name for name, param in model.named_parameters()}
    state = {}
    for key, value in model.state_dict().items():
        value = masters.get(names.get(key), value)
        state[key] = value.astype('float32') if value.dtype in (paddle.float16, paddle.bfloat16) else value
    return state
