"""Where and how fast the process computes: the device (CPU, GPU, distributed), CPU math threads, the C
allocator, MKL's code path on AMD, what the CPU can do (cpu_info, bf16_kind). Process-wide settings.

Three defaults of dygraph Paddle on CPU cost a segmentation network most of its speed:
- its math (the GEMMs under every convolution) runs on one thread unless told;
- every activation map is a fresh allocation of tens of megabytes, which glibc serves with
  mmap and returns with munmap, so each operator first page-faults its whole output in.
  Keeping large blocks in the heap makes BatchNorm, ReLU and additions ~3x faster and a
  whole ResNet50 forward ~1.4x faster (measured by tools/benchmark.py);
- the MKL bundled in the Paddle wheel takes a slow generic code path on AMD CPUs unless
  MKL_DEBUG_CPU_TYPE=5 tells it to use its AVX2 kernels (a 2048x2048 matmul on one Zen core:
  47 GFLOP/s without, 124 with).
The tools apply the last two (tools/cli.py); importing the package changes none of them. A program
asks for each with one call, before its first computation: ``use_fast_mkl_on_amd()`` and
``tune_cpu_allocator()`` (``set_device`` sets the threads).
"""
import ctypes
import ctypes.util
import functools
import os
import platform
from typing import NamedTuple, Optional

import paddle
import paddle.distributed as dist
from paddle.base import core

from emanet.errors import InvalidInput, Unsupported
from emanet.logger import logger

# mallopt() parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from their own mmap: 1 GiB, or the most that
# glibc before 2.35 accepts (half its 64 MiB HEAP_MAX_SIZE on 64-bit systems).
MMAP_THRESHOLD_CHOICES = (1 << 30, 32 << 20)
# Free heap memory above this stays with the process instead of going back to the OS.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
ALLOCATOR_VARIABLE = 'EMANET_TUNE_MALLOC'
# MKL reads it before its first matrix product, so setting it inside the process is enough.
MKL_CPU_TYPE_VARIABLE = 'MKL_DEBUG_CPU_TYPE'
MKL_AVX2_CPU_TYPE = '5'


def parse_device(device):
    """('cpu', None), ('gpu', None) or ('gpu', N) for 'cpu', 'gpu' or 'gpu:N'; anything else is a ValueError."""
    kind, colon, number = str(device).partition(':')
    if kind == 'cpu' and not colon:
        return 'cpu', None
    if kind == 'gpu' and (not colon or number.isdigit()):
        return 'gpu', int(number) if colon else None
    raise InvalidInput(f"device must be 'cpu', 'gpu' or 'gpu:N' (N a GPU number), got '{device}'")


def launcher_gpu_id():
    """The GPU that paddle.distributed.launch gave this process (FLAGS_selected_gpus), 0 outside it."""
    return int(os.environ.get('FLAGS_selected_gpus', '0').split(',')[0])


def set_device(device, cpu_threads=None):
    """Select 'cpu', 'gpu' or 'gpu:N'; a GPU request on a CPU build of Paddle is one clear error.

    Under ``paddle.distributed.launch`` the process joins the others (NCCL on GPU, gloo on CPU).
    On CPU, each process takes its share of the cores for math (``cpu_threads`` overrides it).
    """
    kind, number = parse_device(device)
    if kind == 'gpu' and not paddle.is_compiled_with_cuda():
        raise Unsupported("--device gpu needs paddlepaddle-gpu; this Paddle is a CPU build "
                           "(install paddlepaddle-gpu, or use --device cpu)")
    if kind == 'gpu' and number is None and dist.get_world_size() > 1:
        device = f'gpu:{launcher_gpu_id()}'
    paddle.set_device(device)
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.init_parallel_env()  # started by paddle.distributed.launch: join the other processes
    if device == 'cpu':
        _log_fast_mkl_once()
        set_cpu_threads(cpu_threads or default_cpu_threads())
    return device


_fast_mkl_applied = False
_fast_mkl_logged = False


def _log_fast_mkl_once():
    """Say that this process set MKL's variable, at its first choice of the CPU."""
    global _fast_mkl_logged
    if not _fast_mkl_applied or _fast_mkl_logged:
        return
    _fast_mkl_logged = True
    logger.info("AMD CPU: set %s=%s so that MKL uses its AVX2 kernels (about 2.5x faster dygraph "
                "math); set the variable yourself to choose otherwise", MKL_CPU_TYPE_VARIABLE, MKL_AVX2_CPU_TYPE)


class CpuInfo(NamedTuple):
    vendor: Optional[str]  # 'GenuineIntel', 'AuthenticAMD', ... or None
    flags: frozenset       # feature flags: 'avx2', 'avx512_bf16', ...
    model: Optional[str]   # 'AMD EPYC 9B45', ...


