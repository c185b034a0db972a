"""Reading and writing weights: one format (Paddle's .pdparams/.pdopt pickles), loaded safely.

``.pdparams`` files are pickles, and a plain unpickler runs any code a file names.
``read_state`` admits only numpy arrays and plain containers, so a downloaded
checkpoint can never execute code.
"""
import io
import logging
import os
import pickle

import numpy as np
import paddle

from emanet.download import weights_path

logger = logging.getLogger(__name__)  # a child of the "emanet" logger

# PaddleSeg's EMAU kept its bases under another name before April 2021.
LEGACY_KEYS = {'head.emau.bases': 'head.emau.mu'}
# Bookkeeping Paddle adds to some saved files; not a weight.
PADDLE_METADATA_KEYS = ('StructuredToParameterName@@',)

_SAFE_GLOBALS = {
    ('builtins', 'tuple'), ('builtins', 'list'), ('builtins', 'dict'), ('builtins', 'set'),
    ('builtins', 'frozenset'), ('builtins', 'slice'), ('collections', 'OrderedDict'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
}


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, unsafe, or does not fit the model; the message says which file and keys."""


class _UnsafeGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the admitted arrays and containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise _UnsafeGlobal(f"it would call '{module}.{name}'")
        if module.startswith('numpy._core') and not hasattr(np, '_core'):
            module = module.replace('numpy._core', 'numpy.core')
        return super().find_class(module, name)


def _to_plain(obj):
    """Paddle 3 pickles a tensor as the tuple (name, ndarray); keep the array."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def read_state(path):
    """Load a .pdparams/.pdopt file into numpy arrays and plain containers, never running code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, 'rb') as f:
            state = _RestrictedUnpickler(io.BytesIO(f.read())).load()
    except _UnsafeGlobal as err:
        raise CheckpointError(f"{path}: refused, not a plain Paddle checkpoint ({err})") from None
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err.__class__.__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(state).__name__}")
    for key in PADDLE_METADATA_KEYS:
        state.pop(key, None)
    return _to_plain(state)


def save_state(state, path):
    """Write ``state`` (a state_dict or any dict of tensors/values) atomically: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + '.part'
    paddle.save(state, partial)
    os.replace(partial, path)


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
    mismatched = [f"{k}: checkpoint {list(np.shape(state[k]))} vs model {list(expected[k].shape)}"
                  for k in expected if k in state and list(np.shape(state[k])) != list(expected[k].shape)]
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
