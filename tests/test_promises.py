"""Each promise of docs/security.md ("Security and failure behaviour") names the test or fuzz target that keeps it:
every name there must be a test that exists, so the promise cannot outlive its test."""
import re
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]


def promises():
    return (ROOT / 'docs' / 'security.md').read_text()


def named_tests(section):
    """(file, test) of every `file.py::test` and of every `::test`, which belongs to the file named before it."""
    tests, current = [], None
    for token in re.findall(r'`([^`]+)`', section):
        if re.fullmatch(r'[\w/]+\.py', token):
            current = token
        match = re.fullmatch(r'([\w/]+\.py)?::(test_\w+)', token)
        if match:
            current = match.group(1) or current
            tests.append((current, match.group(2)))
    return tests


def test_every_test_a_promise_names_exists():
    section = promises()
    tests = named_tests(section)
    assert len(tests) > 40
    missing = [f"{file}::{name}" for file, name in tests
               if not re.search(rf'^def {name}\(', (ROOT / 'tests' / file).read_text(), re.MULTILINE)]
    assert missing == []


def test_every_fuzz_target_a_promise_names_exists_and_every_target_is_named():
    named = set(re.findall(r'fuzz targets? ((?:`\w+`(?:, )?)+)', promises()))
    names = {name for group in named for name in re.findall(r'`(\w+)`', group)}
    assert names == set(TARGETS)
