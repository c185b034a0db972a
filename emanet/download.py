"""Download files once into a local cache, with a progress bar and a clear error offline.

Several processes may ask for the same file at once (every rank of a data-parallel run builds
its backbone): a lock file beside the target lets one download and unpack while the others
wait, and then they find the finished copy.

No URL and no archive member can place a file outside the cache: a URL is kept as
``<cache>/<host>/<digest of the URL>/<file name>``, and an archive unpacks only files and folders
inside its own folder. Downloads and unpacked archives are bounded in size, redirects are
followed a bounded number of times and never from HTTPS down to HTTP, and a cached file is
checked against the record of its download before it is used.

What a download or an archive may cost is bounded here, each budget with its environment variable:

- ``EMANET_MAX_DOWNLOAD_BYTES`` (4 GiB): the largest download, and the most an archive unpacks to;
- ``EMANET_DOWNLOAD_TIMEOUT`` (15 s): the longest wait for a server's answer or for any one read;
- ``EMANET_DOWNLOAD_DEADLINE`` (3600 s): the longest one download may take, however the server paces
  its body (checked after every read; the headers are bounded by the timeout and http.client's limits);
- ``EMANET_DOWNLOAD_LOCK_WAIT`` (the deadline and 10 minutes more): the longest wait for another process
  downloading or unpacking the same file;
- fixed: MAX_REDIRECTS, MAX_ARCHIVE_MEMBERS, and MAX_ARCHIVE_HEADER_BYTES for the long names and pax
  records of one tar member, which tarfile would read into memory whole before any member is checked.
"""
import bz2
import contextlib
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import typing
import zipfile
import zlib
from urllib.parse import unquote, urljoin, urlsplit

import filelock
import requests
import urllib3
from tqdm import tqdm

from emanet.errors import UserError
from emanet.untrusted import budget_from_environment, load_json

CACHE_DIR = os.environ.get('EMANET_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'emanet'))
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.zip')
WEIGHT_SUFFIXES = ('.pdparams', '.safetensors')
MAX_REDIRECTS = 10
MAX_ARCHIVE_MEMBERS = 10000
# Linux paths are at most 4 KiB: a long name, a long link name and their pax records fit with room to spare.
# Small also for time: before 3.11.10 and 3.12.6, tarfile parses pax records in time quadratic in their
# size (CVE-2024-6232): 0.25 s for 16 KiB of digits, 4 s for 64 KiB.
MAX_ARCHIVE_HEADER_BYTES = 16 << 10
TAR_BLOCK = 512
CHUNK_BYTES = 1 << 20
# Errors of a damaged or truncated archive, from the archive modules and the decompressors below them.
# NotImplementedError: zipfile's answer to a compression method or version it does not know.
# UnicodeDecodeError: a zip member's name flagged as UTF-8 that is not.
ARCHIVE_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError,
                       NotImplementedError, UnicodeDecodeError)


def timeout_seconds():
    """Seconds to wait for a server to answer (EMANET_DOWNLOAD_TIMEOUT, default 15)."""
    return budget_from_environment('EMANET_DOWNLOAD_TIMEOUT', 15.0)


def deadline_seconds():
    """Seconds one download may take in all (EMANET_DOWNLOAD_DEADLINE, default 3600)."""
    return budget_from_environment('EMANET_DOWNLOAD_DEADLINE', 3600.0)


def lock_wait_seconds():
    """Seconds to wait for another process downloading or unpacking the same file (EMANET_DOWNLOAD_LOCK_WAIT,
    default the download deadline and 10 minutes for unpacking)."""
    return budget_from_environment('EMANET_DOWNLOAD_LOCK_WAIT', deadline_seconds() + 600)


def max_download_bytes():
    """The largest download, and the most an archive may unpack to (EMANET_MAX_DOWNLOAD_BYTES, default 4 GiB)."""
    return budget_from_environment('EMANET_MAX_DOWNLOAD_BYTES', 4 << 30, int)


class DownloadError(UserError, RuntimeError):
    """A file could not be downloaded; the message names the URL."""


def is_url(path):
    """Whether ``path`` is written as a URL; schemes other than http(s) are refused rather than read as files."""
    return re.match(r'[A-Za-z][A-Za-z0-9+.-]+://', str(path)) is not None


