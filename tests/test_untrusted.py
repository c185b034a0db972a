"""Bytes this package did not write come in through one door: the readers of emanet/untrusted.py (text),
emanet/safe_pickle.py and emanet/checkpoint.py (weights), emanet/download.py (URLs and archives), each
with its budgets, each ending in success or one UserError."""
import ast
from pathlib import Path

import pytest

from emanet.errors import InvalidInput
from emanet.untrusted import MAX_TEXT_DEPTH, MAX_TEXT_VALUES, UnreadableFile, load_json, load_mapping, load_yaml

ROOT = Path(__file__).resolve().parents[1]
# The modules behind the door, and the parsers only they may call.
DOOR = {'emanet/untrusted.py': {'yaml.safe_load', 'json.loads'},
        'emanet/safe_pickle.py': set(),
        'emanet/checkpoint.py': {'safetensors.safe_open', 'json.loads'},  # the safetensors header, bounded there
        'emanet/download.py': {'tarfile.open', 'zipfile.ZipFile'}}
PARSERS = {'paddle.load', 'pickle.load', 'pickle.loads', 'yaml.load', 'yaml.safe_load', 'yaml.full_load',
           'yaml.unsafe_load', 'json.load', 'json.loads', 'tarfile.open', 'zipfile.ZipFile', 'safetensors.safe_open',
           'np.load', 'numpy.load', 'load_entire_model', 'load_pretrained_model'}


def _calls(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
                yield node.lineno, f'{function.value.id}.{function.attr}'
            elif isinstance(function, ast.Name):
                yield node.lineno, function.id


def test_no_module_outside_the_door_calls_a_parser_of_files():
    outside = []
    for path in sorted((ROOT / 'emanet').rglob('*.py')) + sorted((ROOT / 'tools').glob('*.py')):
        allowed = DOOR.get(str(path.relative_to(ROOT)), set())
        outside += [f"{path.relative_to(ROOT)}:{line} {name}" for line, name in _calls(path)
                    if name in PARSERS and name not in allowed]
    assert outside == []


def test_a_file_over_the_size_budget_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / 'big.yml'
    path.write_text('a: 1\n' * 100)
    with pytest.raises(UnreadableFile, match=r'big\.yml: larger than 64 bytes, too large for a config'):
        load_yaml(path, 'a config', max_bytes=64)


def test_text_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / 'latin.yml'
    path.write_bytes('model: caf\xe9\n'.encode('latin-1'))
    with pytest.raises(UnreadableFile, match=r'latin\.yml: not UTF-8 text, so not a config'):
        load_yaml(path, 'a config')


def test_aliases_expanding_past_the_budget_are_refused(tmp_path):
    path = tmp_path / 'laughs.yml'
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]']
    lines += [f'a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, '
              f'*a{i - 1}, *a{i - 1}, *a{i - 1}]' for i in range(1, 9)]
    path.write_text('\n'.join(lines))
    with pytest.raises(UnreadableFile, match=rf'expand to more than {MAX_TEXT_VALUES} values'):
        load_yaml(path, 'a config')


@pytest.mark.parametrize('loader, text', [(load_json, '[' * 150 + ']' * 150), (load_yaml, '[' * 150 + ']' * 150)])
def test_nesting_past_the_budget_is_refused(tmp_path, loader, text):
    path = tmp_path / 'deep.txt'
    path.write_text(text)
    with pytest.raises(UnreadableFile, match=rf'deep\.txt: nested more than {MAX_TEXT_DEPTH} levels'):
        loader(path, 'a file')


@pytest.mark.parametrize('loader, text, reason', [
    (load_json, '{"iter": 4,', r'not valid JSON for a state \(Expecting property name'),
    (load_json, '1' * 5000, r'not valid JSON for a state \(Exceeds the limit'),
    (load_yaml, 'a: [1, 2', r'not valid YAML for a state \(while parsing a flow sequence'),
])
def test_text_that_does_not_parse_is_named_in_one_line(tmp_path, loader, text, reason):
    path = tmp_path / 'state.txt'
    path.write_text(text)
    with pytest.raises(UnreadableFile, match=rf'state\.txt: {reason}') as refused:
        loader(path, 'a state')
    assert '\n' not in str(refused.value)


def test_a_mapping_is_asked_for_by_name(tmp_path):
    path = tmp_path / 'list.yml'
    path.write_text('- a\n- b\n')
    with pytest.raises(UnreadableFile, match=r'list\.yml: a deploy config is a mapping of keys, this file holds a list'):
        load_mapping(path, 'a deploy config')
    (tmp_path / 'empty.yml').write_text('')
    assert load_mapping(tmp_path / 'empty.yml', 'a deploy config') == {}


def test_a_missing_file_and_a_folder_are_named(tmp_path):
    with pytest.raises(UnreadableFile, match=r'a config not found: .*nope\.yml'):
        load_yaml(tmp_path / 'nope.yml', 'a config')
    with pytest.raises(UnreadableFile, match=r': a folder, not a config'):
        load_yaml(tmp_path, 'a config')


@pytest.mark.parametrize('text', ['soon', '-5', '0', 'nan', 'inf', '1²'])
def test_a_budget_set_to_something_other_than_a_positive_number_is_named(monkeypatch, text):
    from emanet.download import deadline_seconds
    monkeypatch.setenv('EMANET_DOWNLOAD_DEADLINE', text)
    with pytest.raises(InvalidInput, match=rf"^EMANET_DOWNLOAD_DEADLINE must be a positive number, got '{text}'$"):
        deadline_seconds()


def test_a_budget_set_to_a_number_is_taken(monkeypatch):
    from emanet.download import max_download_bytes
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', '1000')
    assert max_download_bytes() == 1000


def test_a_user_error_is_one_line_whatever_name_it_quotes():
    """Names come from hostile files (archive members, _base_ files, keys): their line breaks and terminal
    control characters are shown escaped, so the tools' `error:` line stays one line."""
    assert str(InvalidInput("refusing archive member 'a\nb\x1b[2J' (a link)")) == \
        "refusing archive member 'a\\nb\\x1b[2J' (a link)"
    assert str(InvalidInput('café 名')) == 'café 名'
