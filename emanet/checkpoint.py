"""Reading and writing weights: Paddle's .pdparams/.pdopt pickles, read safely, and .safetensors files.

Pickles are read by ``emanet.safe_pickle``, which calls only the makers of numpy arrays and plain
containers and bounds its work by the file's size, so a checkpoint from anyone can neither run code
nor hang the process. A ``.safetensors`` file holds tensors and a JSON header only, so it cannot carry
code at all; ``convert_to_safetensors`` turns a released .pdparams into one.
"""
import json
import logging
import os
import struct

import numpy as np
import paddle
import safetensors

from emanet.download import weights_path
from emanet.errors import UserError
from emanet.safe_pickle import SHARED_VALUES_ALLOWANCE, PickleReader, Refused, Unreadable, plain, short_text

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

    With ``strict`` every key must match by name and shape, else one ``CheckpointError``
    lists what is missing, unexpected, or of another shape. Without it, matching keys
    load and the rest are reported as a warning (for fine-tuning on other classes).
    """
    state = upgrade_legacy_keys(read_state(weights_path(path)), source=path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint holds a {type(state[k]).__name__}, not an array" if not _is_array(state[k])
                  else f"{k}: checkpoint {list(np.shape(state[k]))} vs model {list(expected[k].shape)}"
                  for k in expected if k in state
                  and (not _is_array(state[k]) or list(np.shape(state[k])) != list(expected[k].shape))]
    problems = _describe(missing, unexpected, mismatched)
    if problems and strict:
        raise CheckpointError(f"{path} does not fit {model.__class__.__name__}: {problems}")
    bad = set(missing) | set(k.split(':')[0] for k in mismatched)
    matching = {k: state[k] for k in expected if k not in bad}
    if not matching:
        raise CheckpointError(f"{path}: no weight fits {model.__class__.__name__} ({problems})")
    if problems:
        logger.warning("%s: loading the matching weights only; %s", path, problems)
    model.set_state_dict({k: _in_dtype_of(v, expected[k]) for k, v in matching.items()})
    logger.info("Loaded %d/%d weights of %s from %s", len(matching), len(expected),
                model.__class__.__name__, path)
    return model


def _is_array(value):
    return isinstance(value, (np.ndarray, np.generic))


def _in_dtype_of(value, tensor):
    """``value`` in ``tensor``'s float32/float64 dtype: half-precision checkpoints (as AMP O2 may
    write them) load into a float32 model without loss, which Paddle's set_state_dict refuses."""
    target = {paddle.float32: np.float32, paddle.float64: np.float64}.get(tensor.dtype)
    value = np.asarray(value)
    if target is None or value.dtype == target:
        return value
    if value.dtype == np.uint16:  # how Paddle pickles bfloat16: the upper half of a float32's bits
        return (value.astype(np.uint32) << 16).view(np.float32).astype(target)
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(target)
    return value


def _describe(missing, unexpected, mismatched, limit=8):
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            shown = ', '.join(keys[:limit]) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')
            parts.append(f"{label}: {shown}")
    return '; '.join(parts)



# Where an optimizer keeps the float32 copies of half-precision parameters (AMP O2), by parameter name.
MASTER_WEIGHTS_KEY = 'master_weights'


def _rename_accumulators(state, renames):
    """Rename optimizer keys '<param name>_<accumulator>' and master weights by the param-name mapping ``renames``."""
    renamed = {}
    for key, value in state.items():
        if key == MASTER_WEIGHTS_KEY:
            renamed[key] = {renames.get(name, name): weight for name, weight in value.items()}
            continue
        new_key = key
        if isinstance(key, str):
            for cut in range(len(key)):
                if key[cut] == '_' and key[:cut] in renames:
                    new_key = renames[key[:cut]] + key[cut:]
                    break
        renamed[new_key] = value
    return renamed


def optimizer_state_by_structure(model, optimizer):
    """The optimizer's state with accumulators keyed by structured names ('head.cls.1.weight_velocity_0').

    Paddle keys them by generated tensor names ('conv2d_62.w_0_velocity_0') that change with the
    order layers are built in; structured names load into any process that builds the same model.
    """
    renames = {param.name: name for name, param in model.named_parameters()}
    return _rename_accumulators(optimizer.state_dict(), renames)


def load_optimizer_state(model, optimizer, state):
    """Inverse of ``optimizer_state_by_structure``: restore accumulators and the lr schedule."""
    renames = {name: param.name for name, param in model.named_parameters()}
    state = _rename_accumulators(state, renames)
    if MASTER_WEIGHTS_KEY in state:  # the optimizer uses them as tensors, as it made them
        state[MASTER_WEIGHTS_KEY] = {name: paddle.to_tensor(np.asarray(weight, np.float32))
                                     for name, weight in state[MASTER_WEIGHTS_KEY].items()}
    optimizer.set_state_dict(state)


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
