"""Downloaded archives unpack only files and folders inside their own folder, within a size and count.

Each hostile archive is served from 127.0.0.1 and asked for as weights (or unpacked directly where memory or
time is measured); each is refused with one sentence naming the archive's URL and the member, and nothing is
written outside the cache.
"""
import contextlib
import gzip
import io
import os
import re
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Handler
from emanet.download import DownloadError, unpack_archive, weights_path


def tar_member(name, payload=b'', kind=tarfile.REGTYPE, linkname=''):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(payload)
    return info, payload


def tar_bytes(*members, mode='w:gz'):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for info, payload in members:
            archive.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return buffer.getvalue()


def zip_bytes(*members):
    """``members`` are (name, payload) or (name, payload, unix mode)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, payload, *mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode:
                info.external_attr = mode[0] << 16
            archive.writestr(info, payload)
    return buffer.getvalue()


@pytest.fixture
def serve_archive(server, tmp_path, monkeypatch):
    """Serves the given bytes as ``name`` with the cache in tmp_path/cache; returns the URL."""
    monkeypatch.setattr('emanet.download.CACHE_DIR', str(tmp_path / 'cache'))

    def serve(name, body):
        Handler.files[f'/archives/{name}'] = body
        return f'{server}/archives/{name}'
    return serve


def refused(url, member, reason):
    return pytest.raises(DownloadError, match=f"^{re.escape(url)}: refusing archive member "
                                              f"'{re.escape(member)}' \\({reason}\\)$")


def assert_nothing_unpacked(tmp_path, before):
    """Nothing beside tmp_path, nothing in tmp_path outside the cache, no unpacked folder left in the cache."""
    assert set(os.listdir(tmp_path.parent)) == before
    assert [path.name for path in tmp_path.iterdir()] == ['cache']
    cache = tmp_path / 'cache'
    assert not [path for path in cache.rglob('*') if path.suffix in ('.unpacked', '.part')]
    assert not list(cache.rglob('*.pdparams'))


def outside(tmp_path):
    """A member name that, followed blindly from any folder, leads to tmp_path/escaped.pdparams."""
    return '../' * 16 + str(tmp_path).lstrip('/') + '/escaped.pdparams'


def test_ordinary_archives_with_folder_entries_unpack(serve_archive):
    tar_url = serve_archive('backbone.tar', tar_bytes(
        tar_member('./', kind=tarfile.DIRTYPE), tar_member('./pretrained', kind=tarfile.DIRTYPE),
        tar_member('./pretrained/model.pdparams', b'tar weights'), mode='w'))
    zip_url = serve_archive('backbone.zip', zip_bytes(('pretrained/', b''),
                                                      ('pretrained/model.pdparams', b'zip weights')))
    assert open(weights_path(tar_url), 'rb').read() == b'tar weights'
    assert open(weights_path(zip_url), 'rb').read() == b'zip weights'


@pytest.mark.parametrize('compression', ['', 'gz', 'bz2', 'xz'])
@pytest.mark.parametrize('form', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=['ustar', 'GNU', 'pax'])
def test_archives_in_every_form_tarfile_writes_unpack(tmp_path, form, compression):
    # GNU and pax forms write long and non-ASCII names in the extended headers that are checked ahead of tarfile.
    long_name = 'pretrained/' + 'nested' * 30 + '/modèle.pdparams' if form != tarfile.USTAR_FORMAT else ''
    names = [name for name in ('pretrained/model.pdparams', long_name, 'README') if name]
    archive = tmp_path / 'backbone.tar'
    with tarfile.open(archive, f'w:{compression}', format=form) as writing:
        writing.addfile(tar_member('pretrained/', kind=tarfile.DIRTYPE)[0])
        for name in names:
            info, payload = tar_member(name, name.encode() * 3)
            writing.addfile(info, io.BytesIO(payload))
    unpack_archive(str(archive), str(tmp_path / 'unpacked'))
    unpacked = {str(path.relative_to(tmp_path / 'unpacked')): path.read_bytes()
                for path in (tmp_path / 'unpacked').rglob('*') if path.is_file()}
    assert unpacked == {name: name.encode() * 3 for name in names}


@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_a_member_leaving_the_folder_is_refused(serve_archive, tmp_path, suffix):
    before = set(os.listdir(tmp_path.parent))
    member = outside(tmp_path)
    body = tar_bytes(tar_member(member, b'evil')) if suffix == '.tar.gz' else zip_bytes((member, b'evil'))
    url = serve_archive('backbone' + suffix, body)
    with refused(url, member, "a path leaving the archive's folder"):
        weights_path(url)
    assert not (tmp_path / 'escaped.pdparams').exists()
    assert_nothing_unpacked(tmp_path, before)


@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_a_member_with_an_absolute_path_is_refused(serve_archive, tmp_path, suffix):
    before = set(os.listdir(tmp_path.parent))
    member = str(tmp_path / 'escaped.pdparams')
    body = tar_bytes(tar_member(member, b'evil')) if suffix == '.tar.gz' else zip_bytes((member, b'evil'))
    url = serve_archive('backbone' + suffix, body)
    with refused(url, member, 'an absolute path'):
        weights_path(url)
    assert not (tmp_path / 'escaped.pdparams').exists()
    assert_nothing_unpacked(tmp_path, before)


@pytest.mark.parametrize('member', ['..\\..\\escaped.pdparams', 'C:/escaped.pdparams', 'pretrained\\model.pdparams'])
@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_a_member_with_a_backslash_or_drive_letter_is_refused(serve_archive, tmp_path, suffix, member):
    before = set(os.listdir(tmp_path.parent))
    body = tar_bytes(tar_member(member, b'evil')) if suffix == '.tar.gz' else zip_bytes((member, b'evil'))
    url = serve_archive('backbone' + suffix, body)
    with refused(url, member, 'a backslash or drive letter in its name'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_a_symbolic_link_is_refused(serve_archive, tmp_path, suffix):
    before = set(os.listdir(tmp_path.parent))
    if suffix == '.tar.gz':  # the link, then a file written through it
        body = tar_bytes(tar_member('pretrained', kind=tarfile.SYMTYPE, linkname=str(tmp_path)),
                         tar_member('pretrained/escaped.pdparams', b'evil'))
    else:
        body = zip_bytes(('pretrained', str(tmp_path).encode(), 0o120777), ('pretrained/escaped.pdparams', b'evil'))
    url = serve_archive('backbone' + suffix, body)
    with refused(url, 'pretrained', 'a symbolic link'):
        weights_path(url)
    assert not (tmp_path / 'escaped.pdparams').exists()
    assert_nothing_unpacked(tmp_path, before)


def test_a_hard_link_is_refused(serve_archive, tmp_path):
    before = set(os.listdir(tmp_path.parent))
    victim = tmp_path / 'victim.txt'
    victim.write_bytes(b'mine')
    # The link to a file outside, then a member of the same name whose bytes would land in that file.
    link = tar_member('model.pdparams', kind=tarfile.LNKTYPE, linkname=str(victim))
    url = serve_archive('backbone.tar.gz', tar_bytes(link, tar_member('model.pdparams', b'evil')))
    with refused(url, 'model.pdparams', 'a hard link'):
        weights_path(url)
    assert victim.read_bytes() == b'mine'
    victim.unlink()
    assert_nothing_unpacked(tmp_path, before)


def test_a_device_or_pipe_is_refused(serve_archive, tmp_path):
    before = set(os.listdir(tmp_path.parent))
    url = serve_archive('backbone.tar.gz', tar_bytes(tar_member('pretrained/pipe', kind=tarfile.FIFOTYPE)))
    with refused(url, 'pretrained/pipe', 'neither a file nor a folder'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


def test_a_zip_member_of_another_unix_type_is_refused(serve_archive, tmp_path):
    before = set(os.listdir(tmp_path.parent))
    url = serve_archive('backbone.zip', zip_bytes(('pretrained/pipe', b'', 0o010644)))
    with refused(url, 'pretrained/pipe', 'neither a file nor a folder'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_an_archive_unpacking_to_more_than_the_cap_is_refused(serve_archive, tmp_path, monkeypatch, suffix):
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', str(1 << 20))
    before = set(os.listdir(tmp_path.parent))
    members = [('pretrained/model.pdparams', bytes(1 << 19)), ('pretrained/more.pdparams', bytes((1 << 19) + 1))]
    body = tar_bytes(*(tar_member(*member) for member in members)) if suffix == '.tar.gz' else zip_bytes(*members)
    assert len(body) < 1 << 16  # zeros compress: a small download, a large unpacking
    url = serve_archive('backbone' + suffix, body)
    with refused(url, 'pretrained/more.pdparams',
                 r'the archive unpacks to more than 1048576 bytes \(EMANET_MAX_DOWNLOAD_BYTES\)'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


def test_the_bytes_written_count_against_the_cap_whatever_a_member_declares(tmp_path, monkeypatch):
    # zipfile stops at the size it declares; a reader that did not would still be stopped at the cap.
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', str(1 << 20))
    archive = tmp_path / 'backbone.zip'
    archive.write_bytes(zip_bytes(('pretrained/model.pdparams', b'weights')))
    monkeypatch.setattr(zipfile.ZipFile, 'open', lambda self, info: io.BytesIO(bytes((1 << 20) + 1)))
    with pytest.raises(DownloadError, match=r"^backbone\.zip: refusing archive member 'pretrained/model\.pdparams' "
                                            r"\(the archive unpacks to more than 1048576 bytes "
                                            r"\(EMANET_MAX_DOWNLOAD_BYTES\)\)$"):
        unpack_archive(str(archive), str(tmp_path / 'unpacked'), source='backbone.zip')
    assert sum(path.stat().st_size for path in (tmp_path / 'unpacked').rglob('*') if path.is_file()) <= 1 << 20


@pytest.mark.parametrize('suffix', ['.tar.gz', '.zip'])
def test_an_archive_of_more_than_ten_thousand_members_is_refused(serve_archive, tmp_path, suffix):
    before = set(os.listdir(tmp_path.parent))
    names = [f'pretrained/{index}.pdparams' for index in range(10001)]
    body = (tar_bytes(*(tar_member(name) for name in names)) if suffix == '.tar.gz'
            else zip_bytes(*((name, b'') for name in names)))
    url = serve_archive('backbone' + suffix, body)
    with refused(url, 'pretrained/10000.pdparams', 'the archive has more than 10000 members'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


# Headers that tarfile would trust: sizes that run backwards, and long names or pax records that it reads
# whole into memory before any member can be checked. Written by hand, as no tar writer would write them.

def octal(value):
    return b'%011o\0' % value


def base256(value):
    """A size field in GNU's base-256 form: a first byte of 0xff marks a negative number."""
    return (b'\xff' if value < 0 else b'\x80') + (value % 256 ** 11).to_bytes(11, 'big')


