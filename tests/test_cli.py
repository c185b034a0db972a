"""Command lines: PaddleSeg's training flags are accepted and say when they change nothing; every flag has help;
the process settings the tools make (MKL's path, the allocator, log lines on stdout)."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import cli  # tools/cli.py
from cli import flags_without_effect
from conftest import TOOLS
from emanet import device


def tool(name):
    """The module of tools/<name>.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'tool_{name}', os.path.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_text(name, capsys):
    with pytest.raises(SystemExit):
        tool(name).parse_args(['--help'])
    return capsys.readouterr().out


def test_paddleseg_train_flags_are_accepted_and_each_one_without_effect_is_named():
    parse = tool('train').parse_args
    assert flags_without_effect(parse(['--config', 'c.yml'])) == []
    assert flags_without_effect(parse(['--config', 'c.yml', '--data_format', 'NCHW', '--repeats', '1'])) == []
    notes = flags_without_effect(parse(['--config', 'c.yml', '--use_ema', '--profiler_options', 'batch_range=[10,20]',
                                        '--data_format', 'NHWC', '--repeats', '3']))
    assert [note.split(' ')[0] for note in notes] == ['--use_ema', '--profiler_options', '--data_format', '--repeats']
    assert notes[2].startswith('--data_format NHWC is not supported: ')
    assert all(re.match(r'--\w+ has no effect in this trainer: \w', note) for note in notes[:2] + notes[3:])


@pytest.mark.parametrize('name, flags', [
    ('train', ['--config', '--iters', '--batch_size', '--learning_rate', '--save_interval', '--resume_model',
               '--save_dir', '--keep_checkpoint_max', '--num_workers', '--do_eval', '--log_iters', '--use_vdl',
               '--use_ema', '--seed', '--precision', '--amp_level', '--profiler_options', '--data_format',
               '--device', '--repeats', '--opts', '--verbose', '--log_attention', '--save_safetensors',
               '--new_run']),
    ('val', ['--device', '--precision', '--verbose']),
    ('predict', ['--device', '--verbose', '--is_slide', '--crop_size', '--stride', '--slide_batch']),
    ('infer', ['--backend', '--precision', '--is_slide', '--crop_size', '--stride', '--slide_batch', '--aug_eval']),
    ('export', ['--verbose', '--legacy_program', '--miou_images']),
    ('visualize', ['--config', '--model_path', '--image_path', '--save_dir', '--top', '--device', '--verbose']),
])
def test_every_flag_has_help(name, flags, capsys):
    text = help_text(name, capsys)
    for flag in flags:
        # The flag, its value's name or choices, then words of help (not the next flag).
        assert re.search(rf'^  {flag}( [A-Z_]+| \{{[\w,]+\}})?\s+[a-zA-Z"\']', text, re.M), flag


def test_only_errors_a_user_can_fix_lose_their_traceback(capsys, monkeypatch):
    from cli import run_cli
    from emanet.config import ConfigError
    monkeypatch.delenv('EMANET_DEBUG', raising=False)

    def fails_with(error):
        def main(args):
            raise error
        return main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails_with(ConfigError("c.yml: unknown key 'iter'")), None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: c.yml: unknown key 'iter'\n"
    with pytest.raises(SystemExit):  # a full disk is the user's to fix too
        run_cli(fails_with(OSError(28, 'No space left on device', 'out/iter_4.part/model.pdparams')), None)
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'out/iter_4.part/model.pdparams'\n"
    # A bug (here a RuntimeError from deep inside a library) keeps its traceback.
    with pytest.raises(RuntimeError, match='an internal invariant broke'):
        run_cli(fails_with(RuntimeError('an internal invariant broke')), None)
    with pytest.raises(ValueError, match='operands could not be broadcast'):
        run_cli(fails_with(ValueError('operands could not be broadcast together')), None)


@pytest.fixture(scope='module')
def tool_process():  # a tool's process: the tests using it are marked slow
    """What a fresh process that imports tools/cli.py as the tools do (started without MKL_DEBUG_CPU_TYPE)
    shows: MKL_DEBUG_CPU_TYPE after the import, then the stdout of a tool logging one line."""
    env = {key: value for key, value in os.environ.items() if key != device.MKL_CPU_TYPE_VARIABLE}
    probe = (f'import os, sys; sys.path.insert(0, {TOOLS!r}); import cli\n'
             "print('MKL_DEBUG_CPU_TYPE', os.environ.get('MKL_DEBUG_CPU_TYPE'), flush=True)\n"
             'from emanet.logger import logger\n'
             "cli.run_cli(lambda args: logger.info('[EVAL] #Images: 2 mIoU: 0.5000'), None)")
    stdout = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, env=env,
                            check=True).stdout
    before, _, tool_stdout = stdout.partition('\n')
    return {'mkl_cpu_type': before.split('MKL_DEBUG_CPU_TYPE ')[-1], 'stdout': tool_stdout}


@pytest.mark.slow
def test_the_tools_let_mkl_take_its_avx2_path_on_amd_cpus_with_avx2(tool_process):
    vendor, flags, _ = device.cpu_info()
    expected = '5' if vendor == 'AuthenticAMD' and 'avx2' in flags else 'None'
    assert tool_process['mkl_cpu_type'] == expected


@pytest.mark.slow
def test_the_tools_log_lines_go_to_stdout_once_in_paddlesegs_format(tool_process):
    stdout = tool_process['stdout']
    assert re.fullmatch(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[INFO\] \[EVAL\] #Images: 2 mIoU: 0\.5000\n', stdout), stdout


class RecordingGlibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


def test_the_tools_tune_the_allocator_on_cpu_and_the_librarys_set_device_does_not(monkeypatch):
    monkeypatch.setenv(device.ALLOCATOR_VARIABLE, '1')
    libc = RecordingGlibc()
    monkeypatch.setattr(device, '_glibc', lambda: libc)
    device.set_device('cpu')
    assert libc.calls == []
    cli.set_device('cpu')
    assert libc.calls == [(device.M_MMAP_THRESHOLD, 1 << 30), (device.M_TRIM_THRESHOLD, (1 << 31) - 1)]


def test_a_configs_test_config_is_left_out_with_a_warning_for_an_export_without_logits(tmp_path, log_lines):
    from emanet.deploy.static_graph import write_deploy_config
    from emanet.test_time import InferenceOptions
    flip = InferenceOptions(aug_eval=True, flip_horizontal=True)
    (tmp_path / 'model.json').write_text('{}')
    write_deploy_config(str(tmp_path), {'format': 'paddle', 'model': 'model.json', 'transforms': [],
                                        'output_op': 'argmax'})
    assert cli.options_for_export(str(tmp_path), flip) == InferenceOptions()
    assert any('not applied' in line and '--output_op none' in line for line in log_lines)
    assert cli.options_for_export(str(tmp_path), flip, given=['--flip_horizontal']) == flip  # refused when loaded
    write_deploy_config(str(tmp_path), {'format': 'paddle', 'model': 'model.json', 'transforms': [],
                                        'output_op': 'none'})
    assert cli.options_for_export(str(tmp_path), flip) == flip
