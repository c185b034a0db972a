"""Device and process settings: the device check, CPU threads, and the allocator tuning's effect on page faults."""
import os
import subprocess
import sys
import textwrap

import paddle
import pytest

from emanet import device

# Page faults while ReLU writes a fresh 64 MB tensor, once earlier identical tensors were freed (glibc settles
# its heap over the first few): with glibc's defaults, then after tuning it, in one process.
FAULTS_PROBE = textwrap.dedent("""
    import resource
    import paddle
    from emanet import device
    x = paddle.randn([16, 1024, 1024])  # 64 MB

    def faults_of_a_fresh_tensor():
        for _ in range(4):
            paddle.nn.functional.relu(x)  # allocated, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = paddle.nn.functional.relu(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults_of_a_fresh_tensor()
    assert device.tune_cpu_allocator()
    print(default, faults_of_a_fresh_tensor())
""")


def page_faults():
    """(faults with glibc's defaults, faults once tuned)."""
    env = dict(os.environ, EMANET_TUNE_MALLOC='1')
    result = subprocess.run([sys.executable, '-c', FAULTS_PROBE], capture_output=True, text=True,
                            env=env, check=True)
    return tuple(map(int, result.stdout.split()[-2:]))


@pytest.mark.slow
@pytest.mark.skipif(device._glibc() is None, reason='the allocator tuning is glibc-only')
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    pages = 64 * 2 ** 20 // os.sysconf('SC_PAGE_SIZE')
    # Any of three probes: a VM's proactive reclaim (DAMON's kdamond runs on the CI machine) may page out the
    # freed heap before the probe reuses it, and then every page faults again; without the tuning, all do.
    for _ in range(3):
        default, tuned = page_faults()
        assert default > pages // 2  # glibc mmaps the 64 MB anew: every page faults
        if tuned < pages // 20:
            break
    assert tuned < pages // 20, (default, tuned)


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(device.ALLOCATOR_VARIABLE, '0')
    assert device.tune_cpu_allocator() == {}


def test_gpu_on_a_cpu_build_is_one_clear_error():
    if paddle.is_compiled_with_cuda():
        pytest.skip('this Paddle has CUDA')
    with pytest.raises(RuntimeError, match='paddlepaddle-gpu'):
        device.set_device('gpu')


def test_amd_cpus_get_mkls_fast_path_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(device.MKL_CPU_TYPE_VARIABLE, raising=False)
    monkeypatch.setattr(device, '_fast_mkl_applied', False)
    assert device.use_fast_mkl_on_amd(vendor='GenuineIntel', flags={'avx2'}) is False
    assert device.MKL_CPU_TYPE_VARIABLE not in os.environ
    # An AMD CPU without AVX2 (MKL's AVX2 kernels would end the process with SIGILL there).
    assert device.use_fast_mkl_on_amd(vendor='AuthenticAMD', flags={'sse4_2', 'avx'}) is False
    assert device.MKL_CPU_TYPE_VARIABLE not in os.environ
    assert device.use_fast_mkl_on_amd(vendor='AuthenticAMD', flags={'avx', 'avx2'}) is True
    assert os.environ[device.MKL_CPU_TYPE_VARIABLE] == '5'
    monkeypatch.setenv(device.MKL_CPU_TYPE_VARIABLE, '2')
    assert device.use_fast_mkl_on_amd(vendor='AuthenticAMD', flags={'avx2'}) is False
    assert os.environ[device.MKL_CPU_TYPE_VARIABLE] == '2'


@pytest.mark.parametrize('name, parsed', [('cpu', ('cpu', None)), ('gpu', ('gpu', None)), ('gpu:1', ('gpu', 1))])
def test_device_names(name, parsed):
    assert device.parse_device(name) == parsed


@pytest.mark.parametrize('name', ['cuda', 'gpu:x', 'cpu:0', 'gpu:'])
def test_a_bad_device_name_is_one_clear_error(name):
    with pytest.raises(ValueError, match=f"'cpu', 'gpu' or 'gpu:N'.*got '{name}'"):
        device.parse_device(name)


class OldGlibc:
    """mallopt as glibc before 2.35 answers it: an mmap threshold above 32 MiB is refused (0)."""

    def __init__(self, refuse_trim=False):
        self.calls = []
        self.refuse_trim = refuse_trim

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        if parameter == device.M_MMAP_THRESHOLD:
            return int(value <= 32 << 20)
        return int(not self.refuse_trim)


def test_older_glibc_gets_the_largest_threshold_it_accepts_and_the_trim_setting_still(monkeypatch):
    monkeypatch.setenv(device.ALLOCATOR_VARIABLE, '1')
    libc = OldGlibc()
    assert device.tune_cpu_allocator(libc) == {'mmap_threshold': 32 << 20, 'trim_threshold': (1 << 31) - 1}
    assert libc.calls == [(device.M_MMAP_THRESHOLD, 1 << 30), (device.M_MMAP_THRESHOLD, 32 << 20),
                          (device.M_TRIM_THRESHOLD, (1 << 31) - 1)]


def test_each_setting_is_applied_on_its_own(monkeypatch):
    monkeypatch.setenv(device.ALLOCATOR_VARIABLE, '1')
    assert device.tune_cpu_allocator(OldGlibc(refuse_trim=True)) == {'mmap_threshold': 32 << 20}


@pytest.mark.slow  # a fresh process
@pytest.mark.skipif(device._glibc() is None, reason='the allocator tuning is glibc-only')
def test_the_log_line_says_what_was_applied():
    probe = ("from emanet import device; from emanet.logger import setup_logging; "
             "setup_logging(); device.tune_cpu_allocator()")
    env = dict(os.environ, EMANET_TUNE_MALLOC='1')
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, env=env, check=True)
    assert ("CPU allocator: blocks up to 1024 MiB come from glibc's heap and freed memory is kept for reuse"
            in result.stdout)


def test_cpu_info_reads_the_first_processor_of_proc_cpuinfo():
    text = open('/proc/cpuinfo').read()
    first = dict(line.split(':', 1) for line in text.split('\n\n')[0].splitlines() if ':' in line)
    first = {key.strip(): value.strip() for key, value in first.items()}
    info = device.cpu_info()
    assert info.vendor == first.get('vendor_id') and info.model == first.get('model name')
    assert info.flags == frozenset(first.get('flags', '').split()) and 'sse2' in info.flags


def test_bf16_is_native_only_with_the_instructions_and_emulated_where_onednn_has_kernels(monkeypatch):
    info = device.cpu_info()
    for flags, kernels, expected in ((frozenset({'avx512_bf16'}), True, 'native'), (frozenset({'amx_bf16'}), True,
                                     'native'), (frozenset({'avx512f'}), True, 'emulated'), (frozenset(), False, None)):
        monkeypatch.setattr(device, 'cpu_info', lambda flags=flags: info._replace(flags=flags))
        monkeypatch.setattr(device.core, 'supports_bfloat16', lambda kernels=kernels: kernels)
        assert device.bf16_kind() == expected


def test_cpu_threads_default_to_the_cores_this_process_may_use_shared_among_processes(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5})
    assert device.default_cpu_threads() == 6
    monkeypatch.setattr(device.dist, 'get_world_size', lambda: 4)
    assert device.default_cpu_threads() == 1
