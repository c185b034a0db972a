"""Downloads: once into the cache, atomically, unpacked when an archive, and a fast clear error offline.

No URL leads outside the cache, what the cache holds is checked before use, and redirects and sizes
are bounded (hostile archives: test_hostile_archives.py).
"""
import contextlib
import hashlib
import http.server
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time

import paddle
import pytest

from conftest import Handler, serving_with
from emanet.download import DownloadError, cache_location, cached_path, weights_path


def downloaded_files(folder):
    """Files under ``folder`` except the lock files that let one process download at a time and the
    records of what was downloaded."""
    return sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix not in ('.lock', '.record'))


@contextlib.contextmanager
def nothing_written_beside(tmp_path):
    """Asserts that the block creates nothing in the folder holding ``tmp_path`` (other tests' folders)."""
    before = set(os.listdir(tmp_path.parent))
    yield
    assert set(os.listdir(tmp_path.parent)) == before


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


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


@pytest.mark.slow
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


# A URL names a file on a server; nothing in it may choose where the file lands on this machine.

@pytest.mark.parametrize('parent', ['../', '%2e%2e/', '%2E%2E/', '.%2e/', '..\\', '..%5c', '..%2f', './'])
def test_a_url_with_dot_segments_is_refused_before_any_request(server, tmp_path, parent):
    # Followed blindly from anywhere, these segments lead to tmp_path/escaped.pdparams.
    path = parent * 16 + str(tmp_path).lstrip('/') + '/escaped.pdparams'
    Handler.files[f'{tmp_path}/escaped.pdparams'] = b'weights'
    url = f'{server}/zoo/{path}'
    with nothing_written_beside(tmp_path):
        with pytest.raises(DownloadError, match=f"^{re.escape(url)}: its path has '.' or '..' segments"):
            cached_path(url, cache_dir=str(tmp_path / 'cache'))
    assert Handler.hits == []
    assert not (tmp_path / 'escaped.pdparams').exists() and not downloaded_files(tmp_path)


@pytest.mark.parametrize('url', ['file:///etc/passwd', 'ftp://127.0.0.1/zoo/model.pdparams',
                                 'gopher://127.0.0.1/model.pdparams'])
def test_a_url_that_is_not_http_is_refused(tmp_path, monkeypatch, url):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    with nothing_written_beside(tmp_path):
        with pytest.raises(DownloadError, match=f'^{re.escape(url)}: only http:// and https:// URLs are downloaded$'):
            weights_path(url)
        with pytest.raises(DownloadError, match=f'^{re.escape(url)}: only http:// and https:// URLs'):
            cached_path(url, cache_dir=str(tmp_path / 'cache'))
    assert not list(tmp_path.rglob('*'))


def test_a_url_naming_no_file_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match=f'^{re.escape(server)}/zoo/ names no file$'):
        cached_path(f'{server}/zoo/', cache_dir=str(tmp_path))
    assert Handler.hits == []


def test_urls_differing_only_in_the_query_are_two_files(server, tmp_path):
    Handler.files['/zoo/model.pdparams?version=1'] = b'first'
    Handler.files['/zoo/model.pdparams?version=2'] = b'second'
    first = cached_path(f'{server}/zoo/model.pdparams?version=1', cache_dir=str(tmp_path))
    second = cached_path(f'{server}/zoo/model.pdparams?version=2', cache_dir=str(tmp_path))
    assert open(first, 'rb').read() == b'first' and open(second, 'rb').read() == b'second'
    assert os.path.basename(first) == os.path.basename(second) == 'model.pdparams'


def test_odd_hosts_and_paths_stay_inside_the_cache(server, tmp_path):
    cache = tmp_path / 'cache'
    Handler.files['/zoo/model.pdparams'] = b'weights'
    Handler.files['/zoo/absolute.pdparams'] = b'absolute'  # requests merges the double slash
    with nothing_written_beside(tmp_path):
        with_credentials = cached_path(server.replace('//', '//user:secret@') + '/zoo/model.pdparams',
                                       cache_dir=str(cache))
        absolute_looking = cached_path(f'{server}//zoo/absolute.pdparams', cache_dir=str(cache))
        with pytest.raises(DownloadError, match=r'^could not download http://\.\./x\.pdparams'):
            cached_path('http://../x.pdparams', cache_dir=str(cache))  # a host named '..'
    assert open(with_credentials, 'rb').read() == b'weights'
    assert open(absolute_looking, 'rb').read() == b'absolute'
    everything = [path for path in tmp_path.rglob('*') if path.is_file()]
    assert everything and all(cache in path.parents for path in everything)


# What is in the cache is checked again before it is used.

