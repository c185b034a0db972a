"""The package's log records reach a program's logging; setup_logging prints them as the tools do.
Dropping the notes of other libraries: only the named ones go, everything else still shows."""
import os
import subprocess
import sys
import warnings

import pytest

from emanet.logger import drop_stderr_lines, ignore_warnings

PROBE = """
import logging
import emanet
from emanet.logger import logger, setup_logging

class Collect(logging.Handler):
    records = []

    def emit(self, record):
        self.records.append(record.getMessage())

logging.getLogger().addHandler(Collect())
logger.warning('seen by the program')
setup_logging()
logger.info('printed as the tools print it')
print(Collect.records)
"""


@pytest.mark.slow  # a fresh process
def test_records_reach_the_programs_handlers_until_setup_logging_prints_them_itself():
    result = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, check=True)
    printed, collected = result.stdout.splitlines()
    assert printed.endswith(' [INFO] printed as the tools print it')
    assert collected == "['seen by the program']"


def test_only_the_named_stderr_lines_are_dropped_also_those_written_below_python(capfd):
    with drop_stderr_lines('out tensor'):
        os.write(2, b'first\nW1124 eager_utils.cc] not support input out tensor\n')
        os.write(2, b'last\n')
    assert capfd.readouterr().err == 'first\nlast\n'


def test_the_other_stderr_lines_come_through_when_the_block_raises(capfd):
    with pytest.raises(ValueError, match='bad'):
        with drop_stderr_lines('out tensor'):
            os.write(2, b'an error of the C++ core\n')
            raise ValueError('bad')
    assert capfd.readouterr().err == 'an error of the C++ core\n'


def test_only_the_named_warnings_are_ignored_and_only_inside_the_block():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        with ignore_warnings('When training'):
            warnings.warn('When training, we now always track global mean and variance.')
            warnings.warn('something else')
        warnings.warn('When training, again')
    assert [str(w.message) for w in shown] == ['something else', 'When training, again']
