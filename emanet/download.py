"""Download files once into a local cache, with a progress bar and a clear error offline.

Several processes may ask for the same file at once (every rank of a data-parallel run builds
its backbone): a lock file beside the target lets one download and unpack while the others
wait, and then they find the finished copy.
"""
import glob
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from urllib.parse import urlparse

import requests
from filelock import FileLock
from tqdm import tqdm

CACHE_DIR = os.environ.get('EMANET_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'emanet'))
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.zip')


def timeout_seconds():
    """Seconds to wait for a server to answer (EMANET_DOWNLOAD_TIMEOUT, default 15)."""
    return float(os.environ.get('EMANET_DOWNLOAD_TIMEOUT', 15))


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message names the URL."""


def is_url(path):
    return str(path).startswith(('http://', 'https://'))


def cached_path(url, sha256=None, cache_dir=None):
    """Return a local path for ``url``, downloading it on first use.

    The file lands in a temporary file renamed only once complete and verified: its size
    against the server's Content-Length, its MD5 against the server's ETag where that is an
    MD5 (object stores such as PaddleSeg's publish them so), and ``sha256`` when given.
    An interrupted or corrupted download never leaves a file behind.
    """
    cache_dir = cache_dir or CACHE_DIR
    parts = urlparse(url)
    target = os.path.join(cache_dir, parts.netloc, parts.path.lstrip('/'))
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + '.lock'):
        if os.path.exists(target):  # another process finished it while this one waited
            return target
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), suffix='.part')
        try:
            with os.fdopen(fd, 'wb') as out:
                digests = _fetch(url, out)
            if sha256 is not None and digests['sha256'] != sha256:
                raise DownloadError(f"{url}: checksum mismatch (sha256 {digests['sha256']}, expected {sha256})")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


def _fetch(url, out):
    """Stream ``url`` into ``out`` with a progress bar; return its sha256 and md5 hex digests."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    try:
        with requests.get(url, stream=True, timeout=timeout_seconds()) as response:
            response.raise_for_status()
            expected_size = int(response.headers.get('content-length', 0)) or None
            etag = response.headers.get('etag', '').strip('"').lower()
            with tqdm(total=expected_size, unit='B', unit_scale=True, desc=os.path.basename(url)) as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as err:
        raise DownloadError(f"could not download {url}: {err.__class__.__name__}. "
                            f"Check the network, or download it by hand and pass the local path.") from None
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{url}: download incomplete ({size} of {expected_size} bytes)")
    if re.fullmatch(r'[0-9a-f]{32}', etag) and md5.hexdigest() != etag:
        raise DownloadError(f"{url}: checksum mismatch (MD5 {md5.hexdigest()}, the server says {etag})")
    return {'sha256': sha256.hexdigest(), 'md5': md5.hexdigest()}


def weights_path(path):
    """A local .pdparams file for ``path``: itself, or downloaded (and unpacked if an archive).

    PaddleSeg publishes backbone weights as archives holding one ``.pdparams`` file.
    """
    if not is_url(path):
        return path
    local = cached_path(path)
    if not local.endswith(ARCHIVE_SUFFIXES):
        return local
    unpacked = local + '.unpacked'
    with FileLock(unpacked + '.lock'):
        if not os.path.isdir(unpacked):
            partial = unpacked + '.part'
            shutil.rmtree(partial, ignore_errors=True)
            if local.endswith('.zip'):
                with zipfile.ZipFile(local) as archive:
                    archive.extractall(partial)
            else:
                with tarfile.open(local) as archive:
                    archive.extractall(partial, filter='data')
            os.replace(partial, unpacked)
    found = sorted(glob.glob(os.path.join(unpacked, '**', '*.pdparams'), recursive=True))
    if not found:
        raise DownloadError(f"{path}: the archive holds no .pdparams file")
    return found[0]
