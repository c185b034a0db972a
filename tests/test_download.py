"""Downloads: once into the cache, atomically, unpacked when an archive, and a fast clear error offline."""
import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import time

import paddle
import pytest

from conftest import Handler
from emanet.download import DownloadError, cached_path, weights_path


def downloaded_files(folder):
    """Files under ``folder`` except the lock files that let one process download at a time."""
    return sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix != '.lock')


def pdparams_bytes(tmp_path):
    path = tmp_path / 'w.pdparams'
    paddle.save({'w': paddle.ones([2])}, str(path))
    return path.read_bytes()


def test_a_url_is_downloaded_once_into_the_cache(server, tmp_path):
    Handler.files['/zoo/model.pdparams'] = pdparams_bytes(tmp_path)
    first = cached_path(f'{server}/zoo/model.pdparams', cache_dir=str(tmp_path / 'cache'))
    second = cached_path(f'{server}/zoo/model.pdparams', cache_dir=str(tmp_path / 'cache'))
    assert first == second and open(first, 'rb').read() == Handler.files['/zoo/model.pdparams']
    assert Handler.hits == ['/zoo/model.pdparams']


def test_a_checksum_mismatch_keeps_nothing(server, tmp_path):
    Handler.files['/zoo/bad.pdparams'] = b'xyz'
    with pytest.raises(DownloadError, match='checksum mismatch'):
        cached_path(f'{server}/zoo/bad.pdparams', sha256='0' * 64, cache_dir=str(tmp_path))
    assert not downloaded_files(tmp_path)


def test_the_servers_md5_etag_is_verified(server, tmp_path):
    body = b'weights' * 100
    Handler.files['/zoo/ok.pdparams'] = Handler.files['/zoo/tampered.pdparams'] = body
    Handler.etags['/zoo/ok.pdparams'] = hashlib.md5(body).hexdigest()
    Handler.etags['/zoo/tampered.pdparams'] = hashlib.md5(b'other').hexdigest()
    assert open(cached_path(f'{server}/zoo/ok.pdparams', cache_dir=str(tmp_path)), 'rb').read() == body
    with pytest.raises(DownloadError, match=r'tampered\.pdparams: checksum mismatch \(MD5 [0-9a-f]{32}, the server says'):
        cached_path(f'{server}/zoo/tampered.pdparams', cache_dir=str(tmp_path))
    assert [p.name for p in downloaded_files(tmp_path)] == ['ok.pdparams']


def tar_gz_bytes(name, payload):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_an_archive_is_unpacked_to_its_pdparams(server, tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    payload = pdparams_bytes(tmp_path)
    Handler.files['/backbone.tar.gz'] = tar_gz_bytes('ResNet18_vd_pretrained/model.pdparams', payload)
    local = weights_path(f'{server}/backbone.tar.gz')
    assert local.endswith('ResNet18_vd_pretrained/model.pdparams')
    assert open(local, 'rb').read() == payload


def test_processes_starting_together_download_and_unpack_once(server, tmp_path):
    payload = pdparams_bytes(tmp_path)
    Handler.files['/backbone.tar.gz'] = tar_gz_bytes('ResNet18_vd_pretrained/model.pdparams', payload)
    Handler.delay = 1.0  # every process asks while the first download is still under way
    probe = 'import sys; from emanet.download import weights_path; print(weights_path(sys.argv[1]))'
    env = dict(os.environ, EMANET_CACHE=str(tmp_path / 'cache'))
    processes = [subprocess.Popen([sys.executable, '-c', probe, f'{server}/backbone.tar.gz'], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err for _, err in outputs]
    paths = {out.split()[-1] for out, _ in outputs}
    assert len(paths) == 1 and open(paths.pop(), 'rb').read() == payload
    assert Handler.hits == ['/backbone.tar.gz']
    assert not list((tmp_path / 'cache').rglob('*.part'))


def test_an_unreachable_server_fails_fast_naming_the_url(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    url = f'http://127.0.0.1:{port}/model.pdparams'
    start = time.time()
    with pytest.raises(DownloadError, match=f'could not download {url}'):
        cached_path(url, cache_dir=str(tmp_path))
    assert time.time() - start < 10


def test_a_server_that_never_answers_times_out_naming_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv('EMANET_DOWNLOAD_TIMEOUT', '1')
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(1)  # accepts connections, never replies
    url = f'http://127.0.0.1:{silent.getsockname()[1]}/model.pdparams'
    try:
        with pytest.raises(DownloadError, match=f'could not download {url}: ReadTimeout'):
            cached_path(url, cache_dir=str(tmp_path))
    finally:
        silent.close()
    assert not list(tmp_path.rglob('*.part'))