def test_a_cached_file_corrupted_on_disk_is_downloaded_again(server, tmp_path):
    body = b'weights' * 1000
    Handler.files['/zoo/model.pdparams'] = body
    url = f'{server}/zoo/model.pdparams'
    local = cached_path(url, sha256=sha256_of(body), cache_dir=str(tmp_path))
    with open(local, 'r+b') as file:
        file.write(b'W')  # same size, other bytes
    assert cached_path(url, sha256=sha256_of(body), cache_dir=str(tmp_path)) == local
    assert open(local, 'rb').read() == body
    assert Handler.hits == ['/zoo/model.pdparams'] * 2


def test_a_cached_file_cut_short_is_downloaded_again_without_a_checksum(server, tmp_path):
    body = b'weights' * 1000
    Handler.files['/zoo/model.pdparams'] = body
    url = f'{server}/zoo/model.pdparams'
    local = cached_path(url, cache_dir=str(tmp_path))
    os.truncate(local, 100)
    assert open(cached_path(url, cache_dir=str(tmp_path)), 'rb').read() == body
    assert Handler.hits == ['/zoo/model.pdparams'] * 2


def test_a_corrupted_cache_and_a_server_serving_other_bytes_end_in_one_sentence(server, tmp_path):
    body = b'weights' * 1000
    Handler.files['/zoo/model.pdparams'] = body
    url = f'{server}/zoo/model.pdparams'
    local = cached_path(url, sha256=sha256_of(body), cache_dir=str(tmp_path))
    with open(local, 'r+b') as file:
        file.write(b'W')
    tampered = Handler.files['/zoo/model.pdparams'] = b'tampered' * 1000
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: checksum mismatch '
                                            f'\\(sha256 {sha256_of(tampered)}, expected {sha256_of(body)}\\)$'):
        cached_path(url, sha256=sha256_of(body), cache_dir=str(tmp_path))
    assert not downloaded_files(tmp_path)


def test_an_archives_checksum_is_the_archives_own(server, tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    archive = Handler.files['/backbone.tar.gz'] = tar_gz_bytes('pretrained/model.pdparams', b'weights')
    url = f'{server}/backbone.tar.gz'
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: checksum mismatch'):
        weights_path(url, sha256=sha256_of(b'weights'))
    assert open(weights_path(url, sha256=sha256_of(archive)), 'rb').read() == b'weights'


def test_a_cached_archive_replaced_by_a_new_download_is_unpacked_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))
    Handler.files['/backbone.tar.gz'] = tar_gz_bytes('pretrained/model.pdparams', b'first weights')
    url = f'{server}/backbone.tar.gz'
    assert open(weights_path(url), 'rb').read() == b'first weights'
    archive = next((tmp_path / 'cache').rglob('backbone.tar.gz'))
    os.truncate(archive, 10)
    Handler.files['/backbone.tar.gz'] = tar_gz_bytes('pretrained/model.pdparams', b'second weights')
    assert open(weights_path(url), 'rb').read() == b'second weights'


# Redirects and sizes.

def test_a_redirect_is_followed_and_the_file_kept_under_the_url_asked_for(server, tmp_path):
    Handler.files['/moved/model.pdparams'] = b'weights'
    Handler.redirects['/zoo/model.pdparams'] = f'{server}/moved/model.pdparams'
    local = cached_path(f'{server}/zoo/model.pdparams', cache_dir=str(tmp_path))
    assert open(local, 'rb').read() == b'weights' and os.path.basename(local) == 'model.pdparams'
    assert Handler.hits == ['/zoo/model.pdparams', '/moved/model.pdparams']
    assert cached_path(f'{server}/zoo/model.pdparams', cache_dir=str(tmp_path)) == local
    assert len(Handler.hits) == 2


def test_endless_redirects_end_in_one_sentence(server, tmp_path):
    Handler.redirects['/zoo/model.pdparams'] = '/zoo/model.pdparams'
    url = f'{server}/zoo/model.pdparams'
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: more than 10 redirects$'):
        cached_path(url, cache_dir=str(tmp_path))
    assert len(Handler.hits) == 11 and not downloaded_files(tmp_path)


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """A file server speaking HTTPS on 127.0.0.1 with a fresh self-signed certificate that requests trusts."""
    if shutil.which('openssl') is None:
        pytest.skip('openssl is needed to make a certificate for the HTTPS server')
    key, certificate = tmp_path / 'key.pem', tmp_path / 'certificate.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
                    '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', str(key), '-out', str(certificate)],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(certificate))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate), str(key))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'https://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def test_a_redirect_from_https_to_plain_http_is_refused(server, https_server, tmp_path):
    Handler.files['/secure/model.pdparams'] = Handler.files['/plain/model.pdparams'] = b'weights'
    secure = cached_path(f'{https_server}/secure/model.pdparams', cache_dir=str(tmp_path / 'cache'))
    assert open(secure, 'rb').read() == b'weights'
    Handler.redirects['/downgraded/model.pdparams'] = f'{server}/plain/model.pdparams'
    url = f'{https_server}/downgraded/model.pdparams'
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: refusing the redirect to '
                                            f'{re.escape(server)}/plain/model.pdparams, which drops HTTPS$'):
        cached_path(url, cache_dir=str(tmp_path / 'cache'))
    assert '/plain/model.pdparams' not in Handler.hits


