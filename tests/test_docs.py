"""The README and the pages of docs/ cannot drift from the code: every command, Python and YAML block a user
would run is run here on tiny data, or says why not, and the site builds with no broken link.

The line before each fenced block of the Markdown source is an HTML comment (invisible on GitHub and on the
site): `<!-- checked: tests/test_docs.py -->` or `<!-- not checked: <why> -->`. The checked blocks run in the
order a reader meets them (the README, then the pages in the order of mkdocs.yml's menu), in one scratch
folder holding `tools/` and `configs/` as a clone does; `SUBSTITUTIONS` turns the real data into tiny data.
Shell variables set by a page's earlier block (`M=...`) stay set for its later blocks, as in a reader's shell.
"""
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import paddle
import pytest
import yaml

from conftest import ONNX_EXPORT_MISSING, OPENVINO_MISSING
from emanet.config import build_model, load_config
from emanet.data.scene_painter import make_street_scenes

ROOT = Path(__file__).resolve().parents[1]
R101_URL = ('https://bj.bcebos.com/paddleseg/dygraph/cityscapes/emanet_resnet101_os8_cityscapes_1024x512_80k/'
            'model.pdparams')
INSTALL = ('python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt -e . && '
           'pip install --no-deps -r requirements-paddleseg.txt && ')


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


# What a block names -> what the test runs instead, and why. Applied in this order to every checked block.
SUBSTITUTIONS = [
    # the test runs inside the environment these installs built (test_ci_installs_what_the_docs_install)
    (INSTALL, ''),
    # the quick start with 2 iterations on 4 drawn scenes of 128x64 (configs/tiny_quickstart.yml below)
    ('configs/quickstart.yml', 'configs/tiny_quickstart.yml'),
    # the published R101 model, without the ImageNet download, 2 iterations on drawn scenes in data/cityscapes
    ('configs/emanet_r101_cityscapes.yml', 'configs/tiny_r101_cityscapes.yml'),
    # the released weights: a checkpoint of the same model with random weights (no download in a test)
    (R101_URL, 'r101_random.pdparams'),
    ('pretrained=True', 'pretrained=False'),
    # no GPU here: the launcher starts one CPU process, the tools run on CPU
    ('--gpus 0,1,2,3 ', ''),
    (' --device gpu', ''),
    # the tiny images are smaller than Cityscapes windows
    ('--crop_size 1024 512 --stride 768 384', '--crop_size 64 64 --stride 48 48'),
    ('--crop_size 1024 512 --stride 1024 512', '--crop_size 128 64 --stride 128 64'),
    # the benchmark on ResNet18_vd at toy sizes, its quick-start row on the tiny quick start
    ('python tools/benchmark.py', 'python tools/benchmark.py --backbone ResNet18_vd --input_size 128 64 '
     '--train_size 64 32 --attention_size 32 16 --warmup 0 --threads 2 --folder_images 2 --folder_size 96 64 '
     '--large_sizes 256 --quickstart_config configs/tiny_quickstart.yml'),
    ('--large_sizes 4096 16384', '--large_sizes 256'),
    # tiny inputs for the model in Python
    ('[1, 3, 512, 1024]', '[1, 3, 64, 128]'),
    ('[2, 3, 512, 512]', '[2, 3, 64, 64]'),
]
# Files the blocks name that a reader brings: huge.png, folder_of_images/, image.png (made by `workspace`).

TINY_QUICKSTART = '''_base_: quickstart.yml
batch_size: 2
iters: 2
train_dataset: {num_train: 4, num_val: 2, size: [128, 64]}
val_dataset: {num_train: 4, num_val: 2, size: [128, 64]}
'''
TINY_R101 = '''_base_: emanet_r101_cityscapes.yml
batch_size: 1
iters: 2
model: {backbone: {pretrained: null}}
train_dataset:
  transforms:
    - {type: RandomPaddingCrop, crop_size: [64, 32]}
    - {type: Normalize}
'''

FENCE = re.compile(r'^(```+)(\S*)\s*$')  # a longer fence quotes blocks inside it
MARK = re.compile(r'^<!-- (checked|not checked): (.+) -->$')
# Languages of blocks a user runs or writes; `text` is output or a tree of files.
RUNNABLE = {'bash', 'sh', 'shell', 'console', 'python', 'yaml'}
ASSIGNMENTS = re.compile(r'^[A-Z_]+=\S+(?: [A-Z_]+=\S+)*$')


def pages():
    nav = yaml.safe_load((ROOT / 'mkdocs.yml').read_text())['nav']
    return ['README.md'] + [f'docs/{page}' for entry in nav for page in entry.values()]


def blocks(page):
    """(line, language, mark, reason, code) of every fenced block of the page; mark is None when unmarked."""
    lines = (ROOT / page).read_text().split('\n')
    found, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].rstrip() == fence.group(1))
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), '')
        mark = MARK.match(before)
        found.append((index + 1, fence.group(2), mark and mark.group(1), mark and mark.group(2),
                      '\n'.join(lines[index + 1:end]) + '\n'))
        index = end + 1
    return found


def all_blocks():
    return [(page, *block) for page in pages() for block in blocks(page)]


