"""The model card (README.md) of every export: what the model is, its classes and colours, the check against the
dygraph model, and command lines that run as written."""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml
from PIL import Image

from conftest import TOOLS, street_scenes_config
from emanet.config import Builder, build_model, load_config
from emanet.data.cityscapes import Cityscapes
from emanet.deploy.export import export_checked, preprocessed_images
from emanet.deploy.model_card import IMAGE_PLACEHOLDER, describe_model
from emanet.deploy.static_graph import read_deploy_config
from emanet.errors import InvalidInput


def fenced_blocks(card, language):
    return re.findall(rf'```{language}\n(.*?)```', card, re.S)


@pytest.mark.slow
def test_the_card_names_the_classes_gives_the_check_and_its_commands_run(tmp_path):
    config = street_scenes_config(tmp_path / 'config.yml', tmp_path / 'scenes', iters=1, num_val=2, size=(64, 32))
    cfg = load_config(str(config), training=False)
    paddle.seed(0)
    model = build_model(cfg)
    builder = Builder(cfg)
    image = builder.val_dataset.file_list[0][0]
    transforms = cfg.val_dataset_cfg['transforms']
    description = describe_model(model, cfg.dic['model'], builder.val_dataset_class,
                                 weights='model.pdparams', config=str(config))
    save_dir = tmp_path / 'inference'
    _, agreement, miou = export_checked(model, str(save_dir), transforms, preprocessed_images([image], transforms),
                                        description=description)
    card = (save_dir / 'README.md').read_text()

    assert card.startswith('# EMANet (ResNet18_vd) for Paddle Inference\n')
    assert 'ResNet18_vd backbone (output stride 8); EM attention unit of 8 bases, 3 EM iterations' in card
    assert f'| Agreement with the dygraph model | {agreement:.4%} of the pixel labels equal on 1 image' in card
    assert f'from `model.pdparams` with `{config}`.' in card
    assert miou is None and f'| mIoU | not measured by the export: `python tools/val.py --config {config} ' in card
    assert '| Precision | fp32 |' in card and '| Format | paddle (deploy.yaml, model.json, model.pdiparams) |' in card
    assert 'Normalize: (pixel / 255 - mean) / std, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]' in card
    for train_id, (name, (r, g, b)) in enumerate(zip(Cityscapes.CLASS_NAMES, Cityscapes.PALETTE)):
        assert f'| {train_id} | {name} | #{r:02x}{g:02x}{b:02x} ({r}, {g}, {b}) |' in card

    # The shell line runs as written, from a folder where tools/ is the repository's, on an image of the user's.
    os.symlink(TOOLS, tmp_path / 'tools')
    shell_line, = fenced_blocks(card, 'bash')
    command = shlex.split(shell_line.replace(IMAGE_PLACEHOLDER, image))
    assert command[:2] == ['python', 'tools/infer.py']
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    mask_path = tmp_path / 'output' / 'result' / 'pseudo_color_prediction' / (
        os.path.basename(image).rsplit('.', 1)[0] + '.png')
    mask = Image.open(mask_path)
    assert mask.getpalette()[:3 * 19] == [v for color in Cityscapes.PALETTE for v in color]  # the card's colours

    python_lines, = fenced_blocks(card, 'python')
    names = {}
    exec(python_lines.replace(IMAGE_PLACEHOLDER, image), names)
    np.testing.assert_array_equal(names['labels'], np.array(mask))

    # The card is part of the export: an export into the same folder replaces it.
    export_checked(model, str(save_dir), transforms, preprocessed_images([image], transforms), output_op='argmax')
    assert read_deploy_config(str(save_dir))['output_op'] == 'argmax'
    assert 'labels [N, H, W] int32' in (save_dir / 'README.md').read_text()


@pytest.mark.parametrize('key, value, expected', [
    ('class_names', ['road', 'sidewalk'], 'a list of 3 names, one per class'),
    ('palette', [[0, 0, 0], [1, 2, 3], [256, 0, 0]], 'a list of 3 colours'),
    ('palette', [[0, 0], [1, 2, 3], [4, 5, 6]], 'a list of 3 colours'),
])
def test_a_deploy_config_with_wrong_classes_is_one_sentence(tmp_path, key, value, expected):
    (tmp_path / 'model.json').write_text('{}')
    deploy = {'format': 'paddle', 'model': 'model.json', 'transforms': [{'type': 'Normalize'}], 'output_op': 'none',
              'num_classes': 3, key: value}
    (tmp_path / 'deploy.yaml').write_text(yaml.safe_dump({'Deploy': deploy}))
    with pytest.raises(InvalidInput, match=rf'Deploy\.{key} must be {expected}'):
        read_deploy_config(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize('export_format, rows', [
    ('onnx', ['| Format | onnx (deploy.yaml, model.onnx) |',
              '| Runtime | ONNX Runtime (CPU); OpenVINO reads it too (`--backend openvino`) |']),
    ('openvino', ['| Format | openvino (deploy.yaml, model.bin, model.xml) |', '| Runtime | OpenVINO (CPU) |']),
    ('paddlex', ['| Format | paddlex (deploy.yaml, inference.json, inference.pdiparams, inference.yml) |',
                 '| Runtime | Paddle Inference (CPU and GPU); PaddleX 3 as model `EMANet-R18` (see inference.yml) |',
                 '| Output | labels [N, H, W] int32']),
])
def test_every_format_has_its_card(tmp_path, export_format, rows):
    import conftest
    if export_format != 'paddlex' and conftest.ONNX_EXPORT_MISSING:
        pytest.skip(conftest.ONNX_EXPORT_MISSING)
    if export_format == 'openvino' and conftest.OPENVINO_MISSING:
        pytest.skip(conftest.OPENVINO_MISSING)
    from test_export import TRANSFORMS, tiny_emanet
    model = tiny_emanet()
    image = np.random.RandomState(0).randint(0, 256, (32, 48, 3)).astype(np.uint8)
    _, agreement, _ = export_checked(model, str(tmp_path / 'export'), TRANSFORMS,
                                     preprocessed_images([image], TRANSFORMS), export_format=export_format,
                                     paddlex_name='EMANet-R18' if export_format == 'paddlex' else None)
    card = (tmp_path / 'export' / 'README.md').read_text()
    for row in rows:
        assert row in card
    assert '| 4 | class 4 |' in card  # the model alone names no classes
    assert f'{agreement:.4%} of the pixel labels equal on 1 image' in card