def raw_tar_header(name, size_field, kind=b'0'):
    """A 512-byte ustar header with ``size_field`` as its 12-byte size, and a correct checksum."""
    header = bytearray(512)
    header[0:len(name)] = name.encode()
    header[100:108] = b'0000644\0'
    header[124:136] = size_field
    header[136:148] = octal(0)
    header[148:156] = b' ' * 8  # the checksum counts its own field as spaces
    header[156:157] = kind
    header[257:265] = b'ustar\x0000'
    header[148:156] = b'%06o\0 ' % sum(header)
    return bytes(header)


def pax_record(keyword, value):
    """One "<length> <keyword>=<value>\\n" record, its length counting itself."""
    body = f' {keyword}={value}\n'
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f'{length}{body}'.encode()


def padded(data):
    return data + bytes(-len(data) % 512)


END_OF_ARCHIVE = bytes(1024)


@pytest.mark.parametrize('size_field', [base256(-1536), b'-0000003000\0'], ids=['base-256', 'octal'])
def test_a_member_with_a_negative_size_is_refused(serve_archive, tmp_path, size_field):
    before = set(os.listdir(tmp_path.parent))
    # -1536 bytes take a reader that trusts them from the data after this header back to the first header:
    # the same members again and again, each time subtracting from the running total.
    model = raw_tar_header('pretrained/model.pdparams', octal(7)) + padded(b'weights')
    back = raw_tar_header('pretrained/back.pdparams', size_field)
    url = serve_archive('backbone.tar.gz', gzip.compress(model + back + END_OF_ARCHIVE))
    with refused(url, 'pretrained/back.pdparams', 'a negative size'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


def test_a_pax_header_overriding_a_size_is_refused(serve_archive, tmp_path):
    before = set(os.listdir(tmp_path.parent))
    pax = padded(pax_record('size', -1536))
    body = (raw_tar_header('PaxHeaders/model.pdparams', octal(len(pax)), b'x') + pax
            + raw_tar_header('pretrained/model.pdparams', octal(7)) + padded(b'weights') + END_OF_ARCHIVE)
    url = serve_archive('backbone.tar.gz', gzip.compress(body))
    with refused(url, 'pretrained/model.pdparams', 'a pax header overriding its size'):
        weights_path(url)
    assert_nothing_unpacked(tmp_path, before)


def peak_memory_of(function):
    """The most memory Python had allocated at once while ``function`` ran, beyond what it held before (bytes).

    tracemalloc counts what is asked for, also pages never touched, which the process's resident size misses.
    """
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize('kind', [b'L', b'K', b'x', b'g'], ids=['long name', 'long link', 'pax', 'global pax'])
def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path, kind):
    # 400 MB declared, a hundred bytes sent: tarfile asks for the declared size at once to read it.
    archive = tmp_path / 'backbone.tar.gz'
    archive.write_bytes(gzip.compress(raw_tar_header('././@LongLink', octal(400 << 20), kind) + padded(b'x' * 100)))
    assert archive.stat().st_size < 1000
    refusals = []

    def unpack():
        with pytest.raises(DownloadError) as refusal:
            unpack_archive(str(archive), str(tmp_path / 'unpacked'), source='https://example.com/backbone.tar.gz')
        refusals.append(str(refusal.value))
    assert peak_memory_of(unpack) < 50 << 20
    assert refusals == ["https://example.com/backbone.tar.gz: refusing an archive member whose headers at byte 0 "
                        "take more than 16384 bytes (long names and pax records)"]
    assert not list((tmp_path / 'unpacked').rglob('*'))


