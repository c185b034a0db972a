"""An exported folder's deploy.yaml may come from someone else: whatever it holds ends in the config or in
one sentence naming it and the key, before any runtime opens the model."""
import re

import pytest
import yaml

from emanet.deploy.static_graph import read_deploy_config
from emanet.errors import UserError
from emanet.segmenter import build_transforms

VALID = {'model': 'model.json', 'params': 'model.pdiparams', 'output_op': 'none', 'num_classes': 3,
         'input_shape': [None, 3, None, None], 'transforms': [{'type': 'Normalize'}]}


@pytest.fixture
def folder(tmp_path):
    for name in ('model.json', 'model.pdiparams'):
        (tmp_path / name).write_bytes(b'')
    return tmp_path


def refusal(folder, content):
    (folder / 'deploy.yaml').write_bytes(content)
    with pytest.raises(UserError) as refused:
        read_deploy_config(str(folder))
    assert '\n' not in str(refused.value)
    return str(refused.value)


def test_a_valid_deploy_config_reads(folder):
    (folder / 'deploy.yaml').write_text(yaml.safe_dump({'Deploy': VALID}))
    deploy = read_deploy_config(str(folder))
    assert (deploy['format'], deploy['model']) == ('paddle', str(folder / 'model.json'))


@pytest.mark.parametrize('content, message', [
    (b'- Deploy\n- model.json\n', r'deploy\.yaml: a deploy config is a mapping of keys, this file holds a list'),
    (b'Deploy: {model: [model.json\n', r'deploy\.yaml: not valid YAML for a deploy config \(while parsing'),
    ('Deploy: {model: mod\xe8le.json}\n'.encode('latin-1'), r'deploy\.yaml: not UTF-8 text, so not a deploy config'),
    (b'Deploy: !!python/object/apply:os.system [touch x]\n', r'deploy\.yaml: not valid YAML for a deploy config'),
])
def test_a_deploy_yaml_that_is_not_a_mapping_not_yaml_or_not_utf8_is_named(folder, content, message):
    assert re.search(message, refusal(folder, content))


@pytest.mark.parametrize('key, value, expected', [
    ('output_op', ['none'], "Deploy.output_op must be one of argmax, softmax, none, got ['none']"),
    ('format', 'tflite', "Deploy.format must be one of paddle, onnx, openvino, got 'tflite'"),
    ('transforms', 'Normalize', "Deploy.transforms must be a list of transforms, each a mapping with a 'type', "
                                "got 'Normalize'"),
    ('num_classes', True, "Deploy.num_classes must be a positive whole number, got True"),
    ('input_shape', [1, 3, 'h', 'w'], "Deploy.input_shape must be [N, 3, H, W], each a positive whole number, "
                                      "-1 or null, got [1, 3, 'h', 'w']"),
])
def test_a_value_of_the_wrong_kind_is_named_with_its_key(folder, key, value, expected):
    assert refusal(folder, yaml.safe_dump({'Deploy': dict(VALID, **{key: value})}).encode()).endswith(expected)


def test_a_missing_model_file_is_a_user_error_naming_it(folder):
    (folder / 'model.pdiparams').unlink()
    assert refusal(folder, yaml.safe_dump({'Deploy': VALID}).encode()).endswith(
        f"params file not found: {folder / 'model.pdiparams'}")


@pytest.mark.parametrize('transforms, expected', [
    ([{'type': 'Resize', 'target_sizes': [64, 32]}], "transform Resize: "),
    ([{'type': 7}], "unknown transform 7"),
])
def test_a_transform_that_cannot_be_built_is_named(transforms, expected):
    with pytest.raises(UserError, match=expected):
        build_transforms(transforms)
