"""tools/infer.py --ray on a real Ray cluster of two nodes (one CPU each, on 127.0.0.1): the files tools/infer.py
writes, byte for byte; every image written once, whole, when a node dies mid-run; a rerun that writes only what is
missing; a file that is no image listed by name while the others go on, or stopping the run with --fail_fast."""
import os
import shutil
import sys
import tempfile
import threading

import cv2
import numpy as np
import pytest

pytest.importorskip('ray', reason="Ray has no wheel for this Python (none for 3.9)")

from conftest import run_tool_in_process  # noqa: E402
from perf.cluster import WAIT_SECONDS, LocalCluster, wait_for  # noqa: E402  (tools/perf/)
from deploy.test_export import TRANSFORMS, tiny_emanet  # noqa: E402
from emanet.deploy.export import export_checked, preprocessed_images  # noqa: E402
from emanet.errors import InvalidInput, Unsupported  # noqa: E402
from emanet.integrations import ray as emanet_ray  # noqa: E402
from emanet.test_time import InferenceOptions  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster of two nodes, and an export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLIDE_FLAGS = ('--is_slide', '--crop_size', 48, 40, '--stride', 32, 24)
SLIDE = InferenceOptions(is_slide=True, crop_size=(48, 40), stride=(32, 24))
NUM_IMAGES = 16