def test_a_gzip_bomb_of_extended_headers_is_refused_early(tmp_path, monkeypatch):
    # 2000 pax headers before one member: a decompressed stream 16 times the cap, all of it headers, which
    # tarfile reads one inside the other (so deep that Python's recursion limit ends it with a traceback).
    monkeypatch.setenv('EMANET_MAX_DOWNLOAD_BYTES', str(1 << 20))
    pax = padded(pax_record('comment', 'x' * 8000))
    headers = (raw_tar_header('PaxHeaders/model.pdparams', octal(len(pax)), b'x') + pax) * 2000
    stream = headers + raw_tar_header('pretrained/model.pdparams', octal(7)) + padded(b'weights') + END_OF_ARCHIVE
    assert len(stream) > 16 << 20
    archive = tmp_path / 'backbone.tar.gz'
    archive.write_bytes(gzip.compress(stream))
    assert archive.stat().st_size < 200 << 10
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"^backbone\.tar\.gz: refusing an archive member whose headers at "
                                            r"byte 0 take more than 16384 bytes \(long names and pax records\)$"):
        unpack_archive(str(archive), str(tmp_path / 'unpacked'), source='backbone.tar.gz')
    assert time.monotonic() - start < 5
    assert not list((tmp_path / 'unpacked').rglob('*'))


