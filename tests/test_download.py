"""Downloads: once into the cache, atomically, unpacked when an archive, and a fast clear error offline."""
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time

import paddle
import pytest

from emanet.download import DownloadError, cached_path, weights_path


class Handler(http.server.BaseHTTPRequestHandler):
    files = {}
    etags = {}
    hits = []

    def do_GET(self):
        self.hits.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        if self.path in self.etags:
            self.send_header('ETag', f'"{self.etags[self.path]}"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    Handler.hits.clear()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


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
    assert not [p for p in tmp_path.rglob('*') if p.is_file()]


def test_the_servers_md5_etag_is_verified(server, tmp_path):
    body = b'weights' * 100
    Handler.files['/zoo/ok.pdparams'] = Handler.files['/zoo/tampered.pdparams'] = body
    Handler.etags['/zoo/ok.pdparams'] = hashlib.md5(body).hexdigest()
    Handler.etags['/zoo/tampered.pdparams'] = hashlib.md5(b'other').hexdigest()
    assert open(cached_path(f'{server}/zoo/ok.pdparams', cache_dir=str(tmp_path)), 'rb').read() == body
    with pytest.raises(DownloadError, match=r'tampered\.pdparams: checksum mismatch \(MD5 [0-9a-f]{32}, the server says'):
        cached_path(f'{server}/zoo/tampered.pdparams', cache_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['ok.pdparams']


def test_an_archive_is_unpacked_to_its_pdparams(server, tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    payload = pdparams_bytes(tmp_path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
        info = tarfile.TarInfo('ResNet18_vd_pretrained/model.pdparams')
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    Handler.files['/backbone.tar.gz'] = buffer.getvalue()
    local = weights_path(f'{server}/backbone.tar.gz')
    assert local.endswith('ResNet18_vd_pretrained/model.pdparams')
    assert open(local, 'rb').read() == payload


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
