"""Checkpoint files: reading that runs no code and does work bounded by the file's size, durable
atomic writing, safetensors weights, and errors of one sentence naming the file."""
import builtins
import collections
import errno
import faulthandler
import gc
import json
import multiprocessing
import os
import pickle
import re
import resource
import struct
import tempfile
import time
import tracemalloc

import numpy as np
import paddle
import pytest
import safetensors.numpy
from paddleseg.models.backbones import ResNet18_vd

import emanet.checkpoint as checkpoint
from conftest import Handler
from emanet.checkpoint import CheckpointError, load_weights, read_state, save_state
from emanet.models import EMANet

# A hostile file may cost the reader at most this many seconds of CPU time (it needs milliseconds). Its time
# on the clock is only bounded, by WAIT_SECONDS: on a busy shared machine a process can stand still for seconds.
SECONDS = 10
WAIT_SECONDS = 60


# ---------------------------------------------------------------------------------------------------
# Pickles written opcode by opcode: pickle.dumps cannot write most of the hostile ones.

def encode(value):
    """Opcodes pushing ``value`` (None, bool, int, float, str, bytes, or a tuple of these); nothing goes to the memo."""
    if value is None:
        return pickle.NONE
    if isinstance(value, bool):
        return pickle.NEWTRUE if value else pickle.NEWFALSE
    if isinstance(value, int):
        digits = value.to_bytes(value.bit_length() // 8 + 1, 'little', signed=True)
        return pickle.LONG4 + struct.pack('<i', len(digits)) + digits
    if isinstance(value, float):
        return pickle.BINFLOAT + struct.pack('>d', value)
    if isinstance(value, str):
        value = value.encode()
        return pickle.BINUNICODE + struct.pack('<I', len(value)) + value
    if isinstance(value, bytes):
        return pickle.BINBYTES8 + struct.pack('<Q', len(value)) + value
    return pickle.MARK + b''.join(map(encode, value)) + pickle.TUPLE


def put(index):
    """memo[index] = the top of the stack (which stays on the stack)."""
    return pickle.LONG_BINPUT + struct.pack('<I', index)


def get(index):
    """Push memo[index]: the same object again, for two bytes."""
    return pickle.LONG_BINGET + struct.pack('<I', index)


def global_(module, name):
    return pickle.GLOBAL + f'{module}\n{name}\n'.encode()


def dtype(spec, state=(3, '<', None, None, None, -1, -1, 0)):
    """A numpy dtype as numpy pickles one: numpy.dtype(spec, False, True), then BUILD with its state."""
    return global_('numpy', 'dtype') + encode((spec, False, True)) + pickle.REDUCE + encode(state) + pickle.BUILD


def array(shape, dtype_opcodes, data):
    """An ndarray as numpy pickles one: _reconstruct(ndarray, (0,), b'b') makes an empty array, then
    BUILD gives it (version 1, shape, dtype, Fortran order, raw bytes)."""
    empty = (global_('numpy.core.multiarray', '_reconstruct')
             + pickle.MARK + global_('numpy', 'ndarray') + encode((0,)) + encode(b'b') + pickle.TUPLE + pickle.REDUCE)
    state = pickle.MARK + encode(1) + encode(tuple(shape)) + dtype_opcodes + encode(False) + data + pickle.TUPLE
    return empty + state + pickle.BUILD


def state_of(*items, protocol=4):
    """A pickled dict as paddle.save writes one, from (key, opcodes of the value) pairs."""
    body = b''.join(encode(key) + value for key, value in items)
    return pickle.PROTO + bytes([protocol]) + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def nested_lists(depth):
    """[[[...]]] ``depth`` lists deep: push ``depth`` empty lists, then APPEND each into the one below it."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


def doubling(levels, container=pickle.LIST):
    """x = [], then ``levels`` times x = [x, x] (or tuples): 2**levels paths to the first x, in 9 bytes a level."""
    first = pickle.EMPTY_TUPLE if container == pickle.TUPLE else pickle.EMPTY_LIST
    level = put(0) + pickle.POP + pickle.MARK + get(0) + get(0) + container
    return first + level * levels


def repeated(leaf, times, count):
    """A list of ``count`` references to a list of ``count`` references ... (``times`` levels) to ``leaf``."""
    level = put(0) + pickle.POP + pickle.MARK + get(0) * count + pickle.LIST
    return leaf + level * times


def frozenset_of(*items):
    return pickle.MARK + b''.join(items) + pickle.FROZENSET


def dict_with_key(key):
    return pickle.EMPTY_DICT + key + encode(1) + pickle.SETITEM


# ---------------------------------------------------------------------------------------------------
# Reading a file in a forked process, with a time limit and a memory cap, so that a reader that
# hangs or allocates without bound fails its test instead of taking the machine down.

def _virtual_memory_bytes():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _run_and_report(work, connection, stack_file):
    # The parent's garbage is not the child's to collect. A reader that makes thousands of containers starts
    # collections, and one freed a traceback kept from an earlier test whose frame held a Paddle C++ object: its
    # destructor waited (pthread_cond_destroy) for a parent's thread the child does not have, and the reader hung.
    gc.freeze()
    faulthandler.dump_traceback_later(WAIT_SECONDS - 5, file=stack_file)  # where a reader stood, if it hangs
    limit = _virtual_memory_bytes() + (3 << 29)  # 1.5 GiB more than the process holds already
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.process_time()  # this process's CPU time: the reader's work, whoever else runs
    try:
        outcome = ('loaded', work())
    except CheckpointError as err:
        outcome = ('CheckpointError', str(err))
    except BaseException as err:  # what a user would see instead: a bare exception, MemoryError...
        outcome = (type(err).__name__, str(err)[:500])
    connection.send(outcome + (time.process_time() - start,))


def run_in_child(work):
    """What work() ends in, run apart from this process, and the CPU seconds it took: ('loaded', its result, s),
    ('CheckpointError', message, s), another exception's name and message and s, or ('died', exit code, s) and
    ('timeout', ..., s) with the seconds waited."""
    context = multiprocessing.get_context('fork')
    receiver, sender = context.Pipe(duplex=False)
    with tempfile.TemporaryFile('w+') as stack_file:
        child = context.Process(target=_run_and_report, args=(work, sender, stack_file))
        start = time.monotonic()
        child.start()
        sender.close()  # the child's end: a child that dies closes the pipe, and poll returns at once
        if receiver.poll(WAIT_SECONDS):
            try:
                outcome = receiver.recv()
            except EOFError:
                child.join()
                outcome = ('died', f'exit code {child.exitcode}', time.monotonic() - start)
        else:
            stack_file.seek(0)
            outcome = ('timeout', f'still reading after {WAIT_SECONDS} s, in\n{stack_file.read()}',
                       time.monotonic() - start)
        child.kill()
        child.join()
    return outcome


def read_in_child(path, describe=lambda state: sorted(state)):
    """What read_state(path) ends in, run apart from this process (see ``run_in_child``)."""
    return run_in_child(lambda: describe(read_state(str(path))))


def assert_one_sentence_naming(message, path):
    assert message.startswith(str(path)), message
    assert '\n' not in message and len(message) < 400, message


# ---------------------------------------------------------------------------------------------------
# What a checkpoint may hold: it reads as numpy arrays and plain containers.

def test_reads_what_paddle_saves_as_numpy(tmp_path):
    path = str(tmp_path / 'state.pdopt')
    paddle.save({'w': paddle.ones([2, 3]), 'nested': {'lr': 0.5, 'ids': [1, 2]}, 'iter': 7}, path)
    state = read_state(path)
    np.testing.assert_array_equal(state['w'], np.ones([2, 3], 'float32'))
    assert state['nested'] == {'lr': 0.5, 'ids': [1, 2]}
    assert state['iter'] == 7


@pytest.mark.parametrize('protocol', [2, 3, 4])
def test_reads_a_state_dict_paddle_saved_with_each_pickle_protocol(tmp_path, protocol):
    """Paddle writes protocols 2 to 4; under 2, bytes are pickled as calls of _codecs.encode."""
    path = str(tmp_path / 'model.pdparams')
    weights = {'conv.weight': paddle.arange(24, dtype='float32').reshape([2, 3, 2, 2]), 'fc.bias': paddle.zeros([0]),
               'zeros': paddle.zeros([1 << 20])}  # under protocol 2, text as long as its bytes
    paddle.save(weights, path, protocol=protocol)
    state = read_state(path)
    assert sorted(state) == ['conv.weight', 'fc.bias', 'zeros']
    assert not state['zeros'].any()
    np.testing.assert_array_equal(state['conv.weight'], weights['conv.weight'].numpy())
    assert state['fc.bias'].shape == (0,)


def same(actual, expected):
    """Equal values of equal types, arrays compared by dtype, shape and bytes."""
    if isinstance(expected, np.ndarray):
        return (isinstance(actual, np.ndarray) and actual.dtype == expected.dtype and actual.shape == expected.shape
                and actual.tobytes(order='A') == expected.tobytes(order='A'))
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, dict):
        return list(actual) == list(expected) and all(same(actual[k], expected[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(map(same, actual, expected))
    return actual == expected


PLAIN_VALUES = {
    'float32': np.arange(6, dtype=np.float32).reshape(2, 3),
    'fortran order': np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    'big-endian': np.arange(3, dtype='>f4'),
    'float16': np.array([0.5, -2], np.float16),
    'bfloat16 bits': np.array([16320, 49168], np.uint16),
    'bool': np.array([True, False]),
    'int64': np.array([[-1, 2**40]], np.int64),
    'complex': np.array([1 + 2j], np.complex64),
    '0-d': np.array(3.5, np.float32),
    'empty': np.zeros((0, 4), np.float32),
    'scalars': [np.float32(0.25), np.int64(-3), np.bool_(True)],
    'containers': collections.OrderedDict(a=(1, 2.5, None, 'x', b'y'), b=[True], c={3: 'three'}),
    'sets': [{1, 'a'}, frozenset({2.5})],
    'slice': slice(1, None, 2),
}


@pytest.mark.parametrize('protocol', [0, 2, 3, 4, 5])
def test_arrays_scalars_and_containers_read_as_the_standard_unpickler_reads_them(tmp_path, protocol):
    data = pickle.dumps(PLAIN_VALUES, protocol=protocol)
    path = tmp_path / 'plain.pdparams'
    path.write_bytes(data)
    state = read_state(str(path))
    expected = pickle.loads(data)  # which would run any code; this file is ours
    assert list(state) == list(PLAIN_VALUES)
    for key, value in expected.items():
        assert same(state[key], value), key


def test_an_object_held_twice_is_read_once_and_stays_shared(tmp_path):
    shared = [np.ones(2, np.float32), 'x']
    path = tmp_path / 'shared.pdparams'
    path.write_bytes(pickle.dumps({'a': shared, 'b': shared, 'c': (shared, 1)}))
    state = read_state(str(path))
    assert state['a'] is state['b'] is state['c'][0]
    assert same(state['a'], shared)


def test_a_structure_shared_within_reason_is_read_once_and_stays_shared(tmp_path):
    """[x, x] nested 12 levels: 4096 paths to the first list, a legitimate if odd pickle; the
    hostile version below, 60 levels, is refused for whoever would walk its 2**60 paths."""
    path = tmp_path / 'doubling.pdparams'
    path.write_bytes(state_of(('w', doubling(12))))
    shared = read_state(str(path))['w']
    for _ in range(12):
        assert len(shared) == 2 and shared[0] is shared[1]
        shared = shared[0]
    assert shared == []


def test_hand_written_array_pickle_reads_as_numpy_reads_it(tmp_path):
    """The opcodes the hostile files below are made of, with honest claims."""
    data = np.arange(6, dtype='<f4').tobytes()
    body = state_of(('w', array((2, 3), dtype('f4'), encode(data))))
    path = tmp_path / 'honest.pdparams'
    path.write_bytes(body)
    np.testing.assert_array_equal(read_state(str(path))['w'], pickle.loads(body)['w'])
    np.testing.assert_array_equal(read_state(str(path))['w'], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_the_file_is_read_into_memory_once(tmp_path):
    """Each array keeps the bytes read for it: at most one copy of the weights is in memory."""
    path = str(tmp_path / 'big.pdparams')
    paddle.save({'w': paddle.ones([8 << 20])}, path)
    tracemalloc.start()
    try:
        weights = read_state(path)['w']
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert weights.nbytes == 32 << 20 and weights.flags.writeable
    assert peak < 1.25 * os.path.getsize(path)


# ---------------------------------------------------------------------------------------------------
# What a checkpoint may not do: run code, or make the reader work or allocate beyond the file's size.

class WritesAFile:
    """Unpickling this with a plain unpickler would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / 'pwned'
    path = tmp_path / 'evil.pdparams'
    path.write_bytes(pickle.dumps({'w': WritesAFile(str(victim))}))
    # Python 3.13 pickles open() as '_io.open', earlier ones as 'io.open'
    with pytest.raises(CheckpointError, match=r"evil\.pdparams: refused, .*'_?io\.open'"):
        read_state(str(path))
    assert not victim.exists()


TOUCH = b'__import__("pathlib").Path("pwned").touch()'
HOSTILE = [
    # Calling anything else than the arrays' and containers' makers, in every way pickle can call.
    pytest.param(state_of(('w', global_('builtins', 'eval') + encode((TOUCH.decode(),)) + pickle.REDUCE)),
                 r"refused, .*'builtins\.eval'", id='GLOBAL and REDUCE of eval'),
    pytest.param(state_of(('w', pickle.MARK + encode('os') + encode('system') + pickle.STACK_GLOBAL)),
                 r"refused, .*'os\.system'", id='STACK_GLOBAL of os.system'),
    pytest.param(state_of(('w', pickle.MARK + encode(TOUCH.decode()) + b'ibuiltins\neval\n')),
                 r'refused, .*INST', id='INST of eval'),
    pytest.param(state_of(('w', global_('numpy', 'ndarray') + encode(((1 << 40,),)) + pickle.REDUCE)),
                 r"refused, .*'numpy\.ndarray'", id='numpy.ndarray called directly with 1 TB'),
    pytest.param(state_of(('w', global_('collections', 'OrderedDict') + pickle.EMPTY_TUPLE + pickle.NEWOBJ)),
                 r'refused, .*NEWOBJ', id='NEWOBJ'),
    pytest.param(state_of(('w', encode('id') + pickle.BINPERSID)), r'refused, .*BINPERSID', id='persistent id'),
    # Protocol 5 keeps buffers outside the pickle; a checkpoint file has nothing outside it.
    pytest.param(state_of(('w', pickle.NEXT_BUFFER), protocol=5), r'refused, .*NEXT_BUFFER', id='out-of-band buffer'),
    # Nesting: deeper than any checkpoint, or a list holding itself.
    pytest.param(state_of(('w', nested_lists(100_000))), r'nested more than 64 deep', id='100000 nested lists'),
    pytest.param(state_of(('w', pickle.EMPTY_TUPLE + pickle.TUPLE1 * 99_999)),
                 r'nested more than 64 deep', id='100000 nested tuples'),
    pytest.param(state_of(('w', pickle.EMPTY_LIST + put(0) + get(0) + pickle.APPEND)),
                 r'nested more than 64 deep', id='a list holding itself'),
    # Sharing: a few hundred bytes that unfold into 2**60 values for whoever walks them.
    pytest.param(state_of(('w', doubling(60))), r'unfold into more values than', id='[x, x] nested 60 levels'),
    pytest.param(state_of(('w', repeated(encode(0.5), times=3, count=1000))), r'unfold into more values than',
                 id='1000 x 1000 x 1000 references'),
    # Hashing: a key or set member is hashed as it is stored, and hashing a shared tuple walks every path.
    pytest.param(state_of(('w', dict_with_key(doubling(60, pickle.TUPLE)))), r"key of type tuple",
                 id='dict key of (x, x) nested 60 levels'),
    pytest.param(state_of(('w', frozenset_of(doubling(60, pickle.TUPLE)))), r"set member of type tuple",
                 id='frozenset of (x, x) nested 60 levels'),
    pytest.param(state_of(('w', frozenset_of(pickle.EMPTY_LIST))), r"set member of type list",
                 id='frozenset of a list'),
    pytest.param(state_of(('w', encode(1 << 8_000_000) + put(0) + pickle.POP + pickle.EMPTY_DICT + pickle.MARK
                           + (get(0) + pickle.NONE) * 500_000 + pickle.SETITEMS)),
                 r"key of type int", id='one 8-Mbit int as a dict key 500000 times'),
    # Work over values made earlier: a few bytes that copy a million-item list, or compare two equal
    # 1 MB keys, over and over.
    pytest.param(state_of(('w', repeated(encode(0.5), times=1, count=10**6) + put(1) + pickle.POP
                           + global_('builtins', 'list') + put(2) + pickle.POP
                           + (get(2) + get(1) + pickle.TUPLE1 + pickle.REDUCE + pickle.POP) * 150_000 + get(1))),
                 r'work out of proportion', id='list() of a million items 150000 times'),
    pytest.param(state_of(('w', encode('x' * (1 << 20)) + put(0) + pickle.POP + encode('x' * (1 << 20)) + put(1)
                           + pickle.POP + dict_with_key(get(0)) + put(2)
                           + (get(1) + pickle.NONE + pickle.SETITEM) * 300_000)),
                 r'work out of proportion', id='two equal 1 MB keys compared 300000 times'),
    # Arrays whose header claims more than the file holds, or types no checkpoint has.
    pytest.param(state_of(('w', array((10**6, 10**6), dtype('f4'), encode(bytes(16))))),
                 r'float32 array of shape \[1000000, 1000000\] needs 4000000000000 bytes, the file gives it 16',
                 id='10**12 floats in 16 bytes'),
    pytest.param(state_of(('w', array((1 << 62, 1 << 62), dtype('i1'), encode(b'')))),
                 r'int8 array of shape \[4611686018427387904, 4611686018427387904\] needs',
                 id='shape overflowing int64'),
    pytest.param(state_of(('w', array((10**9,), dtype('O8', (3, '|', None, None, None, -1, -1, 63)), encode(b'')))),
                 r"refused, .*array type 'O8'", id='object array of 10**9 elements'),
    pytest.param(state_of(('w', array((1,), dtype('V8', (3, '|', None, None, None, 1 << 40, 1, 0)), encode(b'')))),
                 r"refused, .*array type 'V8'", id='void type claiming 1 TB an item'),
    pytest.param(state_of(('w', array((1,), dtype('f4', (3, '<', None, None, None, 1 << 40, 1, 0)), encode(b'')))),
                 r"refused, .*float32 type with a state numpy does not write",
                 id='float32 type with a changed item size'),
    pytest.param(state_of(('w', global_('numpy.core.multiarray', 'scalar')
                           + pickle.MARK + dtype('V8', (3, '|', None, None, None, 1 << 40, 1, 0)) + encode(b'')
                           + pickle.TUPLE + pickle.REDUCE)),
                 r"refused, .*array type 'V8'", id='scalar of a 1 TB void type'),
    # Lengths claiming more bytes than the file has.
    pytest.param(state_of(('w', pickle.BINBYTES8 + struct.pack('<Q', 1 << 60))), r'truncated', id='bytes of 2**60'),
    pytest.param(state_of(('w', pickle.LONG4 + struct.pack('<i', 2**31 - 1))), r'truncated', id='int of 2 GB'),
    pytest.param(state_of(('w', pickle.FRAME + struct.pack('<Q', 1 << 60))), r'truncated', id='frame of 2**60'),
    pytest.param(state_of(('w', pickle.LONG + b'9' * 100_000 + b'L\n')), r'unreadable checkpoint .*digits',
                 id='decimal int of 100000 digits'),
]


@pytest.mark.parametrize('body, reason', HOSTILE)
def test_a_hostile_pickle_ends_quickly_in_one_sentence(tmp_path, body, reason):
    path = tmp_path / 'hostile.pdparams'
    path.write_bytes(body)
    outcome, message, seconds = read_in_child(path)
    assert outcome == 'CheckpointError', (outcome, message)
    assert_one_sentence_naming(message, path)
    assert re.search(reason, message), message
    assert seconds < SECONDS
    assert not (tmp_path / 'pwned').exists() and not os.path.exists('pwned')


def test_a_memo_index_of_four_billion_costs_nothing(tmp_path):
    """The C unpickler sizes its memo table by the largest index: 32 GB for one LONG_BINPUT."""
    path = tmp_path / 'memo.pdparams'
    path.write_bytes(state_of(('w', encode(1.5) + put(2**32 - 2))))
    outcome, state, seconds = read_in_child(path, describe=lambda state: state)
    assert (outcome, state) == ('loaded', {'w': 1.5})
    assert seconds < SECONDS


def test_a_million_references_cost_a_million_entries(tmp_path):
    """Two bytes a reference: work proportional to the file, and a list as long as it says."""
    path = tmp_path / 'long.pdparams'
    path.write_bytes(state_of(('w', repeated(encode(0.5), times=1, count=10**6))))
    outcome, lengths, seconds = read_in_child(path, describe=lambda state: (len(state['w']), set(state['w'])))
    assert (outcome, lengths) == ('loaded', (10**6, {0.5}))
    assert seconds < SECONDS


def test_a_flood_of_pickle_instructions_is_refused_before_it_takes_minutes(tmp_path):
    """Ten million one-byte instructions: Paddle's checkpoints hold a few dozen per tensor."""
    path = tmp_path / 'flood.pdparams'
    path.write_bytes(state_of(('w', pickle.EMPTY_LIST + (pickle.DUP + pickle.POP) * 5_000_000)))
    outcome, message, seconds = read_in_child(path)
    assert outcome == 'CheckpointError', (outcome, message)
    assert_one_sentence_naming(message, path)
    assert 'pickle instructions' in message
    assert seconds < SECONDS


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint not found: .*nothing.pdparams'):
        read_state(str(tmp_path / 'nothing.pdparams'))
    corrupt = tmp_path / 'corrupt.pdparams'
    corrupt.write_bytes(b'\x80\x04not a pickle at all')
    with pytest.raises(CheckpointError, match='corrupt.pdparams: unreadable checkpoint'):
        read_state(str(corrupt))
    whole = tmp_path / 'whole.pdparams'
    paddle.save({'w': paddle.ones([100])}, str(whole))
    cut = tmp_path / 'cut.pdparams'
    cut.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r'cut\.pdparams: unreadable checkpoint \(truncated'):
        read_state(str(cut))


