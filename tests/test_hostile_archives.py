"""Downloaded archives unpack only files and folders inside their own folder, within a size and count.

Each hostile archive is served from 127.0.0.1 and asked for as weights; each is refused with one
sentence naming the archive's URL and the member, and nothing is written outside the cache.
"""
import io
import os
import re
import tarfile
import zipfile

import pytest

from conftest import Handler
from emanet.download import DownloadError, weights_path


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
