"""The bundle archive: PAX tar members (a blob may pass USTAR's 8 GiB), published whole after an fsync."""

from __future__ import annotations

import io
import os
import tarfile
from types import SimpleNamespace

import pytest

from edgepack.packager import bundle_writer
from edgepack.runtime.bundle_format import MANIFEST_NAME, BlobInfo, Digest

USTAR_LIMIT = 8**11  # 8 GiB: the first size a USTAR header's 11 octal digits cannot hold
MTIME = 1_700_000_000
MANIFEST = SimpleNamespace(to_json=lambda: b'{"name": "tiny"}')  # the writer only serializes it


def blob(tmp_path, data: bytes, zsize: int | None = None) -> bundle_writer.CompressedBlob:
    path = tmp_path / f"{len(data)}.zst"
    path.write_bytes(data)
    info = BlobInfo(size=len(data), zsize=zsize if zsize is not None else len(data))
    return bundle_writer.CompressedBlob(Digest.of_bytes(data), info, path)


def test_bundles_that_fit_ustar_are_byte_identical_to_ustar(tmp_path):
    blobs = [blob(tmp_path, b"a" * 1000), blob(tmp_path, b"b" * 513)]
    out = tmp_path / "x.edgepack"
    size = bundle_writer.write_archive(out, MANIFEST, blobs, MTIME)

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in [(MANIFEST_NAME, MANIFEST.to_json())] + [(b.digest.member_name, b.path.read_bytes())
                                                                    for b in blobs]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            archive.addfile(info, io.BytesIO(data))
    assert out.read_bytes() == expected.getvalue()
    assert size == out.stat().st_size
    assert not out.with_name("x.edgepack.partial").exists()


def test_a_member_past_ustars_limit_gets_a_pax_size_the_streaming_reader_reads(tmp_path, monkeypatch):
    with pytest.raises(ValueError):  # why PAX: USTAR cannot say this size
        bundle_writer._member("big", USTAR_LIMIT, MTIME).tobuf(tarfile.USTAR_FORMAT)
    big = blob(tmp_path, b"z" * 10, zsize=USTAR_LIMIT)
    out = tmp_path / "big.edgepack"
    copy = tarfile.copyfileobj

    def copy_but_the_big_one(src, dst, length=None, *args, **kwargs):  # its header is what matters, not 8 GiB
        if length != USTAR_LIMIT:
            copy(src, dst, length, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tarfile, "copyfileobj", copy_but_the_big_one)
        bundle_writer.write_archive(out, MANIFEST, [big], MTIME)

    with open(out, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:  # as runtime/store.py reads
        assert archive.next().name == MANIFEST_NAME
        member = archive.next()
    assert member.name == big.digest.member_name
    assert member.isreg() and member.size == USTAR_LIMIT


def test_the_bundle_is_synced_before_the_rename_publishes_it(tmp_path, monkeypatch):
    out = tmp_path / "x.edgepack"
    events: list[tuple[str, object]] = []
    real_replace = os.replace

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)))
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(bundle_writer, "fsync_dir", lambda path: events.append(("fsync folder", path)))
    size = bundle_writer.write_archive(out, MANIFEST, [blob(tmp_path, b"a" * 1000)], MTIME)
    assert events == [("fsync", size), ("rename", "x.edgepack"), ("fsync folder", tmp_path)]
