"""One fuzz target for a fixed time, in a process of its own: ``python -m tests.fuzz.worker TARGET SECONDS ...``.

Writes its tally (JSON) to ``--report`` every second and at the end, and each finding's input to
``--findings``. The input being tried is also kept there as ``current``: if an input hangs past three times
the per-input bound, faulthandler ends the process with the stacks, and the parent reports that input.
"""
import argparse
import faulthandler
import hashlib
import inspect
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from .engine import MAX_SECONDS, Tally, made_seeds, mutations, try_input
from .targets import TARGETS

# What atheris instruments for coverage: this package and the standard-library parsers it relies on.
INSTRUMENTED = ('emanet', 'tarfile', 'zipfile', 'gzip', 'json', 'yaml', 'pickletools', 'safetensors', 'email',
                'http', 'urllib3', 'requests')


class Run:
    def __init__(self, target, seconds, report, findings, max_inputs=None):
        self.target, self.report, self.findings = target, Path(report), Path(findings)
        self.findings.mkdir(parents=True, exist_ok=True)
        self.tally = Tally(target.name)
        self.deadline = time.monotonic() + seconds
        self.max_inputs = max_inputs
        self.scratch = tempfile.mkdtemp(prefix=f'fuzz-{target.name}-')
        self.last_write = 0.0
        self.engine = None

    def one(self, data):
        (self.findings / 'current').write_bytes(data)
        faulthandler.dump_traceback_later(3 * MAX_SECONDS, exit=True)
        finding = try_input(self.target, data, self.tally, self.scratch)
        faulthandler.cancel_dump_traceback_later()
        if finding is not None:
            name = hashlib.sha256(data).hexdigest()[:16]
            (self.findings / name).write_bytes(data)
            (self.findings / f'{name}.txt').write_text(finding.problem + '\n')
        if time.monotonic() - self.last_write > 1 or finding is not None:
            self.write_report()

    def write_report(self, done=False):
        self.last_write = time.monotonic()
        report = dict(self.tally.as_dict(), engine=self.engine, done=done,
                      max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        self.report.write_text(json.dumps(report))

    def over(self):
        return time.monotonic() > self.deadline or (self.max_inputs is not None and self.tally.inputs >= self.max_inputs)


def fuzz_with_hypothesis(run, seeds):
    from hypothesis import HealthCheck, Phase, given, settings

    class TimeIsUp(Exception):
        pass

    @settings(max_examples=10 ** 9, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(mutations(seeds))
    def fuzz(data):
        if run.over():
            raise TimeIsUp
        run.one(data)

    try:
        fuzz()
    except TimeIsUp:
        pass


def fuzz_with_atheris(run, seeds):
    import atheris
    corpus = Path(run.scratch) / 'corpus'
    corpus.mkdir()
    for number, seed in enumerate(seeds):
        (corpus / f'seed{number}').write_bytes(seed)

    def test_one_input(data):
        if run.over():
            run.write_report(done=True)
            os._exit(0)  # libFuzzer's own end would skip the last report
        run.one(data)

    instrument_parsers(atheris)
    atheris.Setup([sys.argv[0], '-rss_limit_mb=4096', f'-timeout={int(3 * MAX_SECONDS)}', '-max_len=65536',
                   str(corpus)], test_one_input)
    atheris.Fuzz()


def instrument_parsers(atheris):
    """Give atheris the coverage of the modules in INSTRUMENTED, already imported by the seeds
    (instrumenting everything loaded, Paddle's Python among it, takes longer than a run)."""
    for name, module in list(sys.modules.items()):
        if module is None or name.split('.')[0] not in INSTRUMENTED:
            continue
        for value in list(vars(module).values()):
            owned = getattr(value, '__module__', None) == name
            if inspect.isfunction(value) and owned:
                atheris.instrument_func(value)
            elif inspect.isclass(value) and owned:
                for member in vars(value).values():
                    if inspect.isfunction(member):
                        atheris.instrument_func(member)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('target', choices=sorted(TARGETS))
    parser.add_argument('seconds', type=float)
    parser.add_argument('--inputs', type=int, help='stop after this many inputs, if the time has not run out first')
    parser.add_argument('--engine', choices=('hypothesis', 'atheris'), default='hypothesis')
    parser.add_argument('--report', required=True)
    parser.add_argument('--findings', required=True)
    args = parser.parse_args(argv)
    run = Run(TARGETS[args.target], args.seconds, args.report, args.findings, args.inputs)
    run.engine = args.engine
    seeds = made_seeds(run.target, run.scratch)
    for seed in seeds:  # every run tries the valid inputs themselves first
        run.one(seed)
    if args.engine == 'atheris':
        fuzz_with_atheris(run, seeds)
    else:
        fuzz_with_hypothesis(run, seeds)
    run.write_report(done=True)


if __name__ == '__main__':
    main()
