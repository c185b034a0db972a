"""Every parser of untrusted bytes, under a fuzzer for a short fixed budget: any input ends in success or one
UserError, within MAX_SECONDS and MAX_TRACED_BYTES. ``python -m tests.fuzz --minutes 30`` is the long run."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from emanet.errors import InvalidInput
from fuzz.engine import MAX_TRACED_BYTES, Tally, made_seeds, mutate, mutations, try_input
from fuzz.targets import TARGETS, Target

# Inputs per target in every test run: a few seconds each (the long run tries thousands a minute).
EXAMPLES_PER_TARGET = 500
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('name', TARGETS)
def test_any_input_ends_in_success_or_one_user_error_within_the_bounds(name, tmp_path):
    target = TARGETS[name]
    seeds = made_seeds(target, tmp_path)
    tally = Tally(name)
    for seed in seeds:
        assert try_input(target, seed, tally, tmp_path) is None, f"the seed {seed[:60]!r} fails"

    @settings(max_examples=EXAMPLES_PER_TARGET, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations(seeds))
    def fuzz(data):
        finding = try_input(target, data, tally, tmp_path)
        assert finding is None, finding.problem

    fuzz()
    assert tally.inputs >= EXAMPLES_PER_TARGET


def test_the_seeds_of_a_target_are_valid_inputs_of_its_parser(tmp_path):
    """A target whose seeds all end in a UserError would fuzz only its first refusal."""
    for name, target in TARGETS.items():
        tally = Tally(name)
        for seed in made_seeds(target, tmp_path):
            try_input(target, seed, tally, tmp_path)
        assert tally.user_errors < tally.inputs, f"every seed of {name} is refused"


def _picky_target(run):
    return Target('picky', run, lambda folder: [b'seed'], 'a target of this test')


def test_an_exception_other_than_a_user_error_is_a_finding_and_a_user_error_is_not(tmp_path):
    def run(data, folder):
        if b'!' in data:
            raise InvalidInput('a refusal in one sentence')
        if b'?' in data:
            raise KeyError('a bug')

    target, tally = _picky_target(run), Tally('picky')
    assert try_input(target, b'fine', tally, tmp_path) is None
    assert try_input(target, b'!', tally, tmp_path) is None
    finding = try_input(target, b'?', tally, tmp_path)
    assert finding.problem.startswith("KeyError at test_fuzz.py:")
    assert (tally.inputs, tally.user_errors, len(tally.findings)) == (3, 1, 1)


def test_an_input_past_the_memory_bound_is_a_finding_even_when_it_ends_well(tmp_path):
    def run(data, folder):
        bytearray(MAX_TRACED_BYTES + (1 << 20))

    finding = try_input(_picky_target(run), b'', Tally('picky'), tmp_path)
    assert finding.problem.startswith('allocated 257 MiB at its peak')


def test_mutations_edit_the_seed_where_they_say():
    assert mutate(b'abcdef', [('set_byte', 0.5, ord('X'))]) == b'abcXef'
    assert mutate(b'abcdef', [('truncate', 0.5)]) == b'abc'
    assert mutate(b'abcdef', [('integer', 0.0, -1, 2, 'little')]) == b'\xff\xffcdef'
    assert mutate(b'abc', [('repeat', 0.0, 1, 3)]) == b'aaaabc'
    assert mutate(b'size 9', [('delete', 5 / 6, 1), ('text_number', 1.0, -4)]) == b'size -4'


@pytest.mark.slow
def test_the_long_run_reports_each_target(tmp_path):
    """The documented long run, in miniature: a table row per target with the inputs tried and no finding."""
    finished = subprocess.run([sys.executable, '-m', 'tests.fuzz', '--minutes', '0.2', '--engine', 'hypothesis',
                               '--targets', 'train_state', 'deploy', '--findings', str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    rows = {line.split()[0]: line.split() for line in finished.stdout.splitlines()[2:4]}
    assert sorted(rows) == ['deploy', 'train_state']
    assert all(int(row[2]) > 100 and row[-1] == '0' for row in rows.values()), finished.stdout
    assert finished.stdout.splitlines()[-1].endswith(' inputs, 0 exceptions other than UserError')


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('atheris') is None, reason='atheris has no wheel for this Python')
def test_atheris_drives_a_target_with_coverage(tmp_path):
    """A count of inputs, not of seconds: atheris's speed differs between Pythons and machines."""
    report = tmp_path / 'report.json'
    subprocess.run([sys.executable, '-m', 'tests.fuzz.worker', 'train_state', '240', '--inputs', '150',
                    '--engine', 'atheris', '--report', str(report), '--findings', str(tmp_path / 'findings')],
                   cwd=ROOT, capture_output=True, timeout=300, check=True)
    result = json.loads(report.read_text())
    assert (result['engine'], result['done'], result['findings'], result['inputs']) == ('atheris', True, [], 150)
