"""A pickle reader for checkpoints from anyone: only arrays and plain containers, with bounded work.

A plain unpickler runs any code a file names, and even one that calls nothing but array and container
makers does whatever work the file asks of it: a few hundred bytes can ask for 2**60 steps or terabytes.
``load`` interprets the pickle instructions itself (``PickleReader``): it calls only the makers of numpy
arrays and plain containers, checks what each is given (an array's bytes against its shape and dtype,
dict keys and set members are simple values), and bounds its work by the file's size (instructions,
nesting, sharing). ``Refused`` and ``Unreadable`` say why a file was not read.
"""
import collections
import pickletools

import numpy as np

from emanet.errors import short_text

# A Paddle checkpoint nests a few levels (state -> 'master_weights' -> (name, array)); far deeper is an attack.
MAX_DEPTH = 64
# Paddle writes a few dozen pickle instructions per tensor; interpreting one takes about a microsecond.
MAX_INSTRUCTIONS = 2_000_000
# Each value a pickle holds costs at least a byte of it, unless it is shared; containers that unfold
# into more values than the file has bytes, plus this many for small shared structures, are refused:
# whoever walks them (np.shape, printing, Paddle's set_state_dict) would walk every path. The same
# allowance bounds the work of calls and keys over values made earlier (see PickleReader.charge).
SHARED_VALUES_ALLOWANCE = 1_000_000
# Dtypes of Paddle's tensors, as numpy pickles them (numpy.dtype('f4', False, True)).
PICKLED_DTYPES = ('b1', 'i1', 'u1', 'i2', 'u2', 'i4', 'u4', 'i8', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16')
# numpy's arrays have at most 32 dimensions (64 since numpy 2).
MAX_DIMENSIONS = 64


class Refused(Exception):
    """The pickle asks for something no checkpoint needs; the message says what."""


class Unreadable(Exception):
    """The file contradicts itself: a length past its end, an array header claiming other bytes than it gives."""


class _BoundedFile:
    """The open checkpoint for ``pickletools.genops``: a read longer than what is left is refused
    before anything is allocated for it, and the position is counted rather than asked of the OS."""

    def __init__(self, file, size):
        self.file, self.size, self.position = file, size, 0

    def read(self, count):
        if count > self.size - self.position:
            raise Unreadable(f"truncated: {count} bytes wanted at byte {self.position}, "
                              f"{self.size - self.position} left")
        data = self.file.read(count)
        self.position += len(data)
        return data

    def readline(self):
        line = self.file.readline()
        self.position += len(line)
        return line

    def tell(self):
        return self.position


def _is_key(value):
    """Values that may be dict keys or set members: hashed in time proportional to their size, at most
    a few of them with one hash (an int's hash is its value modulo 2**61-1, so ints stop at 64 bits)."""
    return (value is None or type(value) in (str, bytes, bool, float)
            or (type(value) is int and value.bit_length() <= 64))


def _check_key(value, role):
    if not _is_key(value):
        size = f" of {value.bit_length()} bits" if type(value) is int else ''
        raise Refused(f"a {role} of type {type(value).__name__}{size}")
    return value


def _sequence(items, maker):
    if not isinstance(items, (list, tuple)):
        raise Refused(f"{maker} of a {type(items).__name__}")
    return items


def _make_tuple(items=()):
    return tuple(_sequence(items, 'tuple'))


def _make_list(items=()):
    return list(_sequence(items, 'list'))


def _pairs(items, maker):
    pairs = list(items.items()) if isinstance(items, dict) else _sequence(items, maker)
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise Refused(f"{maker} of something other than pairs")
        _check_key(pair[0], 'dict key')
    return pairs


def _make_dict(items=()):
    return dict(_pairs(items, 'dict'))


def _make_ordered_dict(items=()):
    return collections.OrderedDict(_pairs(items, 'OrderedDict'))


def _make_set(items=()):
    return {_check_key(item, 'set member') for item in _sequence(items, 'set')}


def _make_frozenset(items=()):
    return frozenset(_make_set(items))


def _make_slice(*bounds):
    if len(bounds) > 3 or not all(bound is None or type(bound) is int for bound in bounds):
        raise Refused("a slice of other than integers")
    return slice(*bounds)


def _make_empty_bytes():
    """Pickle protocol 2 writes b'' as a call of bytes()."""
    return b''


def _make_latin1_bytes(text, encoding):
    """Pickle protocol 2 writes bytes as _codecs.encode(text, 'latin1')."""
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise Refused("_codecs.encode of other than text in latin1")
    return text.encode('latin-1')


def _checked_shape(shape):
    if (not isinstance(shape, tuple) or len(shape) > MAX_DIMENSIONS
            or not all(type(size) is int and 0 <= size < 2**63 for size in shape)):
        raise Refused("an array shape other than up to 64 sizes")
    return shape


def _check_size(data, dtype, shape):
    """An array's header may not claim more (or fewer) bytes than the file gives it."""
    needed = dtype.itemsize
    for size in shape:
        needed *= size
    if needed != len(data):
        raise Unreadable(f"{dtype.name} array of shape {list(shape)} needs {needed} bytes, "
                          f"the file gives it {len(data)}")


def _checked_dtype(dtype):
    """A dtype made by _make_dtype. (Messages never print what the file made: printing a shared structure
    can take 2**depth steps; they print types and sizes.)"""
    if not isinstance(dtype, np.dtype):
        raise Refused(f"an array type given as a {type(dtype).__name__}")
    if dtype.kind not in 'biufc' or dtype.fields or dtype.subdtype:
        raise Refused(f"an array of type {dtype}")
    return dtype


def _make_dtype(spec, align=False, copy=True):
    """numpy.dtype(spec, False, True) as numpy pickles a dtype: a fresh object, for BUILD to complete."""
    if type(spec) is not str:
        raise Refused(f"an array type given as a {type(spec).__name__}")
    if spec not in PICKLED_DTYPES:
        raise Refused(f"array type {spec[:60]!r}")
    return np.dtype(spec, align=False, copy=True)


def _make_empty_array(subtype, shape, typecode):
    """numpy's _reconstruct(ndarray, (0,), b'b'): an empty array, which BUILD fills."""
    if subtype is not np.ndarray:
        raise Refused(f"an array of a subtype other than numpy.ndarray, a {type(subtype).__name__}")
    return np.empty(0, np.int8)


def _make_scalar(dtype, data):
    """numpy's scalar(dtype, raw bytes): a numpy scalar such as np.float32(0.5)."""
    dtype = _checked_dtype(dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise Refused(f"a {dtype.name} scalar of other than {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


def _make_array_from_buffer(buffer, dtype, shape, order):
    """numpy's _frombuffer(buffer, dtype, shape, order): how pickle protocol 5 writes an array."""
    dtype, shape = _checked_dtype(dtype), _checked_shape(shape)
    if type(buffer) not in (bytes, bytearray) or order not in ('C', 'F'):
        raise Refused("an array from other than bytes in C or Fortran order")
    _check_size(buffer, dtype, shape)
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


# What a checkpoint may call, by the names pickle gives them; nothing else is ever called.
_MAKERS = {
    ('builtins', 'tuple'): _make_tuple, ('builtins', 'list'): _make_list, ('builtins', 'dict'): _make_dict,
    ('builtins', 'set'): _make_set, ('builtins', 'frozenset'): _make_frozenset, ('builtins', 'slice'): _make_slice,
    ('builtins', 'bytes'): _make_empty_bytes, ('_codecs', 'encode'): _make_latin1_bytes,
    ('collections', 'OrderedDict'): _make_ordered_dict,
    ('numpy', 'dtype'): _make_dtype,
    ('numpy.core.multiarray', '_reconstruct'): _make_empty_array,
    ('numpy._core.multiarray', '_reconstruct'): _make_empty_array,
    ('numpy.core.multiarray', 'scalar'): _make_scalar,
    ('numpy._core.multiarray', 'scalar'): _make_scalar,
    ('numpy.core.numeric', '_frombuffer'): _make_array_from_buffer,
    ('numpy._core.numeric', '_frombuffer'): _make_array_from_buffer,
}
_MAKER_FUNCTIONS = tuple(set(_MAKERS.values()))
# Named by a pickle but never called: numpy's _reconstruct takes the array class as an argument.
_VALUES = {('numpy', 'ndarray'): np.ndarray}


def _fill_array(array, state):
    """BUILD of an array: numpy's own __setstate__, once the state is what numpy writes and its bytes
    are exactly what its shape and dtype need (the header cannot claim more than the file gives)."""
    if not (isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise Refused("an array state numpy does not write")
    _, shape, dtype, fortran_order, data = state
    dtype, shape = _checked_dtype(dtype), _checked_shape(shape)
    if type(fortran_order) not in (bool, int):
        raise Refused("an array order other than a bool")
    if type(data) is str:  # Python 2's pickles, read as latin-1 like paddle.load does
        data = data.encode('latin-1')
    if type(data) is not bytes:
        raise Refused(f"array bytes given as a {type(data).__name__}")
    _check_size(data, dtype, shape)
    array.__setstate__((1, shape, dtype, bool(fortran_order), data))


def _set_dtype_state(dtype, state):
    """BUILD of a dtype: only the state numpy writes for a plain numeric type (its byte order may vary)."""
    if not (isinstance(state, tuple) and len(state) == 8 and type(state[0]) is int and state[0] == 3
            and type(state[1]) is str and state[1] in ('<', '>', '|', '=')
            and state[2] is None and state[3] is None and state[4] is None
            and all(type(value) is int for value in state[5:]) and state[5:] == (-1, -1, 0)):
        raise Refused(f"a {dtype.name} type with a state numpy does not write")
    dtype.__setstate__(state)


def _pushing(make):
    """The handler of an instruction that pushes a new value."""
    def handler(reader, _):
        reader.push(make())
    return handler


def _making_tuple_of(count):
    """The handler of TUPLE1, TUPLE2, TUPLE3: the top ``count`` values as a tuple."""
    def handler(reader, _):
        items = [reader.pop() for _ in range(count)]
        reader.push(tuple(reversed(items)))
    return handler


class PickleReader:
    """Interprets the pickle instructions that paddle.save and pickle.dump write for arrays, numbers,
    text and containers (protocols 0 to 5; no out-of-band buffers: a file has nothing outside it),
    with bounded work:

    - only the makers in ``_MAKERS`` are called, with their arguments checked; arrays and dtypes are
      completed only with states numpy itself writes, and an array's bytes must match its header;
    - dict keys and set members, hashed when stored, are atomic values (a shared tuple would take
      2**depth steps to hash);
    - at most ``MAX_INSTRUCTIONS`` instructions, and no read past the end of the file;
    - work over values made earlier (a call copying a list, a long key compared on storing) is paid
      from a budget of twice the file's size: a few bytes cannot make it copy a million-item list
      a million times;
    - the memo is a dict: an index of four billion costs one entry (the C unpickler allocates 32 GB).
    ``_plain`` then bounds nesting and sharing.
    """

    def __init__(self, file, size):
        self.file = _BoundedFile(file, size)
        self.size = size
        # An honest pickle works on each of its bytes about once: an array's bytes when BUILD gives
        # them to it, and once more under protocol 2, which writes them as text to encode.
        self.budget = 2 * size + SHARED_VALUES_ALLOWANCE
        self.stack, self.marks, self.memo = [], [], {}
        self.names = {}  # id of a global found -> its name, for messages

    def load(self):
        for count, (opcode, argument, _) in enumerate(pickletools.genops(self.file), 1):
            if count > MAX_INSTRUCTIONS:
                raise Refused(f"more than {MAX_INSTRUCTIONS} pickle instructions")
            handler = self.HANDLERS.get(opcode.name)
            if handler is None:
                raise Refused(f"the pickle instruction {opcode.name}")
            handler(self, argument)
        return self.stack.pop()

    def charge(self, values):
        """Pay for work over ``values`` in proportion to their lengths (taken without walking them)."""
        for value in values:
            self.budget -= 1 + (len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset))
                                else 0)
        if self.budget < 0:
            raise Refused("work out of proportion to the file's size (values made once, used over and over)")

    # The stack, and marks into it.
    def push(self, value):
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise ValueError("stack underflow")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise ValueError("stack underflow")
        return self.stack[-1]

    def pop_mark(self):
        if not self.marks:
            raise ValueError("a MARK was expected")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def mark(self, _):
        self.marks.append(len(self.stack))

    def discard(self, _):
        if len(self.stack) > (self.marks[-1] if self.marks else 0):
            self.stack.pop()
        else:
            self.pop_mark()

    def discard_mark(self, _):
        self.pop_mark()

    def duplicate(self, _):
        self.push(self.top())

    def check_frame(self, length):
        if length > self.size - self.file.position:
            raise Unreadable(f"truncated: a frame of {length} bytes at byte {self.file.position}, "
                              f"{self.size - self.file.position} left")

    def check_protocol(self, protocol):
        if protocol > 5:
            raise ValueError(f"pickle protocol {protocol}")

    # Containers.
    def make_list(self, _):
        self.push(self.pop_mark())

    def make_tuple(self, _):
        self.push(tuple(self.pop_mark()))

    def make_dict(self, _):
        items = self.pop_mark()
        if len(items) % 2:
            raise ValueError("odd number of items for DICT")
        self.push(self.store_items({}, items))

    def make_frozenset(self, _):
        items = self.pop_mark()
        self.push(frozenset(self.checked_keys(items, 'set member')))

    def target(self, kind):
        target = self.top()
        if not isinstance(target, kind):
            raise Refused(f"adding items to a {type(target).__name__}")
        return target

    def append(self, _):
        value = self.pop()
        self.target(list).append(value)

    def appends(self, _):
        items = self.pop_mark()
        self.target(list).extend(items)

    def checked_keys(self, keys, role):
        """``keys`` once each is atomic and paid for: storing a key hashes it and may compare it."""
        for key in keys:
            _check_key(key, role)
        self.charge(keys)
        return keys

    def store_items(self, target, items):
        keys = self.checked_keys(items[0::2], 'dict key')
        target.update(zip(keys, items[1::2]))
        return target

    def set_item(self, _):
        value = self.pop()
        key = self.pop()
        self.store_items(self.target(dict), [key, value])

    def set_items(self, _):
        items = self.pop_mark()
        if len(items) % 2:
            raise ValueError("odd number of items for SETITEMS")
        self.store_items(self.target(dict), items)

    def add_items(self, _):
        items = self.pop_mark()
        self.target(set).update(self.checked_keys(items, 'set member'))

    # The memo.
    def put(self, index):
        self.memo[index] = self.top()

    def memoize(self, _):
        self.memo[len(self.memo)] = self.top()

    def get(self, index):
        if index not in self.memo:
            raise ValueError(f"memo entry {short_text(index)} read before it was stored")
        self.push(self.memo[index])

    # Globals, calls and BUILD.
    def find(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise Refused("a global named by other than text")
        module = 'builtins' if module == '__builtin__' else module  # protocol 2 writes Python 2's name
        found = _MAKERS.get((module, name)) or _VALUES.get((module, name))
        if found is None:
            raise Refused(f"it would call '{short_text(module)}.{short_text(name)}'")
        self.names[id(found)] = f"{module}.{name}"
        return found

    def global_(self, module_and_name):
        module, _, name = module_and_name.partition(' ')
        self.push(self.find(module, name))

    def stack_global(self, _):
        name = self.pop()
        module = self.pop()
        self.push(self.find(module, name))

    def reduce(self, _):
        arguments = self.pop()
        function = self.top()
        if not any(function is maker for maker in _MAKER_FUNCTIONS):  # by identity: hashing may be costly
            name = self.names.get(id(function), f"a {type(function).__name__}")
            raise Refused(f"it would call '{name}'")
        if not isinstance(arguments, tuple):
            raise Refused("a call with arguments other than a tuple")
        self.charge(arguments)
        self.stack[-1] = function(*arguments)

    def build(self, _):
        state = self.pop()
        target = self.top()
        self.charge(state if isinstance(state, tuple) else (state,))
        if type(target) is np.ndarray:
            _fill_array(target, state)
        elif isinstance(target, np.dtype):
            _set_dtype_state(target, state)
        else:
            raise Refused(f"BUILD of a {type(target).__name__}")

    def argument(self, value):
        self.push(value)

    def stop(self, _):
        self.top()  # the value pickled, which load returns

    HANDLERS = {
        'PROTO': check_protocol, 'FRAME': check_frame, 'STOP': stop,
        'MARK': mark, 'POP': discard, 'POP_MARK': discard_mark, 'DUP': duplicate,
        'NONE': _pushing(lambda: None), 'NEWTRUE': _pushing(lambda: True), 'NEWFALSE': _pushing(lambda: False),
        'EMPTY_LIST': _pushing(list), 'EMPTY_TUPLE': _pushing(tuple), 'EMPTY_DICT': _pushing(dict),
        'EMPTY_SET': _pushing(set), 'LIST': make_list, 'TUPLE': make_tuple, 'TUPLE1': _making_tuple_of(1),
        'TUPLE2': _making_tuple_of(2), 'TUPLE3': _making_tuple_of(3), 'DICT': make_dict, 'FROZENSET': make_frozenset,
        'APPEND': append, 'APPENDS': appends, 'SETITEM': set_item, 'SETITEMS': set_items, 'ADDITEMS': add_items,
        'PUT': put, 'BINPUT': put, 'LONG_BINPUT': put, 'MEMOIZE': memoize,
        'GET': get, 'BINGET': get, 'LONG_BINGET': get,
        'GLOBAL': global_, 'STACK_GLOBAL': stack_global, 'REDUCE': reduce, 'BUILD': build,
    }
    # Numbers, text and bytes: pickletools has decoded them already (Python 2's str as latin-1, like paddle.load).
    HANDLERS.update(dict.fromkeys(
        ['INT', 'BININT', 'BININT1', 'BININT2', 'LONG', 'LONG1', 'LONG4', 'FLOAT', 'BINFLOAT',
         'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8',
         'BINBYTES', 'SHORT_BINBYTES', 'BINBYTES8', 'BYTEARRAY8'], argument))


def plain(root, unfolded_limit):
    """``root`` with Paddle 3's pickled tensors, ``(name, array)`` pairs, as arrays.

    A container held twice is converted once and stays shared. Nesting deeper than ``MAX_DEPTH``
    (also a container that holds itself) and containers that unfold into more than ``unfolded_limit``
    values are refused.
    """
    converted = {}  # id -> (plain value, height, values it unfolds into)

    def convert(value, depth):
        if depth > MAX_DEPTH:
            raise Refused(f"values nested more than {MAX_DEPTH} deep")
        if not isinstance(value, (list, tuple, dict)):
            return value, 0, 1 + (len(value) if isinstance(value, (set, frozenset)) else 0)
        done = converted.get(id(value))
        if done is not None:
            if depth + done[1] > MAX_DEPTH:
                raise Refused(f"values nested more than {MAX_DEPTH} deep")
            return done
        if isinstance(value, dict):
            children = [convert(item, depth + 1) for item in value.values()]
            plain = type(value)(zip(value, (child[0] for child in children)))
            unfolded = 1 + len(value) + sum(child[2] for child in children)
        else:
            children = [convert(item, depth + 1) for item in value]
            items = [child[0] for child in children]
            is_tensor = (isinstance(value, tuple) and len(value) == 2
                         and isinstance(value[0], str) and isinstance(value[1], np.ndarray))
            plain = value[1] if is_tensor else items if isinstance(value, list) else tuple(items)
            unfolded = 1 + sum(child[2] for child in children)
        if unfolded > unfolded_limit:
            raise Refused("containers shared so often that they unfold into more values than the file could hold")
        done = converted[id(value)] = (plain, 1 + max((child[1] for child in children), default=0), unfolded)
        return done

    return convert(root, 0)[0]


