"""With two data-parallel processes, every rank ends a training step with the same bases."""
import os
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), 'dist_bases_worker.py')

pytestmark = pytest.mark.slow  # multi-process launches


def test_two_ranks_hold_identical_bases_from_the_global_batch(tmp_path):
    cmd = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2',
           '--log_dir', str(tmp_path / 'log'), WORKER, str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    logs = ''.join(p.read_text() for p in (tmp_path / 'log').glob('*')) if (tmp_path / 'log').exists() else ''
    assert result.returncode == 0, result.stderr[-2000:] + logs[-2000:]
    ranks = [np.load(tmp_path / f'rank{r}.npz') for r in range(2)]
    np.testing.assert_array_equal(ranks[0]['mu'], ranks[1]['mu'])
    global_mean = np.concatenate([r['bases'] for r in ranks]).mean(axis=0, keepdims=True)
    global_mean /= np.linalg.norm(global_mean, axis=1, keepdims=True)
    expected = 0.5 * ranks[0]['initial'] + 0.5 * global_mean
    np.testing.assert_allclose(ranks[0]['mu'], expected, rtol=1e-5, atol=1e-6)
