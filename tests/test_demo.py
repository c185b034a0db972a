"""The demo page (emanet.demo, tools/demo.py): what it shows for an image equals what tools/predict.py writes, the
EM unit's attention beside it, and a bad upload is one sentence on the page; driven in a real browser too."""
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import cv2
import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import TOOLS, street_scenes_config
from emanet.config import load_config
from emanet.engine.predict import color_map

gradio_missing = None
try:
    import gradio  # noqa: F401
except ImportError:
    gradio_missing = "Gradio 6 is not installed (pip install -r requirements-demo.txt; Python 3.10 or later)"
needs_gradio = pytest.mark.skipif(gradio_missing is not None, reason=gradio_missing or '')


@pytest.fixture(scope='module')
def scenes_config(tmp_path_factory):
    """A small street-scenes config (19 Cityscapes classes) and a val image of it."""
    folder = tmp_path_factory.mktemp('demo_config')
    config = street_scenes_config(folder / 'config.yml', folder / 'scenes', iters=1, num_val=2, size=(96, 48))
    cfg = load_config(str(config), training=False)
    from emanet.config import Builder
    return str(config), Builder(cfg).val_dataset.file_list[0][0]


@pytest.fixture(scope='module')
def weights(scenes_config, tmp_path_factory):
    from emanet.checkpoint import save_state
    from emanet.config import build_model
    paddle.seed(3)
    path = tmp_path_factory.mktemp('demo_weights') / 'model.pdparams'
    save_state(build_model(load_config(scenes_config[0], training=False)).state_dict(), str(path))
    return str(path)


def demo_of(config, weights, **kwargs):
    from emanet.demo import Demo, model_from_config
    return Demo(model_from_config(load_config(config, training=False), weights), **kwargs)


def predicted_labels(config, weights, image, tmp_path, *flags):
    """The label PNG tools/predict.py writes for ``image``, as class indices."""
    from conftest import run_tool_in_process
    run_tool_in_process('predict.py', '--config', config, '--model_path', weights, '--image_path', image,
                        '--save_dir', tmp_path / 'predicted', *flags)
    name = os.path.splitext(os.path.basename(image))[0] + '.png'
    return np.array(Image.open(tmp_path / 'predicted' / 'pseudo_color_prediction' / name))


