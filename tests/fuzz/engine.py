"""How a fuzz target is run: one input at a time, in a fresh folder, timed and with its memory traced.

``try_input`` is the one place that decides what an outcome means: success and ``UserError`` are what
every target may end in; any other exception is a finding. Inputs come from two generators:
``mutations`` (hypothesis: seeds with bytes flipped, inserted, cut, repeated, or set to boundary
integers; or raw bytes) and, where its wheel is installed, atheris (coverage-guided, see ``worker.py``).
"""
import dataclasses
import os
import shutil
import tempfile
import time
import traceback
import tracemalloc
from pathlib import Path

from hypothesis import strategies as st

from emanet.errors import UserError

# Bounds on one input, far above what a valid input of the seeds' size takes (milliseconds, a few MB):
# past them, an input is a finding even though it ended well.
MAX_SECONDS = 10.0
MAX_TRACED_BYTES = 256 << 20
# Values that sit on the edges of the fields parsers read: lengths, counts, sizes, signs.
BOUNDARY_INTEGERS = (0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x7fffffff, 0x80000000, 0xffffffff,
                     2 ** 63 - 1, 2 ** 64 - 1)


@dataclasses.dataclass
class Finding:
    """An input that ended in something other than success or a UserError, or went past a bound."""
    target: str
    data: bytes
    problem: str


@dataclasses.dataclass
class Tally:
    """What a run of one target saw."""
    target: str
    inputs: int = 0
    user_errors: int = 0
    worst_seconds: float = 0.0
    worst_traced_bytes: int = 0
    findings: list = dataclasses.field(default_factory=list)

    def as_dict(self):
        return {'target': self.target, 'inputs': self.inputs, 'user_errors': self.user_errors,
                'worst_seconds': round(self.worst_seconds, 4), 'worst_traced_mib': round(self.worst_traced_bytes / 2 ** 20, 2),
                'findings': [finding.problem for finding in self.findings]}


def try_input(target, data, tally, scratch):
    """Run ``target`` on ``data`` in a new folder under ``scratch``; count it in ``tally``. Returns the
    Finding, or None when the input ended in success or one UserError within the bounds."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    problem = None
    try:
        target.run(data, folder)
    except UserError:  # one line by construction (emanet.errors.UserError.__str__)
        tally.user_errors += 1
    except Exception as err:  # noqa: BLE001 - any other exception is what fuzzing looks for
        problem = f"{type(err).__name__} at {raised_at(err)}: {' '.join(str(err).split())[:300]}"
    finally:
        seconds = time.perf_counter() - start
        traced = tracemalloc.get_traced_memory()[1]
        if started_tracing:
            tracemalloc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    tally.inputs += 1
    tally.worst_seconds = max(tally.worst_seconds, seconds)
    tally.worst_traced_bytes = max(tally.worst_traced_bytes, traced)
    if problem is None and seconds > MAX_SECONDS:
        problem = f"took {seconds:.1f} s (bound {MAX_SECONDS} s)"
    if problem is None and traced > MAX_TRACED_BYTES:
        problem = f"allocated {traced / 2 ** 20:.0f} MiB at its peak (bound {MAX_TRACED_BYTES >> 20} MiB)"
    if problem is None:
        return None
    finding = Finding(target.name, data, problem)
    tally.findings.append(finding)
    return finding


def raised_at(err):
    """'file.py:line' of the deepest frame of this package that the exception passed, else of the deepest frame."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [frame for frame in frames if f'{os.sep}emanet{os.sep}' in frame.filename] or frames
    return f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else 'unknown'


def kind_of(problem):
    """A finding's kind, for grouping: the exception and where it was raised, without the message."""
    return problem.split(': ', 1)[0]


def mutate(seed, edits):
    """``seed`` with ``edits`` applied in order; each edit's position is a fraction of the current length."""
    data = bytearray(seed)
    for kind, where, *args in edits:
        at = min(int(where * len(data)), len(data))
        if kind == 'set_byte':
            if data:
                data[min(at, len(data) - 1)] = args[0]
        elif kind == 'insert':
            data[at:at] = args[0]
        elif kind == 'delete':
            del data[at:at + args[0]]
        elif kind == 'truncate':
            del data[at:]
        elif kind == 'repeat':
            data[at:at] = data[at:at + args[0]] * args[1]
        elif kind == 'integer':
            value, width, order = args
            packed = (value % 2 ** (8 * width)).to_bytes(width, order)
            data[at:at + width] = packed
        elif kind == 'text_number':  # lengths and sizes written as text (headers, YAML, JSON, tar fields)
            data[at:at] = str(args[0]).encode()
    return bytes(data)


_EDITS = st.one_of(
    st.tuples(st.just('set_byte'), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just('insert'), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just('delete'), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just('truncate'), st.floats(0, 1)),
    st.tuples(st.just('repeat'), st.floats(0, 1), st.integers(1, 64), st.integers(2, 64)),
    st.tuples(st.just('integer'), st.floats(0, 1), st.sampled_from(BOUNDARY_INTEGERS) | st.integers(-2 ** 63, 2 ** 64),
              st.sampled_from((1, 2, 4, 8)), st.sampled_from(('little', 'big'))),
    st.tuples(st.just('text_number'), st.floats(0, 1), st.sampled_from(BOUNDARY_INTEGERS) | st.integers(-10 ** 12, 10 ** 12)),
)


def mutations(seeds):
    """Inputs for a target: mostly its seeds with a few edits, sometimes raw bytes."""
    edited = st.builds(mutate, st.sampled_from(seeds), st.lists(_EDITS, min_size=1, max_size=6))
    return st.one_of(edited, edited, edited, st.binary(max_size=1024))


def made_seeds(target, scratch):
    """The target's seeds, made in a folder of their own under ``scratch``."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    seeds = target.seeds(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return seeds


def describe(tally):
    return (f"{tally.target:12} inputs {tally.inputs:7}  UserError {tally.user_errors:7}  worst {tally.worst_seconds:7.3f} s "
            f"{tally.worst_traced_bytes / 2 ** 20:8.1f} MiB  other exceptions {len(tally.findings)}")