def cache_location(url, cache_dir):
    """Where ``url`` is kept: ``<cache_dir>/<host>/<digest of the whole URL>/<its file name>``.

    The digest keeps apart URLs that differ anywhere (the query too); the file name keeps the
    suffix callers look for. Only a sanitised host and file name come from the URL, so no URL
    leads outside the cache. URLs that are not http(s), whose path has '.' or '..' segments
    (also percent-encoded or with backslashes), or that name no file are refused.
    """
    parts = urlsplit(url)
    if parts.scheme not in ('http', 'https'):
        raise DownloadError(f"{url}: only http:// and https:// URLs are downloaded")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        raise DownloadError(f"{url} is not a valid URL") from None
    if not host:
        raise DownloadError(f"{url} names no host")
    # Servers decode %2e and %2f, and some take a backslash for a slash: judge the path as they may.
    segments = re.split(r'[/\\]', unquote(parts.path))
    if any(segment in ('.', '..') for segment in segments):
        raise DownloadError(f"{url}: its path has '.' or '..' segments; give the file's own path")
    if not segments[-1]:
        raise DownloadError(f"{url} names no file")
    host_folder = _file_name(host if port is None else f'{host}_{port}')
    target = os.path.join(cache_dir, host_folder, hashlib.sha256(url.encode()).hexdigest()[:32],
                          _file_name(segments[-1]))
    if not _inside(target, cache_dir):
        raise DownloadError(f"{url}: refusing a cache path outside {cache_dir}")
    return target


def _file_name(text):
    """``text`` as one harmless file name: letters, digits, '.', '_' and '-', at most 100 characters, no leading dot."""
    name = re.sub(r'[^A-Za-z0-9._-]', '_', text)[-100:]
    return '_' + name[1:] if name.startswith('.') else name


def _inside(path, folder):
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def cached_path(url, sha256=None, cache_dir=None):
    """Return a local path for ``url``, downloading it on first use.

    The file lands in a temporary file renamed only once complete and verified: its size
    against the server's Content-Length, its MD5 against the server's ETag where that is an
    MD5 (object stores such as PaddleSeg's publish them so), and ``sha256`` when given.
    An interrupted or corrupted download never leaves a file behind. A record of the
    download (its sha256 and size) is written beside it; a cached file whose size no longer
    matches the record, or whose recomputed digest is not ``sha256`` when that is given, is
    downloaded again.
    """
    return _download(url, sha256, cache_dir or CACHE_DIR)[0]


def _download(url, sha256, cache_dir):
    """``cached_path`` that also returns the record of the download."""
    target = cache_location(url, cache_dir)
    record = _intact_record(target, sha256)
    if record is not None:
        return target, record
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _lock(target + '.lock', url):
        record = _intact_record(target, sha256)  # another process may have finished it while this one waited
        if record is not None:
            return target, record
        for stale in (target, _record_path(target)):  # a download that no longer checks out
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        return target, _download_to(url, target, sha256)


def _lock(path, url):
    """The lock file ``path``, acquired for a with-block; waiting longer than lock_wait_seconds() is a DownloadError."""
    wait = lock_wait_seconds()
    try:
        return filelock.FileLock(path, timeout=wait).acquire()
    except filelock.Timeout:
        raise DownloadError(f"{url}: another process has held {path} for more than {wait} seconds "
                            f"(EMANET_DOWNLOAD_LOCK_WAIT) while fetching it; try again once it has finished") from None


def _record_path(target):
    return target + '.record'


def _intact_record(target, sha256):
    """The record of the download at ``target`` if the file is still that download, else None.

    The size is compared every time (cheap, and catches a file cut short); the file's digest is
    recomputed only when the caller gives ``sha256``.
    """
    try:
        record = load_json(_record_path(target), "a download's record")
        intact = os.path.getsize(target) == record['size'] and (
            sha256 is None or record['sha256'] == sha256.lower() == _file_sha256(target))
    except (OSError, ValueError, KeyError, TypeError, UserError):  # no file, no record, or a damaged record
        return None
    return record if intact else None


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _download_to(url, target, sha256):
    """Download ``url`` to ``target`` through a temporary file; the record is written first, so a
    file without a record is never taken for a finished download."""
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as out:
            record = _fetch(url, out)
        if sha256 is not None and record['sha256'] != sha256.lower():
            raise DownloadError(f"{url}: checksum mismatch (sha256 {record['sha256']}, expected {sha256})")
        _write_atomically(_record_path(target), json.dumps(record))
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return record