# Any sequence of headers, however they lie, ends in the unpacked files or in one DownloadError, within the budgets.

SIZE_FIELDS = st.one_of(st.integers(0, 3000).map(octal), st.integers(1 << 20, 1 << 33).map(octal),
                        st.integers(-5000, -1).map(base256), st.integers(1 << 40, 1 << 80).map(base256),
                        st.just(b'-0000000100\0'), st.binary(min_size=12, max_size=12))
PAX_RECORDS = st.lists(st.sampled_from([pax_record('path', 'pretrained/model.pdparams'), pax_record('size', '-512'),
                                        pax_record('size', '99999999999'), pax_record('GNU.sparse.major', '1'),
                                        pax_record('comment', 'x' * 9000), b'99 broken']), max_size=3).map(b''.join)
HEADERS = st.tuples(st.sampled_from(['pretrained/model.pdparams', 'pretrained/', 'pretrained', '../escaped', '/abs']),
                    SIZE_FIELDS, st.sampled_from([b'0', b'\0', b'5', b'1', b'2', b'3', b'7', b'S', b'D', b'L', b'K',
                                                  b'x', b'g']),
                    st.one_of(st.binary(max_size=1500), PAX_RECORDS))


@settings(max_examples=300, deadline=None)
@given(st.lists(HEADERS, min_size=1, max_size=6), st.booleans())
def test_lying_tar_headers_end_in_files_or_one_sentence_within_the_budgets(headers, ended):
    stream = b''.join(raw_tar_header(name, size_field, kind) + padded(data) for name, size_field, kind, data in headers)
    cap = {'EMANET_MAX_DOWNLOAD_BYTES': str(1 << 16)}
    with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, cap):
        archive, unpacked = os.path.join(folder, 'backbone.tar'), os.path.join(folder, 'unpacked')
        with open(archive, 'wb') as out:
            out.write(stream + (END_OF_ARCHIVE if ended else b''))

        def unpack():
            with contextlib.suppress(DownloadError):
                unpack_archive(archive, unpacked)
        assert peak_memory_of(unpack) < 4 << 20
        written = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
        assert all(path == archive or path.startswith(unpacked + os.sep) for path in written)
        assert sum(os.path.getsize(path) for path in written if path != archive) <= 1 << 16