def truncated_copy(image, folder):
    data = open(image, 'rb').read()
    path = os.path.join(folder, 'truncated.png')
    with open(path, 'wb') as f:
        f.write(data[:len(data) * 2 // 3])
    return path


@pytest.mark.slow
def test_importing_the_demo_imports_no_gradio():
    code = 'import sys, emanet.demo; print("gradio" in sys.modules)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == 'False', result.stderr[-2000:]


def test_without_gradio_the_tool_names_the_extra(monkeypatch):
    from emanet.demo import require_gradio
    from emanet.errors import Unsupported
    monkeypatch.setitem(sys.modules, 'gradio', None)  # what an environment without it gives
    with pytest.raises(Unsupported, match=r"^the demo page needs Gradio 6 \(Python 3\.10 or later\): "
                                          r"pip install 'emanet-paddle\[demo\]'$"):
        require_gradio()


def test_the_page_shows_what_predict_writes_with_the_attention_and_the_legend(scenes_config, weights, tmp_path):
    config, image = scenes_config
    demo = demo_of(config, weights)
    result = demo.run(image, flip=True)
    expected = predicted_labels(config, weights, image, tmp_path, '--aug_eval', '--flip_horizontal')
    np.testing.assert_array_equal(np.array(Image.open(result.label_file)), expected)
    assert Image.open(result.label_file).getpalette()[:6] == [128, 64, 128, 244, 35, 232]  # Cityscapes' colours
    bgr = cv2.imread(image)
    shown_expected = cv2.addWeighted(bgr, 0.6, np.asarray(color_map(demo.model.palette), np.uint8).reshape(-1, 3)[
        :, ::-1][expected], 0.4, 0)[:, :, ::-1]
    np.testing.assert_array_equal(result.overlay, shown_expected)
    assert result.attention.shape[2] == 3 and result.attention.shape[0] > bgr.shape[0]  # a grid of maps
    assert result.status.startswith(f'Paddle {paddle.__version__} dygraph with flip: ')
    assert ' s for 96x48 pixels; attention maps ' in result.status
    top_class = np.bincount(expected.reshape(-1)).argmax()
    assert f'data-class="{top_class}"' in result.legend.split('</li>')[0]
    assert demo.model.class_names[top_class] in result.legend
    demo.close()


def text_file_named_png(image, folder):
    path = os.path.join(folder, 'notes.png')
    with open(path, 'w') as f:
        f.write('hello')
    return path


@pytest.mark.parametrize('make, max_pixels, expected', [
    (truncated_copy, 10 ** 6, r'^truncated\.png: the file is cut short or damaged \(.*\)$'),
    (lambda image, folder: shutil.copy(image, os.path.join(folder, 'scene.png')), 1000,
     r"^scene\.png: declares 96x48 pixels, more than the 1,000 allowed \(--max_upload_pixels\); not decoded$"),
    (text_file_named_png, 10 ** 6, r'^notes\.png: cannot be opened as an image'),
])
def test_a_bad_upload_is_one_sentence_naming_the_file(scenes_config, weights, tmp_path, make, max_pixels, expected):
    demo = demo_of(scenes_config[0], weights, max_pixels=max_pixels)
    result = demo.run(make(scenes_config[1], str(tmp_path)))
    assert result.overlay is None and result.label_file is None
    assert '\n' not in result.status and 'Traceback' not in result.status
    assert re.match(expected, result.status), result.status
    demo.close()


def test_an_upload_over_the_byte_limit_is_refused_before_it_is_read(scenes_config, weights):
    demo = demo_of(scenes_config[0], weights, max_bytes=100)
    size = os.path.getsize(scenes_config[1])
    assert demo.run(scenes_config[1]).status == (
        f"{os.path.basename(scenes_config[1])}: {size / 2 ** 20:.1f} MB, more than the 0 MB this page accepts")
    demo.close()


@pytest.mark.slow
def test_an_exported_model_runs_without_attention_and_says_so(scenes_config, weights, tmp_path):
    from emanet.demo import NO_ATTENTION, Demo, model_from_export
    config, image = scenes_config
    subprocess.run([sys.executable, os.path.join(TOOLS, 'export.py'), '--config', config, '--model_path', weights,
                    '--save_dir', tmp_path / 'export', '--check_images', '1'], check=True, capture_output=True,
                   timeout=300)
    demo = Demo(model_from_export(str(tmp_path / 'export'), window=((64, 32), (32, 16))))
    result = demo.run(image, sliding_window=True)
    expected = predicted_labels(config, weights, image, tmp_path, '--is_slide', '--crop_size', 64, 32,
                                '--stride', 32, 16)
    np.testing.assert_array_equal(np.array(Image.open(result.label_file)), expected)
    assert result.attention is None and demo.model.attention is None
    assert result.status.startswith('Paddle Inference (paddle export) with sliding window 64x32: ')
    assert demo.model.class_names[:3] == ['road', 'sidewalk', 'building']  # from the export's deploy.yaml
    assert 'not available for an exported model' in NO_ATTENTION
    demo.close()


def chromium_missing():
    if gradio_missing:
        return gradio_missing
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python client is not installed (pip install -r requirements-demo.txt)"
    if not shutil.which('chromium'):
        return "Chromium is not installed (apt-get install chromium; .ci/run does it where apt works)"
    return None


def drive_page(url, image, broken, screenshot):
    """Open the page in headless Chromium, upload ``image`` and wait for its result, save a screenshot, then
    upload ``broken``; returns (label PNG bytes, attention picture's natural width, the status after ``broken``)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which('chromium'), headless=True)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(url, wait_until='networkidle')
            page.set_input_files('#upload input[type=file]', image)
            page.wait_for_function("document.querySelector('#status').innerText.includes(' s for ')",
                                   timeout=60000)
            page.wait_for_selector('#labels a[href]', timeout=30000)
            page.wait_for_function("[...document.querySelectorAll('#attention img')].some(i => i.naturalWidth > 0)",
                                   timeout=30000)
            href = page.get_attribute('#labels a[href]', 'href')
            with urllib.request.urlopen(urllib.parse.urljoin(url, href), timeout=30) as response:
                labels = response.read()
            attention_width = page.evaluate(
                "Math.max(...[...document.querySelectorAll('#attention img')].map(i => i.naturalWidth))")
            page.screenshot(path=screenshot, full_page=True)
            page.locator('#upload button[aria-label="Clear"]').first.click()
            page.set_input_files('#upload input[type=file]', broken)
            page.wait_for_function("document.querySelector('#status').innerText.includes('cut short')",
                                   timeout=30000)
            status = page.inner_text('#status')
        finally:
            browser.close()
    return labels, attention_width, status


@pytest.mark.slow
@pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or '')
def test_in_a_browser_the_page_shows_the_mask_predict_writes_and_a_bad_file_as_one_sentence(
        scenes_config, weights, tmp_path):
    from emanet.demo import build_demo, example_images, launch
    config, image = scenes_config
    demo = demo_of(config, weights)
    page = build_demo(demo, example_images(str(tmp_path / 'examples'), count=2, size=(128, 64)))
    port = free_port()
    start = time.perf_counter()
    _, url, _ = launch(page, demo, port=port, examples_dir=str(tmp_path / 'examples'), block=False)
    try:
        assert url.startswith(f'http://127.0.0.1:{port}')
        labels, attention_width, status = drive_page(url, image, truncated_copy(image, str(tmp_path)),
                                                     str(tmp_path / 'demo.png'))
    finally:
        page.close()
        demo.close()
    expected = predicted_labels(config, weights, image, tmp_path)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(labels))), expected)
    assert attention_width > 96
    assert status.strip().startswith('truncated.png: the file is cut short or damaged (')
    assert 'Traceback' not in status and len(status.strip().splitlines()) == 1
    assert os.path.getsize(tmp_path / 'demo.png') > 10000
    assert time.perf_counter() - start < 60


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_weights_without_a_config_are_one_sentence(weights):
    from conftest import run_tool_in_process
    from emanet.errors import InvalidInput
    with pytest.raises(InvalidInput, match=rf"^--model_path {re.escape(weights)} is weights: give the --config they "
                                           r"were trained with$"):
        run_tool_in_process('demo.py', '--model_path', weights)


@pytest.mark.slow
@needs_gradio
def test_the_tool_serves_the_page_on_the_loopback(scenes_config, weights, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(TOOLS, 'demo.py'), '--config', scenes_config[0],
                               '--model_path', weights, '--port', str(port), '--examples', '1'],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=dict(os.environ, PYTHONUNBUFFERED='1'))
    lines = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(f'Demo page on http://127.0.0.1:{port}' in line for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, ''.join(lines)[-3000:]
            time.sleep(0.2)
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=10) as response:
            assert response.status == 200 and b'EMANet demo' in response.read()
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl+C
        server.wait(timeout=30)
    output = ''.join(lines)
    assert f'Demo page on http://127.0.0.1:{port}' in output
    assert server.returncode == 0, output[-3000:]