def _write_atomically(path, text):
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.part')
    try:
        with os.fdopen(fd, 'w') as out:
            out.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _fetch(url, out):
    """Stream ``url`` into ``out`` with a progress bar; return the sha256 and size of what arrived."""
    limit, deadline = max_download_bytes(), deadline_seconds()
    give_up_at = time.monotonic() + deadline
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    try:
        with requests.Session() as session, _get(session, url) as response:
            response.raise_for_status()
            expected_size = _declared_size(url, response.headers.get('content-length'))
            if expected_size is not None and expected_size > limit:
                raise _too_large(url, limit)
            etag = response.headers.get('etag', '').strip('"').lower()
            with tqdm(total=expected_size, unit='B', unit_scale=True,
                      desc=os.path.basename(urlsplit(url).path)) as bar:
                while True:
                    # One read of the socket each (read1): a read that waits for a whole chunk would let a
                    # server sending a byte at a time, each within the read timeout, hold it past the deadline.
                    # Decoded as requests' iter_content decoded it, should a server ignore 'identity'.
                    chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
                    if not chunk:
                        break
                    if time.monotonic() > give_up_at:
                        raise DownloadError(f"{url}: the download took longer than {deadline} seconds "
                                            f"(EMANET_DOWNLOAD_DEADLINE); raise that limit on a slow connection")
                    size += len(chunk)
                    if size > limit:  # a server streaming without end, or beyond what it declared
                        raise _too_large(url, limit)
                    out.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
    # Reading the raw response, errors come from urllib3 as they are (requests wraps only its own reads).
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        raise DownloadError(f"could not download {url}: {err.__class__.__name__}; check the network, "
                            f"or download it by hand and pass the local path") from None
    except UnicodeError:  # requests decodes a redirect's Location as UTF-8
        raise DownloadError(f"could not download {url}: the server's answer holds a header that is not text "
                            f"(not HTTP as a web server sends it)") from None
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{url}: download incomplete ({size} of {expected_size} bytes)")
    if re.fullmatch(r'[0-9a-f]{32}', etag) and md5.hexdigest() != etag:
        raise DownloadError(f"{url}: checksum mismatch (MD5 {md5.hexdigest()}, the server says {etag})")
    return {'sha256': sha256.hexdigest(), 'size': size}


def _declared_size(url, content_length):
    """The size a Content-Length header declares, None without one.

    ASCII digits only: int() also reads '١٢٣' and str.isdigit() accepts '²'. Anything else is refused
    rather than ignored: without a size, a connection cut short would pass for a complete download.
    """
    if content_length is None:
        return None
    if not re.fullmatch(r'[0-9]+', content_length):
        raise DownloadError(f"{url}: the server gave a Content-Length that is not a number of bytes "
                            f"({content_length!r})")
    return int(content_length)


def _too_large(url, limit):
    return DownloadError(f"{url}: the download exceeds {limit} bytes (EMANET_MAX_DOWNLOAD_BYTES); "
                         f"raise that limit if the file is genuine")


