"""Fuzz every parser of untrusted bytes for a while: ``python -m tests.fuzz --minutes 30``.

The minutes are shared out among the targets (``--targets`` picks some); each runs in a process of its
own (``tests/fuzz/worker.py``) with atheris (coverage-guided) where its wheel is installed, else with
hypothesis's mutations of the target's seeds. Prints, per target: the inputs tried, how many ended in a
UserError, the worst time and traced memory of one input, the process's peak RSS, and the exceptions other
than UserError (the goal: none). Inputs that found something are kept under ``--findings``.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .engine import kind_of
from .targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


def run_target(name, seconds, engine, findings):
    """The report of one worker run (a dict), with 'died' set when the worker ended without finishing."""
    report = Path(tempfile.mkstemp(suffix='.json')[1])
    command = [sys.executable, '-m', 'tests.fuzz.worker', name, str(seconds), '--engine', engine,
               '--report', str(report), '--findings', str(findings / name)]
    try:
        finished = subprocess.run(command, cwd=ROOT, timeout=seconds + 300, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        # libFuzzer's progress lines fill stderr: keep its verdict and Python's last words
        verdict = [line for line in finished.stderr.splitlines()
                   if 'ERROR' in line or 'Error' in line or 'SUMMARY' in line or 'Timeout' in line]
        died = None if finished.returncode == 0 else f"exit code {finished.returncode}: {' | '.join(verdict[-3:])}"
    except subprocess.TimeoutExpired:
        died = f"no end {seconds + 300:.0f} s after its start"
    text = report.read_text() if report.exists() else ''
    report.unlink(missing_ok=True)
    result = json.loads(text) if text else {'target': name, 'engine': engine, 'inputs': 0, 'findings': []}
    if died:
        current = findings / name / 'current'
        kept = current.with_name('died-on') if current.exists() else None
        if kept:
            current.replace(kept)
        result['findings'] = [*result.get('findings', []), f"the worker died ({died.strip()[:300]}); input: {kept}"]
    return result


def group_by_kind(problems):
    groups = {}
    for problem in problems:
        groups.setdefault(kind_of(problem), []).append(problem)
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, default=30, help='for all targets together (default 30)')
    parser.add_argument('--targets', nargs='+', choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument('--engine', choices=('auto', 'atheris', 'hypothesis'), default='auto',
                        help='auto: atheris where installed, else hypothesis')
    parser.add_argument('--findings', default='fuzz-findings', help='folder for inputs that found something')
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == 'auto':
        engine = 'atheris' if importlib.util.find_spec('atheris') else 'hypothesis'
    seconds = args.minutes * 60 / len(args.targets)
    findings = Path(args.findings).resolve()
    print(f"{len(args.targets)} targets, {seconds:.0f} s each, engine {engine}, findings in {findings}", flush=True)
    header = f"{'target':12} {'engine':10} {'inputs':>9} {'UserError':>9} {'worst s':>8} {'worst MiB':>9} {'RSS MiB':>8} other exceptions"
    print(header, flush=True)
    results = []
    for name in args.targets:
        result = run_target(name, seconds, engine, findings)
        results.append(result)
        print(f"{name:12} {result.get('engine') or engine:10} {result['inputs']:9} {result.get('user_errors', 0):9} "
              f"{result.get('worst_seconds', 0):8.3f} {result.get('worst_traced_mib', 0):9.1f} "
              f"{result.get('max_rss_mib', 0):8.0f} {len(result['findings'])}", flush=True)
        for kind, problems in group_by_kind(result['findings']).items():
            print(f"    {len(problems):6} x {kind}, e.g. {problems[0][len(kind) + 2:][:200]}", flush=True)
    total = sum(len(result['findings']) for result in results)
    print(f"{sum(r['inputs'] for r in results)} inputs, {total} exceptions other than UserError", flush=True)
    return 1 if total else 0


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.exit(main())
