"""tools/convert_weights.py: a .pdparams becomes a .safetensors file with the same keys and tensors;
a file it cannot convert ends in one line and leaves nothing behind."""
import importlib.util
import os
import pickle
import re

import paddle
import pytest
from paddleseg.models.backbones import ResNet18_vd

from cli import run_cli  # tools/cli.py
from conftest import TOOLS
from emanet.checkpoint import read_state
from emanet.models import EMANet


def convert_weights():
    """The module of tools/convert_weights.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location('tool_convert_weights', os.path.join(TOOLS, 'convert_weights.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tool, *argv):
    """The tool as a user runs it, in this process: exit code 0, or run_cli's exit code."""
    try:
        run_cli(tool.main, tool.parse_args([str(arg) for arg in argv]))
    except SystemExit as exit:
        return exit.code
    return 0


def test_the_command_line_writes_the_same_tensors_under_the_same_keys(tmp_path):
    paddle.seed(0)
    model = EMANet(3, ResNet18_vd(output_stride=8), ema_channels=32, gc_channels=16, num_bases=8)
    source, target = tmp_path / 'model.pdparams', tmp_path / 'model.safetensors'
    paddle.save(model.state_dict(), str(source))
    tool = convert_weights()
    tool.main(tool.parse_args(['--src', str(source), '--dst', str(target)]))
    original, converted = read_state(str(source)), read_state(str(target))
    assert sorted(converted) == sorted(original) == sorted(model.state_dict())
    for key, value in original.items():
        assert (converted[key].dtype, converted[key].shape) == (value.dtype, value.shape), key
        assert converted[key].tobytes() == value.tobytes(), key


class RunsCode:
    def __reduce__(self):
        return (eval, ('1 + 1',))


def test_a_pickle_that_would_run_code_ends_in_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / 'evil.pdparams'
    source.write_bytes(pickle.dumps({'w': RunsCode()}))
    assert run(convert_weights(), '--src', source, '--dst', tmp_path / 'evil.safetensors') == 2
    error = capsys.readouterr().err
    assert re.fullmatch(r"error: .*evil\.pdparams: refused, not a plain Paddle checkpoint "
                        r"\(it would call 'builtins\.eval'\)\n", error), error
    assert os.listdir(tmp_path) == ['evil.pdparams']


def test_a_destination_that_is_not_safetensors_ends_in_one_line(tmp_path, capsys):
    source = tmp_path / 'model.pdparams'
    paddle.save({'w': paddle.ones([2])}, str(source))
    assert run(convert_weights(), '--src', source, '--dst', tmp_path / 'model.pdparams.bak') == 2
    error = capsys.readouterr().err
    assert re.fullmatch(r"error: .*model\.pdparams\.bak: converted weights go to a file ending in "
                        r"\.safetensors\n", error), error
    assert os.listdir(tmp_path) == ['model.pdparams']


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        convert_weights().parse_args(['--help'])
    text = capsys.readouterr().out
    for flag in ('--src', '--dst'):
        assert re.search(rf'^  {flag} [A-Z_]+\s+[a-z]', text, re.M), flag