def test_an_endless_download_stops_at_the_size_cap(server, tmp_path, monkeypatch):
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', str(1 << 20))
    Handler.endless.add('/zoo/model.pdparams')
    url = f'{server}/zoo/model.pdparams'
    start = time.time()
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: the download exceeds 1048576 bytes '
                                            r'\(EMANET_MAX_DOWNLOAD_BYTES\)'):
        cached_path(url, cache_dir=str(tmp_path))
    assert time.time() - start < 10
    assert not downloaded_files(tmp_path) and not list(tmp_path.rglob('*.part'))


def test_a_declared_size_over_the_cap_is_refused_before_downloading(server, tmp_path, monkeypatch):
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', '1000')
    Handler.files['/zoo/model.pdparams'] = bytes(1001)
    url = f'{server}/zoo/model.pdparams'
    with pytest.raises(DownloadError, match=f'^{re.escape(url)}: the download exceeds 1000 bytes'):
        cached_path(url, cache_dir=str(tmp_path))
    assert not downloaded_files(tmp_path)


# Time: one download, and the wait for another process's download, each end by a deadline.

def raised_within(seconds, function):
    """The exception ``function`` raises, which it must raise within ``seconds``: a hang fails the test, not the run."""
    outcome = []

    def run():
        try:
            function()
            outcome.append(None)
        except Exception as error:
            outcome.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f'still running after {seconds} seconds'
    return outcome[0]


class Trickle(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes and sends one every half second: each read gets a byte well within its timeout."""

    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '1000')
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1000):
                self.wfile.write(b'w')
                self.wfile.flush()
                time.sleep(0.5)

    def log_message(self, *args):
        pass


def test_a_trickling_download_ends_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv('EMANET_DOWNLOAD_DEADLINE', '2')
    with serving_with(Trickle) as server:
        url = f'{server}/zoo/model.pdparams'
        start = time.monotonic()
        error = raised_within(10, lambda: cached_path(url, cache_dir=str(tmp_path)))
    assert isinstance(error, DownloadError)
    assert str(error) == (f'{url}: the download took longer than 2.0 seconds (EMANET_DOWNLOAD_DEADLINE); '
                          'raise that limit on a slow connection')
    assert time.monotonic() - start < 5
    assert not downloaded_files(tmp_path) and not list(tmp_path.rglob('*.part'))


HOLD_A_LOCK = '''
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print('held', flush=True)
time.sleep(60)
'''


def test_waiting_for_another_processs_download_ends_at_its_deadline(server, tmp_path, monkeypatch):
    monkeypatch.setenv('EMANET_DOWNLOAD_LOCK_WAIT', '1')
    Handler.files['/zoo/model.pdparams'] = b'weights'
    url = f'{server}/zoo/model.pdparams'
    lock = cache_location(url, str(tmp_path)) + '.lock'
    os.makedirs(os.path.dirname(lock))
    holder = subprocess.Popen([sys.executable, '-c', HOLD_A_LOCK, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        start = time.monotonic()
        error = raised_within(10, lambda: cached_path(url, cache_dir=str(tmp_path)))
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert isinstance(error, DownloadError)
    assert str(error) == (f'{url}: another process has held {lock} for more than 1.0 seconds '
                          '(EMANET_DOWNLOAD_LOCK_WAIT) while fetching it; try again once it has finished')
    assert 1 <= waited < 5
    assert Handler.hits == []


class MalformedLength(http.server.BaseHTTPRequestHandler):
    """Answers with ``length`` as its Content-Length, the bytes as they are (a header's bytes are Latin-1)."""

    length = b''

    def do_GET(self):
        self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: ' + self.length + b'\r\nConnection: close\r\n\r\nweights')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize('length', ['²'.encode('latin-1'), '١٢٣'.encode(), b'+7', b'7 7'],
                         ids=['superscript two', 'Arabic-Indic digits', 'plus sign', 'two numbers'])
def test_a_content_length_that_is_not_ascii_digits_ends_in_one_sentence(tmp_path, monkeypatch, length):
    monkeypatch.setattr(MalformedLength, 'length', length)
    with serving_with(MalformedLength) as server:
        url = f'{server}/zoo/model.pdparams'
        as_received = repr(length.decode('latin-1'))  # a header's bytes are read as Latin-1
        with pytest.raises(DownloadError, match=f'^{re.escape(url)}: the server gave a Content-Length that is not '
                                                f'a number of bytes \\({re.escape(as_received)}\\)$'):
            cached_path(url, cache_dir=str(tmp_path))
    assert not downloaded_files(tmp_path)