def _get(session, url):
    """The streamed response to GET ``url`` after at most MAX_REDIRECTS redirects, each one checked."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        # Identity encoding: the bytes counted, hashed and compared with Content-Length are the file's own.
        response = session.get(current, stream=True, timeout=timeout_seconds(), allow_redirects=False,
                               headers={'Accept-Encoding': 'identity'})
        if not response.is_redirect:
            return response
        response.close()
        following = urljoin(current, response.headers['location'])
        _check_redirect(url, current, following)
        current = following
    raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _check_redirect(url, current, following):
    """Refuse a redirect away from http(s), or from HTTPS down to plain HTTP."""
    scheme = urlsplit(following).scheme
    if scheme not in ('http', 'https'):
        raise DownloadError(f"{url}: refusing the redirect to {following}, which is not an http(s) URL")
    if urlsplit(current).scheme == 'https' and scheme == 'http':
        raise DownloadError(f"{url}: refusing the redirect to {following}, which drops HTTPS")


def weights_path(path, sha256=None):
    """A local weights file (.pdparams or .safetensors) for ``path``: itself, or downloaded (and unpacked if an archive).

    PaddleSeg publishes backbone weights as archives holding one ``.pdparams`` file. ``sha256``,
    when given, is the digest of what the URL serves (the archive, for an archive).
    """
    if not is_url(path):
        return path
    local, record = _download(path, sha256, CACHE_DIR)
    if not local.endswith(ARCHIVE_SUFFIXES):
        return local
    # Named after the archive's digest: an archive downloaded again with other bytes is unpacked anew.
    unpacked = f"{local}.{record['sha256'][:16]}.unpacked"
    with _lock(unpacked + '.lock', path):
        if not os.path.isdir(unpacked):
            partial = tempfile.mkdtemp(dir=os.path.dirname(local), suffix='.part')
            try:
                unpack_archive(local, partial, source=path)
                os.replace(partial, unpacked)
            finally:
                if os.path.isdir(partial):
                    shutil.rmtree(partial)
    found = sorted(file for suffix in WEIGHT_SUFFIXES
                   for file in glob.glob(os.path.join(unpacked, '**', '*' + suffix), recursive=True))
    if not found:
        raise DownloadError(f"{path}: the archive holds no .pdparams or .safetensors file")
    return found[0]


class _Member(typing.NamedTuple):
    """One entry of a tar or zip archive, described alike."""
    name: str
    kind: str  # 'file', 'folder', 'symbolic link', 'hard link' or 'other'
    size: int
    open: typing.Callable
    standard_refusal: typing.Optional[str] = None  # what tarfile's 'data' filter says against it


def unpack_archive(archive_path, destination, source=None):
    """Unpack a .tar, .tar.gz, .tgz or .zip into the folder ``destination``: only files and folders, inside it.

    Every member is checked before the first is written. Links, devices, absolute names, '..'
    segments, backslashes and drive letters are refused, as are more than MAX_ARCHIVE_MEMBERS
    members or more than EMANET_MAX_DOWNLOAD_BYTES in all (counted again as the bytes are written),
    each with one DownloadError naming ``source`` (the archive's URL, by default its path) and the
    member. A tar's headers are read ahead of tarfile (``_TarHeaders``): negative sizes, sparse
    files, pax records replacing a size, and more than MAX_ARCHIVE_HEADER_BYTES of long names and
    pax records for one member are refused before tarfile reads them. Where this Python has tarfile's
    'data' filter (PEP 706), a member it refuses is refused too; the checks here do not rely on it.
    """
    source = source or archive_path
    with contextlib.ExitStack() as opened:
        try:
            if archive_path.endswith('.zip'):
                members = _zip_members(opened.enter_context(zipfile.ZipFile(archive_path)))
            else:
                members = _tar_members(opened, archive_path, os.path.abspath(destination), source)
            checked = _checked_members(members, destination, source)
        except ARCHIVE_READ_ERRORS as err:
            raise DownloadError(f"{source}: not a readable archive ({' '.join(str(err).split())})") from None
        limit, written = max_download_bytes(), 0
        for member, path in checked:
            try:
                if member.kind == 'folder':
                    os.makedirs(path, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with member.open() as data, open(path, 'wb') as out:
                    # Both readers stop at the member's declared size, which the check has counted; what is
                    # written is counted too, so that the cap holds whatever a reader does.
                    for chunk in iter(lambda: data.read(CHUNK_BYTES), b''):
                        written += len(chunk)
                        if written > limit:
                            raise DownloadError(f"{source}: refusing archive member '{member.name}' "
                                                f"({_over_the_cap(limit)})")
                        out.write(chunk)
            except DownloadError:  # a refusal, already one sentence; a RuntimeError like zipfile's below
                raise
            except ARCHIVE_READ_ERRORS + (RuntimeError,) as err:  # zipfile raises RuntimeError for encryption
                raise DownloadError(f"{source}: archive member '{member.name}' cannot be unpacked ({err})") from None


def _checked_members(members, destination, source):
    """(member, path in ``destination``) for every member but the archive's own folder ('./'), once all pass."""
    limit, total, checked = max_download_bytes(), 0, []
    root = os.path.abspath(destination)
    for count, member in enumerate(members, 1):
        reason = _refusal(member, count, total, limit)
        parts = [part for part in member.name.split('/') if part not in ('', '.')]
        path = os.path.join(root, *parts)
        # The last guard, by name alone: the folder is new and nothing unpacked into it is a link.
        if reason is None and os.path.commonpath([root, os.path.normpath(path)]) != root:
            reason = "a path leaving the archive's folder"
        if reason is not None:
            raise DownloadError(f"{source}: refusing archive member '{member.name}' ({reason})")
        total += member.size
        if parts:
            checked.append((member, path))
    return checked


def _refusal(member, count, total, limit):
    """Why ``member``, the count-th with ``total`` bytes before it, may not be unpacked; None if it may."""
    if count > MAX_ARCHIVE_MEMBERS:
        return f'the archive has more than {MAX_ARCHIVE_MEMBERS} members'
    if '\\' in member.name or re.match(r'[A-Za-z]:', member.name):
        return 'a backslash or drive letter in its name'
    if member.name.startswith('/'):
        return 'an absolute path'
    if '..' in member.name.split('/'):
        return "a path leaving the archive's folder"
    if member.kind in ('symbolic link', 'hard link'):
        return f'a {member.kind}'
    if member.kind == 'other':
        return 'neither a file nor a folder'
    if member.standard_refusal is not None:
        return member.standard_refusal
    if total + member.size > limit:
        return _over_the_cap(limit)
    return None


def _over_the_cap(limit):
    return f'the archive unpacks to more than {limit} bytes (EMANET_MAX_DOWNLOAD_BYTES)'


def _tar_members(opened, archive_path, root, source):
    """The members of the tar at ``archive_path`` as tarfile reads them, lazily, so that a refusal stops before
    the rest of the archive is read; each member's headers are checked by ``_TarHeaders`` before tarfile reads them.

    ``opened`` (an ExitStack) closes the two streams of the archive: one for the check, one for tarfile.
    """
    headers = _TarHeaders(opened.enter_context(_tar_stream(archive_path)), source)
    headers.check_next()  # tarfile reads the first member as it opens
    archive = opened.enter_context(tarfile.open(fileobj=opened.enter_context(_tar_stream(archive_path)), mode='r:'))
    while True:
        info = archive.next()
        if info is None:
            return
        kind = ('folder' if info.isdir() else 'file' if info.isreg() else 'symbolic link' if info.issym()
                else 'hard link' if info.islnk() else 'other')
        yield _Member(info.name, kind, info.size, lambda info=info: archive.extractfile(info),
                      _standard_refusal(info, root))
        # Checked where tarfile will read next: should the two ever disagree on where a member's
        # headers are, tarfile would read headers nobody checked.
        checked_at = headers.check_next()
        if checked_at != archive.offset:
            raise DownloadError(f"{source}: not a readable archive (tarfile reads the header at byte "
                                f"{archive.offset}, where the check found one at byte {checked_at})")


def _tar_stream(archive_path):
    """The tar inside ``archive_path``: decompressed when gzip, bzip2 or xz (told by their magic numbers, as
    tarfile tells them), else the file itself."""
    with open(archive_path, 'rb') as file:
        magic = file.read(6)
    if magic.startswith(b'\x1f\x8b'):
        return gzip.open(archive_path)
    if magic.startswith(b'BZh'):
        return bz2.open(archive_path)
    if magic.startswith(b'\xfd7zXZ\x00'):
        return lzma.open(archive_path)
    return open(archive_path, 'rb')


def _standard_refusal(info, root):
    """What tarfile's 'data' extraction filter (PEP 706: Python 3.12, and 3.9.17, 3.10.12, 3.11.4 on) finds
    wrong with ``info`` unpacked into ``root``, or None. The checks here come first and refuse all it
    refuses today; its own are asked too for what later Pythons add."""
    if not hasattr(tarfile, 'data_filter'):
        return None
    try:
        tarfile.data_filter(info, root)
    except tarfile.FilterError as err:
        return f"tarfile's data filter refuses it: {err}"
    return None


class _TarHeaders:
    """Reads a tar stream's headers one member ahead of tarfile, refusing what tarfile would trust.

    tarfile reads a GNU long name or a pax header whole, at the size its header declares, before any
    member can be checked; takes a negative size (base-256 or octal) as given, which sends it back to
    members already read; and lets a pax record replace a member's size. So here, before tarfile reads
    a member's headers: a negative size, a sparse file or a pax record of a size is refused, and so are
    long names and pax records taking more than MAX_ARCHIVE_HEADER_BYTES for one member. The headers'
    numbers and checksums are read with tarfile's own functions, so that both find the members at the
    same places; the member's data is skipped only once the member has passed its checks.
    """

    # Headers that describe the next header's member instead of being members: tarfile reads their data whole.
    EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE)
    PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)

    def __init__(self, stream, source):
        self.stream, self.source = stream, source
        self.position = 0  # in the tar stream: where the next header or data not yet skipped starts
        self.data_to_skip = 0  # of the member checked last, which tarfile reads or skips in its own time

    def check_next(self):
        """Skip the data of the member checked last, check the headers of the next one; return where they start
        (the end of the archive's members, where tarfile stops too: an empty block or the end of the stream)."""
        self._skip(self.data_to_skip)
        start, extended_bytes, long_name, sparse, size_replaced = self.position, 0, None, False, False
        while True:
            block = self._read(TAR_BLOCK)
            if len(block) < TAR_BLOCK or not any(block):
                self.data_to_skip = 0
                return start
            kind, size = block[156:157], self._size(block)
            name = long_name or _ustar_name(block)
            if size < 0:
                self._refuse(name, 'a negative size')
            if kind not in self.EXTENDED:
                break
            extended_bytes += TAR_BLOCK + _tar_blocks(size)
            if extended_bytes > MAX_ARCHIVE_HEADER_BYTES:
                raise DownloadError(f"{self.source}: refusing an archive member whose headers at byte {start} "
                                    f"take more than {MAX_ARCHIVE_HEADER_BYTES} bytes (long names and pax records)")
            data = self._read(_tar_blocks(size))
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data[:size].split(b'\0')[0].decode('utf-8', 'replace')
            if kind in self.PAX:
                # Records are '<length> <keyword>=<value>\n': a keyword follows a space and ends at '='.
                sparse = sparse or b'GNU.sparse' in data
                size_replaced = size_replaced or b' size=' in data
        if kind == tarfile.GNUTYPE_SPARSE or sparse:
            self._refuse(name, 'a sparse file')
        if size_replaced:  # tar writers add one only for members of 8 GiB and more
            self._refuse(name, 'a pax header overriding its size')
        # Where tarfile skips data: regular files and types it does not know (an old-style folder, a
        # regular type whose name ends in '/', has none).
        old_style_folder = kind == tarfile.AREGTYPE and block[:100].split(b'\0')[0].endswith(b'/')
        carries_data = (kind in tarfile.REGULAR_TYPES or kind not in tarfile.SUPPORTED_TYPES) and not old_style_folder
        self.data_to_skip = _tar_blocks(size) if carries_data else 0
        return start

    def _read(self, count):
        data = self.stream.read(count)
        self.position += len(data)
        return data

    def _skip(self, count):
        # Counted as skipped even past the end of a truncated stream: tarfile looks there too, and says so.
        self.stream.seek(self.position + count)
        self.position += count

    def _size(self, header):
        """The size ``header`` declares, once its checksum holds."""
        try:
            if tarfile.nti(header[148:156]) in tarfile.calc_chksums(header):
                return tarfile.nti(header[124:136])
        except tarfile.HeaderError:  # a number that is not one
            pass
        raise DownloadError(f"{self.source}: not a readable archive (a damaged header at byte "
                            f"{self.position - TAR_BLOCK})")

    def _refuse(self, name, reason):
        raise DownloadError(f"{self.source}: refusing archive member '{name}' ({reason})")


def _ustar_name(header):
    """A member's name as its ustar header gives it (prefix and name), for messages."""
    name, prefix = (header[start:end].split(b'\0')[0] for start, end in ((0, 100), (345, 500)))
    return (prefix + b'/' + name if prefix else name).decode('utf-8', 'replace')


def _tar_blocks(size):
    """The bytes ``size`` bytes of a member take in a tar stream: whole blocks."""
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _zip_members(archive):
    for info in archive.infolist():
        file_type = stat.S_IFMT(info.external_attr >> 16)  # the unix mode; 0 in zips made elsewhere
        if file_type == stat.S_IFLNK:
            kind = 'symbolic link'
        elif file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = 'other'
        else:
            kind = 'folder' if info.filename.endswith('/') or file_type == stat.S_IFDIR else 'file'
        yield _Member(info.filename, kind, info.file_size, lambda info=info: archive.open(info))