def test_a_weight_that_is_not_an_array_is_named(tmp_path):
    model = paddle.nn.Linear(2, 3)
    path = str(tmp_path / 'lists.pdparams')
    paddle.save({'weight': [[1.0, 2.0], [3.0]], 'bias': np.zeros(3, np.float32)}, path)
    with pytest.raises(CheckpointError,
                       match=r'lists\.pdparams does not fit Linear: .*weight: checkpoint holds a list'):
        load_weights(model, path)


def linear_weights_with(tmp_path, **replaced):
    """A Linear(2, 3), and the path of a .pdparams of its weights with ``replaced`` keys changed or added."""
    model = paddle.nn.Linear(2, 3)
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    state.update(replaced.pop('state', {}))
    path = tmp_path / 'weights.pdparams'
    path.write_bytes(pickle.dumps(state))
    return model, str(path)


def test_a_weights_key_that_is_not_text_is_named(tmp_path, caplog):
    model, path = linear_weights_with(tmp_path, state={3: np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError) as error:
        load_weights(model, path)
    assert str(error.value) == f"{path} does not fit Linear: unexpected: 3"
    with caplog.at_level('WARNING', logger='emanet'):
        load_weights(model, path, strict=False)
    assert f"{path}: loading the matching weights only; unexpected: 3" in caplog.text


@pytest.mark.parametrize('dtype', ['int64', 'int32', 'uint8', 'bool', 'complex64'])
def test_weights_of_another_kind_than_the_parameter_are_refused_naming_key_and_types(tmp_path, caplog, dtype):
    """Paddle would stop on an assertion; float16 and bfloat16 weights, which convert without loss, load."""
    model, path = linear_weights_with(tmp_path, state={'weight': np.ones([2, 3], dtype)})
    with pytest.raises(CheckpointError) as error:
        load_weights(model, path)
    assert str(error.value) == f"{path} does not fit Linear: type mismatch: weight: checkpoint {dtype} vs model float32"
    before = model.weight.numpy()
    with caplog.at_level('WARNING', logger='emanet'):
        load_weights(model, path, strict=False)
    assert f"{path}: loading the matching weights only; type mismatch: weight: checkpoint {dtype}" in caplog.text
    np.testing.assert_array_equal(model.weight.numpy(), before)


def linear_with_momentum():
    """A Linear(2, 3) and its Momentum optimizer on a polynomial schedule."""
    model = paddle.nn.Linear(2, 3)
    schedule = paddle.optimizer.lr.PolynomialDecay(0.01, decay_steps=10)
    return model, paddle.optimizer.Momentum(schedule, parameters=model.parameters())


def train_one_step(model, optimizer):
    model(paddle.ones([1, 2])).sum().backward()
    optimizer.step()
    optimizer.clear_grad()
    optimizer._learning_rate.step()


def saved_optimizer_state():
    """The optimizer state a checkpoint holds after one step: accumulators by structured names, numpy arrays."""
    with paddle.utils.unique_name.guard():  # tensor names as in a new process: linear_0.w_0, its velocity_0
        model, optimizer = linear_with_momentum()
        train_one_step(model, optimizer)
    state = checkpoint.optimizer_state_by_structure(model, optimizer)
    return {key: value.numpy() if isinstance(value, paddle.Tensor) else value for key, value in state.items()}


def resume(state, path):
    """Save ``state`` to ``path``, load it into a new model's optimizer and take a step, as a resumed run does."""
    paddle.save(state, path)
    with paddle.utils.unique_name.guard():  # as in the new process of a resumed run
        model, optimizer = linear_with_momentum()
        checkpoint.load_optimizer_state(model, optimizer, read_state(path), source=path)
        train_one_step(model, optimizer)
    return model, optimizer


def test_a_saved_optimizer_state_resumes_its_accumulators_and_schedule(tmp_path):
    state = saved_optimizer_state()
    model, optimizer = resume(state, str(tmp_path / 'model.pdopt'))
    assert optimizer._learning_rate.last_epoch == 2
    velocity = optimizer._accumulators['velocity'][model.weight.name].numpy()
    np.testing.assert_allclose(velocity, 0.9 * state['weight_velocity_0'] + 1, rtol=1e-6)  # the gradient is 1


BROKEN_OPTIMIZER_STATES = [
    pytest.param(lambda state: {**state, 'LR_Scheduler': 'every step'},
                 "LR_Scheduler holds a str, where the optimizer's schedule has a dict", id='schedule not a dict'),
    pytest.param(lambda state: {**state, 'LR_Scheduler': {**state['LR_Scheduler'], 'last_epoch': 'one'}},
                 "LR_Scheduler.last_epoch holds a str, where the optimizer's schedule has a int",
                 id='schedule step not a number'),
    pytest.param(lambda state: {key: value for key, value in state.items() if key != 'LR_Scheduler'},
                 "LR_Scheduler is missing, and the optimizer has a schedule (PolynomialDecay)", id='schedule missing'),
    pytest.param(lambda state: {**state, 'weight_velocity_0': 'fast'},
                 "weight_velocity_0 holds a str, not an array", id='accumulator not an array'),
    pytest.param(lambda state: {**state, 'master_weights': ['weight']},
                 "master_weights holds a list, not a dict", id='master weights not a dict'),
    pytest.param(lambda state: {**state, 'master_weights': {'weight': 'heavy'}},
                 "master_weights.weight holds a str, not an array of floats", id='master weight not an array'),
    pytest.param(lambda state: {**state, 7: np.zeros(1, np.float32)},
                 "key 7 is a int, not text", id='key not text'),
]


@pytest.mark.parametrize('corrupt, reason', BROKEN_OPTIMIZER_STATES)
def test_an_optimizer_state_of_the_wrong_shape_ends_in_one_sentence_naming_the_part(tmp_path, corrupt, reason):
    path = str(tmp_path / 'model.pdopt')
    with pytest.raises(CheckpointError) as error:
        resume(corrupt(saved_optimizer_state()), path)
    assert str(error.value) == f"{path}: {reason}"


def test_an_optimizer_state_that_is_not_a_dict_is_named(tmp_path):
    path = tmp_path / 'model.pdopt'
    paddle.save([1, 2], str(path))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: expected a dict of weights, found list$"):
        read_state(str(path))


def test_an_optimizer_state_with_megabytes_of_long_keys_resumes_within_seconds(tmp_path):
    """Accumulators are renamed by the parameter name they start with: the work per key is bounded by the
    longest parameter name, not by the key, which a file may make megabytes long."""
    state = saved_optimizer_state()
    state.update({f'{index}_' + 'x_' * (1 << 19): np.zeros(1, np.float32) for index in range(4)})  # 4 MB of keys

    def resumed_schedule_and_velocity():
        model, optimizer = resume(state, str(tmp_path / 'model.pdopt'))
        return optimizer._learning_rate.last_epoch, optimizer._accumulators['velocity'][model.weight.name].shape
    outcome, resumed, seconds = run_in_child(resumed_schedule_and_velocity)
    assert (outcome, resumed) == ('loaded', (2, [2, 3]))
    assert seconds < SECONDS


# ---------------------------------------------------------------------------------------------------
# Writing: a new file replaces the old one only once it is complete and on disk.

class FullDisk:
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        data = memoryview(data).cast('B')
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.fixture
def disk_full_after(monkeypatch):
    """After this call, every file opened for writing fails once ``room`` bytes are written to it."""
    def fill(room):
        real_open = builtins.open

        def open_(file, mode='r', *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            return FullDisk(opened, room) if 'w' in mode else opened
        monkeypatch.setattr(builtins, 'open', open_)
    return fill


@pytest.mark.parametrize('name', ['model.pdparams', 'model.safetensors'])
def test_a_save_that_fails_midway_leaves_the_previous_file_and_nothing_else(tmp_path, disk_full_after, name):
    path = str(tmp_path / 'sub' / name)
    save_state({'w': paddle.zeros([4])}, path)
    before = open(path, 'rb').read()
    disk_full_after(1000)
    with pytest.raises(OSError, match='No space left'):
        save_state({'w': paddle.ones([10_000])}, path)
    assert open(path, 'rb').read() == before
    assert os.listdir(tmp_path / 'sub') == [name]


class Crash(BaseException):
    """The process ending at that line (power lost, SIGKILL)."""


@pytest.mark.parametrize('name', ['model.pdparams', 'model.safetensors'])
def test_a_crash_once_the_new_file_is_written_leaves_the_previous_file_whole(tmp_path, monkeypatch, name):
    path = str(tmp_path / name)
    save_state({'w': paddle.zeros([4])}, path)
    before = open(path, 'rb').read()
    writes = []
    real_open = builtins.open

    def open_(file, mode='r', *args, **kwargs):
        if 'w' in mode:
            writes.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    def crash(*args):
        raise Crash
    monkeypatch.setattr(builtins, 'open', open_)
    monkeypatch.setattr(os, 'replace', crash)
    monkeypatch.setattr(os, 'rename', crash)
    with pytest.raises(Crash):
        save_state({'w': paddle.ones([10_000])}, path)
    assert writes, 'the new file was not written'
    assert open(path, 'rb').read() == before


@pytest.mark.parametrize('name', ['model.pdparams', 'model.safetensors'])
def test_a_save_is_on_disk_before_it_takes_the_name(tmp_path, monkeypatch, name):
    """fsync of the complete file, then the rename, then fsync of the folder that holds the name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(('replace', str(target)))
        real_replace(source, target)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    path = str(tmp_path / name)
    save_state({'w': paddle.ones([1000])}, path)
    size = os.path.getsize(path)
    assert [event[0] for event in events] == ['fsync', 'replace', 'fsync']
    _, synced, synced_size = events[0]
    assert synced != path and os.path.dirname(synced) == str(tmp_path) and synced_size == size
    assert events[1] == ('replace', path)
    assert events[2][1] == str(tmp_path)
    assert os.listdir(tmp_path) == [name]


# ---------------------------------------------------------------------------------------------------
# safetensors: weights that cannot carry code at all.

def small_emanet(seed):
    paddle.seed(seed)
    return EMANet(3, ResNet18_vd(output_stride=8), ema_channels=32, gc_channels=16, num_bases=8)


def assert_same_weights(model, expected):
    actual = model.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key].numpy(), value.numpy(), err_msg=key)


def test_a_released_pdparams_converts_to_safetensors_that_load_into_an_identical_model(tmp_path):
    source = small_emanet(seed=1)
    pdparams, converted = str(tmp_path / 'model.pdparams'), str(tmp_path / 'model.safetensors')
    paddle.save(source.state_dict(), pdparams)  # as PaddleSeg saved its released weights
    checkpoint.convert_to_safetensors(pdparams, converted)
    original, copy = read_state(pdparams), read_state(converted)
    assert sorted(copy) == sorted(original)
    for key, value in original.items():
        assert copy[key].dtype == value.dtype and copy[key].shape == value.shape, key
        assert copy[key].tobytes() == value.tobytes(), key
    target = small_emanet(seed=2)
    load_weights(target, converted)
    assert_same_weights(target, source.state_dict())


def test_conversion_keeps_the_keys_of_the_file_and_loading_renames_legacy_ones(tmp_path):
    source = small_emanet(seed=3)
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    state['head.emau.bases'] = state.pop('head.emau.mu')
    pdparams, converted = str(tmp_path / 'old.pdparams'), str(tmp_path / 'old.safetensors')
    paddle.save(state, pdparams)
    checkpoint.convert_to_safetensors(pdparams, converted)
    assert 'head.emau.bases' in read_state(converted) and 'head.emau.mu' not in read_state(converted)
    target = load_weights(small_emanet(seed=4), converted)
    np.testing.assert_array_equal(target.head.emau.mu.numpy(), state['head.emau.bases'])


def test_weights_load_from_a_safetensors_url(tmp_path, server, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    source = small_emanet(seed=5)
    save_state(source.state_dict(), str(tmp_path / 'model.safetensors'))
    Handler.files['/zoo/model.safetensors'] = (tmp_path / 'model.safetensors').read_bytes()
    target = load_weights(small_emanet(seed=6), f'{server}/zoo/model.safetensors')
    assert_same_weights(target, source.state_dict())


def test_safetensors_keep_every_dtype_exactly_and_other_readers_agree(tmp_path):
    """bfloat16 is written as BF16 and read back as Paddle pickles it: its bits in a uint16 array."""
    half = paddle.to_tensor([0.1, -3.5, 65504.0], dtype='float16')
    brain = paddle.to_tensor([0.1, -3.5, 1e30], dtype='float32').astype('bfloat16')
    state = {'f32': paddle.rand([2, 3]), 'f16': half, 'bf16': brain, 'i64': paddle.to_tensor([-1, 2**40]),
             'bool': paddle.to_tensor([True, False]), 'u8': np.array([0, 255], np.uint8),
             'f64 scalar': np.array(2.5), 'fortran': np.asfortranarray(np.arange(6.0).reshape(2, 3)),
             'big-endian': np.arange(3, dtype='>i4')}
    path = str(tmp_path / 'all.safetensors')
    save_state(state, path)
    read = read_state(path)
    assert sorted(read) == sorted(state)
    for key, value in state.items():
        expected = value.numpy() if isinstance(value, paddle.Tensor) else value
        assert same(read[key], np.ascontiguousarray(expected, expected.dtype.newbyteorder('<'))), key
    assert read['bf16'].dtype == np.uint16
    # safetensors' own reader sees every type, Paddle's reads the bfloat16 tensor as bfloat16, equal values.
    with safetensors.safe_open(path, framework='np') as f:
        assert {key: f.get_slice(key).get_dtype() for key in f.keys()} == {
            'f32': 'F32', 'f16': 'F16', 'bf16': 'BF16', 'i64': 'I64', 'bool': 'BOOL', 'u8': 'U8',
            'f64 scalar': 'F64', 'fortran': 'F64', 'big-endian': 'I32'}
        np.testing.assert_array_equal(f.get_tensor('fortran'), state['fortran'])
    by_paddle = paddle.load(path, safetensors=True)
    assert by_paddle['bf16'].dtype == paddle.bfloat16
    np.testing.assert_array_equal(by_paddle['bf16'].astype('float32').numpy(), brain.astype('float32').numpy())


def test_a_file_written_by_safetensors_reads(tmp_path):
    path = str(tmp_path / 'theirs.safetensors')
    tensors = {'a': np.arange(4, dtype=np.float32), 'b': np.ones((2, 2), np.int32)}
    safetensors.numpy.save_file(tensors, path)
    read = read_state(path)
    for key, value in tensors.items():
        assert same(read[key], value), key


def test_only_weights_go_to_safetensors(tmp_path):
    path = tmp_path / 'model.safetensors'
    with pytest.raises(CheckpointError, match=r"model\.safetensors: only tensors go to \.safetensors; "
                                              r"'LR_Scheduler' holds a dict"):
        save_state({'w': paddle.ones([2]), 'LR_Scheduler': {'last_epoch': 3}}, str(path))
    assert os.listdir(tmp_path) == []


def safetensors_file(header, data=b''):
    """A safetensors file: 8 bytes of header length, the JSON header, the tensors' bytes."""
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack('<Q', len(header)) + header + data


HOSTILE_SAFETENSORS = [
    pytest.param(struct.pack('<Q', 1 << 60) + b'{}', id='header length of 2**60'),
    pytest.param(struct.pack('<Q', 1000) + b'{"w": {}}', id='header longer than the file'),
    pytest.param(safetensors_file(b'{"w": not json'), id='invalid JSON'),
    pytest.param(safetensors_file({'w': {'dtype': 'F32', 'shape': [1 << 30], 'data_offsets': [0, 1 << 32]}}, bytes(8)),
                 id='offsets past the end of the file'),
    pytest.param(safetensors_file({'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 8]}}, bytes(8)),
                 id='shape disagreeing with its offsets'),
    pytest.param(safetensors_file({'w': {'dtype': 'XX', 'shape': [2], 'data_offsets': [0, 8]}}, bytes(8)),
                 id='unknown type'),
    # Each tensor is copied out of the file: tensors sharing bytes would multiply the memory it takes.
    pytest.param(safetensors_file({f'w{i}': {'dtype': 'U8', 'shape': [8], 'data_offsets': [0, 8]} for i in range(1000)},
                                  bytes(8)), id='a thousand tensors on the same bytes'),
    pytest.param(b'\x01\x00', id='shorter than its header length'),
]


@pytest.mark.parametrize('body', HOSTILE_SAFETENSORS)
def test_a_hostile_safetensors_file_ends_quickly_in_one_sentence(tmp_path, body):
    path = tmp_path / 'hostile.safetensors'
    path.write_bytes(body)
    outcome, message, seconds = read_in_child(path)
    assert outcome == 'CheckpointError', (outcome, message)
    assert_one_sentence_naming(message, path)
    assert 'unreadable safetensors file' in message
    assert seconds < SECONDS