@functools.lru_cache(maxsize=None)
def cpu_info():
    """What /proc/cpuinfo says of the first CPU (vendor, feature flags, model name); the one reader of it.
    Where there is none: (None, frozenset(), None)."""
    fields = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key in ('vendor_id', 'flags', 'model name'):
                    fields.setdefault(key, value.strip())
                if not line.strip() and fields:  # the first processor's block ends
                    break
    except OSError:
        pass
    return CpuInfo(fields.get('vendor_id'), frozenset(fields.get('flags', '').split()), fields.get('model name'))


def cpu_vendor():
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...), or None."""
    return cpu_info().vendor


def bf16_kind():
    """How this CPU runs bf16: 'native' (AVX-512 bf16 or AMX: faster than fp32), 'emulated' (oneDNN's
    bf16 kernels on AVX-512 without them: correct, slower than fp32) or None (no bf16 kernels)."""
    if {'avx512_bf16', 'amx_bf16'} & cpu_info().flags:
        return 'native'
    return 'emulated' if core.supports_bfloat16() else None


def default_cpu_threads():
    """Math threads for one process: the cores this process may run on (its affinity, which is what a
    container grants, unlike ``os.cpu_count()``), shared among the processes of a distributed run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // dist.get_world_size())


def use_fast_mkl_on_amd(vendor=None, flags=None):
    """On an AMD CPU with AVX2, let MKL take its AVX2 code path unless the user set MKL_DEBUG_CPU_TYPE.

    Without AVX2 MKL's AVX2 kernels would die on an illegal instruction, so nothing is set there.
    Must run before Paddle's first matrix product; the tools call it when tools/cli.py is imported.
    Returns True when this call set the variable (``set_device('cpu')`` then says so once).
    """
    global _fast_mkl_applied
    if vendor is None or flags is None:
        found = cpu_info()
        vendor = found.vendor if vendor is None else vendor
        flags = found.flags if flags is None else flags
    if MKL_CPU_TYPE_VARIABLE in os.environ or vendor != 'AuthenticAMD' or 'avx2' not in flags:
        return False
    os.environ[MKL_CPU_TYPE_VARIABLE] = MKL_AVX2_CPU_TYPE
    _fast_mkl_applied = True
    return True


def fast_mkl_applied():
    """Whether this process set MKL_DEBUG_CPU_TYPE (``use_fast_mkl_on_amd``)."""
    return _fast_mkl_applied


def set_cpu_threads(threads):
    """Let dygraph Paddle's CPU math use ``threads`` threads (FLAGS_paddle_num_threads does not reach MKL)."""
    core.set_num_threads(int(threads))


def tune_cpu_allocator(libc=None):
    """Serve large allocations from glibc's heap and keep freed memory for reuse, for the rest of the process.

    Each setting is applied on its own, the mmap threshold at the largest size glibc accepts:
    1 GiB, or 32 MiB where glibc is older than 2.35 (Ubuntu 20.04, the base of Paddle's images),
    which refuses more. Returns what was applied, e.g. {'mmap_threshold': 1073741824,
    'trim_threshold': 2147483647} ({} off glibc or when EMANET_TUNE_MALLOC=0), and logs it once.
    The process keeps its peak memory rather than returning it to the OS. The tools call it on CPU.
    """
    if os.environ.get(ALLOCATOR_VARIABLE, '1') == '0':
        return {}
    libc = libc or _glibc()
    if libc is None:
        return {}
    applied = {}
    for size in MMAP_THRESHOLD_CHOICES:
        if libc.mallopt(M_MMAP_THRESHOLD, size) == 1:
            applied['mmap_threshold'] = size
            break
    if libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1:
        applied['trim_threshold'] = TRIM_THRESHOLD_BYTES
    _log_allocator_once(applied)
    return applied


_allocator_logged = None


def _log_allocator_once(applied):
    global _allocator_logged
    if applied == _allocator_logged:
        return
    _allocator_logged = applied
    if 'mmap_threshold' in applied:
        logger.info("CPU allocator: blocks up to %d MiB come from glibc's heap and freed memory is %s "
                    "(faster dygraph on CPU; %s=0 turns this off)", applied['mmap_threshold'] >> 20,
                    'kept for reuse' if 'trim_threshold' in applied else 'returned (glibc refused the trim setting)',
                    ALLOCATOR_VARIABLE)
    else:
        logger.warning("glibc refused the mmap threshold; large tensors stay mmap-allocated (slower on CPU)")


def _glibc():
    """The C library if it is glibc (mallopt with glibc's parameter numbers), else None."""
    if platform.system() != 'Linux':
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt ignores these settings
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
