"""Runtime settings: the device check, CPU threads, and the allocator tuning's effect on page faults."""
import os
import subprocess
import sys
import textwrap

import paddle
import pytest

from emanet import runtime

# Page faults while ReLU writes a fresh 64 MB tensor, once earlier identical tensors were freed
# (glibc settles its heap over the first few).
FAULTS_PROBE = textwrap.dedent("""
    import resource, sys
    import paddle
    from emanet import runtime
    if sys.argv[1] == 'tuned':
        assert runtime.tune_cpu_allocator()
    x = paddle.randn([16, 1024, 1024])  # 64 MB
    for _ in range(4):
        paddle.nn.functional.relu(x)  # allocated, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = paddle.nn.functional.relu(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode):
    env = dict(os.environ, EMANET_TUNE_MALLOC='1')
    result = subprocess.run([sys.executable, '-c', FAULTS_PROBE, mode], capture_output=True, text=True,
                            env=env, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(runtime._glibc() is None, reason='the allocator tuning is glibc-only')
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    pages = 64 * 2 ** 20 // os.sysconf('SC_PAGE_SIZE')
    assert page_faults('default') > pages // 2  # glibc mmaps the 64 MB anew: every page faults
    assert page_faults('tuned') < pages // 20


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(runtime.ALLOCATOR_VARIABLE, '0')
    assert runtime.tune_cpu_allocator() is False


def test_gpu_on_a_cpu_build_is_one_clear_error():
    if paddle.is_compiled_with_cuda():
        pytest.skip('this Paddle has CUDA')
    with pytest.raises(RuntimeError, match='paddlepaddle-gpu'):
        runtime.set_device('gpu')