@pytest.fixture(scope='module')
def cluster():
    """A head node and a second node, one CPU each; every node killed at the end, whatever happened."""
    # A short folder of its own: Ray's socket paths under it must stay within the 107 bytes a Unix socket allows.
    temp_dir = tempfile.mkdtemp(prefix='ray')
    running = LocalCluster(temp_dir, pythonpath=REPO)  # the workers import this checkout's emanet
    try:
        running.add_node()
        running.add_node()
        yield running
    finally:
        running.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('export'))
    rng = np.random.RandomState(0)
    check_images = [rng.randint(0, 256, (64, 96, 3)).astype(np.uint8) for _ in range(2)]
    export_checked(tiny_emanet(), folder, TRANSFORMS, preprocessed_images(check_images, TRANSFORMS))
    return folder


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A folder of images of different sizes, two of them in a subfolder, and a list file naming them all."""
    folder = tmp_path_factory.mktemp('images')
    (folder / 'city').mkdir()
    rng = np.random.RandomState(3)
    names = [f'city/image_{index:02d}' if index < 2 else f'image_{index:02d}' for index in range(NUM_IMAGES)]
    for index, name in enumerate(names):
        size = (160 + 8 * index, 192)
        cv2.imwrite(str(folder / f'{name}.png'), rng.randint(0, 256, size + (3,)).astype(np.uint8))
    (folder / 'list.txt').write_text(''.join(f'{name}.png\n' for name in names))
    return folder


@pytest.fixture(scope='module')
def reference(export, images, tmp_path_factory):
    """What tools/infer.py writes for the images, {relative path: bytes}."""
    save_dir = tmp_path_factory.mktemp('reference')
    run_tool_in_process('infer.py', '--config', export, '--image_path', images, '--save_dir', save_dir, *SLIDE_FLAGS)
    return written_files(save_dir)


def written_files(save_dir):
    return {os.path.relpath(os.path.join(folder, name), save_dir): open(os.path.join(folder, name), 'rb').read()
            for folder, _, names in os.walk(save_dir) for name in names}


def test_a_two_node_run_writes_the_files_of_infer_py_byte_for_byte(cluster, export, images, reference, tmp_path):
    log = run_tool_in_process('infer.py', '--config', export, '--image_path', images / 'list.txt', '--save_dir',
                              tmp_path / 'out', '--ray', cluster.address, *SLIDE_FLAGS)
    assert len(reference) == 2 * NUM_IMAGES
    assert written_files(tmp_path / 'out') == reference  # same names, same masks and overlays, no temporary file
    final = [line for line in log.splitlines() if '[RAY] Predicted' in line]
    assert final and f'Predicted {NUM_IMAGES} images' in final[0] and 'with 2 actors on 2 nodes' in final[0], log
    assert f"/{cluster.node_ids[1][:8]}: " in final[0]


def test_a_rerun_after_an_interrupted_run_writes_only_the_missing_images_and_lists_a_bad_file(
        cluster, export, images, reference, tmp_path):
    folder = tmp_path / 'images'
    shutil.copytree(images, folder)
    (folder / 'a_broken.png').write_bytes(b'not an image')  # listed first, so --fail_fast stops the run early
    save_dir = tmp_path / 'out'
    with pytest.raises(InvalidInput, match='a_broken.png: .*fail_fast'):
        run_tool_in_process('infer.py', '--config', export, '--image_path', f'file://{folder}', '--save_dir',
                            save_dir, '--ray', cluster.address, '--fail_fast', *SLIDE_FLAGS)
    first_run = {path: os.stat(save_dir / path).st_mtime_ns for path in written_files(save_dir)}
    assert not any(path.endswith('.tmp') for path in first_run)

    report = emanet_ray.infer_on_ray(export, f'file://{folder}', str(save_dir), address=cluster.address,
                                     options=SLIDE)
    assert report.failed == [(f'file://{folder}/a_broken.png', 'InvalidInput: not an image OpenCV can decode')]
    assert written_files(save_dir) == reference
    rewritten = [path for path, mtime in first_run.items() if os.stat(save_dir / path).st_mtime_ns != mtime]
    assert rewritten == []
    complete_before = [path for path in first_run if path.startswith('pseudo_color_prediction')
                       and os.path.join('added_prediction', path.split(os.sep, 1)[1][:-len('png')] + 'jpg') in first_run]
    assert report.skipped == len(complete_before) < NUM_IMAGES
    assert report.done == NUM_IMAGES - len(complete_before)


def test_killing_the_second_node_mid_run_still_writes_every_image_once(cluster, export, images, reference, tmp_path,
                                                                       log_lines):
    outcome = {}

    def run():
        try:
            outcome['report'] = emanet_ray.infer_on_ray(export, str(images), str(tmp_path / 'out'),
                                                        address=cluster.address, options=SLIDE,
                                                        progress_seconds=0.1)
        except Exception as error:  # handed to the test's thread
            outcome['error'] = error

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    second_node = f"/{cluster.node_ids[1][:8]}: "
    wait_for(lambda: any(second_node in line for line in log_lines) or not runner.is_alive(),
              'the second node to label an image')
    assert runner.is_alive(), outcome  # the run was still going when the node died
    cluster.kill_node(1)
    runner.join(timeout=2 * WAIT_SECONDS)
    assert not runner.is_alive(), 'the run did not end after the second node died'
    assert 'error' not in outcome, outcome['error']
    report = outcome['report']
    assert report.rounds >= 2  # the lost node ended a round, and the missing images ran again
    assert report.done == NUM_IMAGES and report.failed == []
    assert written_files(tmp_path / 'out') == reference  # each file once, whole; no temporary file left


def test_without_ray_one_sentence_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'ray', None)
    with pytest.raises(Unsupported, match=r"pip install 'emanet-paddle\[ray\]'"):
        emanet_ray.require_ray()


def test_only_this_runs_temporary_files_of_its_own_images_are_deleted(tmp_path):
    masks = tmp_path / 'pseudo_color_prediction'
    masks.mkdir()
    files = {'left by this run': 'a.png.raytag-0123abcd.tmp', 'another run': 'a.png.rayother-0123abcd.tmp',
             'an image of another run': 'z.png.raytag-0123abcd.tmp', 'a result': 'a.png',
             "the user's": 'a.png.raytag-notes.tmp'}
    for name in files.values():
        (masks / name).write_bytes(b'x')
    emanet_ray._remove_temporary_files(str(tmp_path), ['a', 'b'], 'raytag')
    assert sorted(os.listdir(masks)) == sorted(name for kind, name in files.items() if kind != 'left by this run')