def checked_blocks():
    return [pytest.param(page, line, language, code, id=f'{page}:{line}')
            for page, line, language, mark, _, code in all_blocks() if mark == 'checked']


def test_every_block_is_marked_checked_or_not_checked_with_a_reason():
    found = all_blocks()
    assert not [f'{page}:{line}' for page, line, language, *_ in found if not language]  # say what a block is
    unmarked = [f'{page}:{line}' for page, line, language, mark, *_ in found if language in RUNNABLE and not mark]
    assert unmarked == []
    reasons = [reason for *_, mark, reason, _ in found if mark == 'not checked']
    assert all(len(reason.split()) >= 4 for reason in reasons)


def test_every_page_of_docs_is_in_the_menu():
    assert sorted(f'docs/{path.name}' for path in (ROOT / 'docs').glob('*.md')) == sorted(pages()[1:])


def requirement_files(command):
    return sorted(re.findall(r'-r (\S+)', command)) + (['-e .'] if ' -e .' in command else [])


def test_ci_installs_what_the_docs_install():
    """The quick start's and the tests' install lines are the ones .ci/run installs before the suite."""
    readme = (ROOT / 'README.md').read_text()
    tests_command = next(code for *_, code in blocks('README.md') if code.endswith('python -m pytest -q\n'))
    ci = (ROOT / '.ci' / 'run').read_text()
    ci_installs = [line for line in ci.split('\n') if line.strip().startswith('pip install')]
    documented = [part for part in tests_command.split(' && ') if part.startswith('pip install')]
    assert [requirement_files(part) for part in documented] == [
        [name for name in requirement_files(line) if name != 'requirements-docs.txt'] for line in ci_installs]
    assert [('--no-deps' in part) for part in documented] == [('--no-deps' in line) for line in ci_installs]
    assert INSTALL in readme and 'python -m pytest -q' in ci


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A scratch folder laid out as a clone (tools/, configs/) with the tiny data the substitutions name."""
    work = tmp_path_factory.mktemp('docs')
    (work / 'tools').symlink_to(ROOT / 'tools')
    shutil.copytree(ROOT / 'configs', work / 'configs')
    (work / 'configs' / 'tiny_quickstart.yml').write_text(TINY_QUICKSTART)
    (work / 'configs' / 'tiny_r101_cityscapes.yml').write_text(TINY_R101)
    cityscapes = work / 'data' / 'cityscapes'
    make_street_scenes(str(cityscapes), num_train=2, num_val=2, size=(128, 64), workers=1)
    for folder in ('leftImg8bit', 'gtFine'):  # Cityscapes has a test split too: the val scenes stand in for it
        shutil.copytree(cityscapes / folder / 'val', cityscapes / folder / 'test')
    paddle.seed(0)
    config = load_config(str(work / 'configs' / 'tiny_r101_cityscapes.yml'), training=False)
    paddle.save(build_model(config).state_dict(), str(work / 'r101_random.pdparams'))
    scene = next((work / 'data' / 'cityscapes' / 'leftImg8bit' / 'val').rglob('*.png'))
    import cv2
    image = cv2.imread(str(scene))
    cv2.imwrite(str(work / 'image.png'), image)
    cv2.imwrite(str(work / 'huge.png'), cv2.resize(image, (512, 256)))
    (work / 'folder_of_images').mkdir()
    for index, size in enumerate([(160, 96), (128, 64), (96, 64)]):
        cv2.imwrite(str(work / 'folder_of_images' / f'{index}.png'), cv2.resize(image, size))
    return {'path': work, 'variables': {}}


def skip_reason(code):
    """Why this block cannot run in this environment, or None."""
    if 'paddlex_pipeline' in code or 'import paddlex' in code:
        if importlib.util.find_spec('paddlex') is None:
            return 'PaddleX is not installed here; .ci/paddlex_check runs these blocks in its own environment'
    if re.search(r'onnx|openvino|output/int8', code):
        return ONNX_EXPORT_MISSING or OPENVINO_MISSING
    return None


def substituted(code):
    for real, tiny in SUBSTITUTIONS:
        code = code.replace(real, tiny)
    return code.replace('127.0.0.1:8090', f'127.0.0.1:{free_port()}')


@pytest.mark.slow
@pytest.mark.parametrize('page, line, language, code', checked_blocks())
def test_block(workspace, page, line, language, code):
    work = workspace['path']
    reason = skip_reason(code)
    if reason:
        pytest.skip(reason)
    code = substituted(code)
    if language == 'yaml':  # a config the reader writes: its first line names the file
        name = re.match(r'# (\S+\.yml):', code).group(1)
        (work / name).write_text(code)
        load_config(str(work / name))
        return
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    if language == 'python':
        script = work / 'block.py'
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        variables = workspace['variables'].setdefault(page, [])
        script = work / 'block.sh'
        script.write_text('set -euo pipefail\n' + ''.join(f'{v}\n' for v in variables) + code)
        variables += [text for text in code.split('\n') if ASSIGNMENTS.match(text)]
        command = ['bash', str(script)]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f'{page}:{line}\n{code}\n' + result.stdout[-3000:] + result.stderr[-3000:]


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec('mkdocs') is None:
        pytest.skip('mkdocs is not installed here: pip install -r requirements-docs.txt')
    result = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'site' / 'security' / 'index.html').is_file()
