"""Fuzzing `edgepack install`'s reader (tar, manifest, signature, zstd frames): hostile bundles are refused in one
line and leave the store byte-identical; accepted ones leave only blobs that hash to their names."""

from __future__ import annotations

import tarfile
import time

import fuzz_targets as targets
import pytest
import zstandard
from fuzz_strategies import bundle_inputs
from hypothesis import given, settings

from edgepack.runtime.bundle_format import MAX_PAX_HEADER_BYTES, Digest
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store

SEEDS = targets.seeds()


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> targets.BundleInstall:
    return targets.BundleInstall(tmp_path_factory.mktemp("fuzz-bundle"))


@settings(max_examples=150, deadline=5000, derandomize=True, database=None)
@given(data=bundle_inputs(SEEDS["bundle"]))
def test_hostile_bundles_are_refused_and_leave_the_store_unchanged(install, data):
    install(data)


# ---- what fuzzing found, kept: each crashed or hung CPython's tarfile under Store.install -------------------------

def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT if kind == tarfile.GNUTYPE_LONGNAME else tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _pax(*records: bytes) -> bytes:
    body = b""
    for record in records:
        body += b"%d %s\n" % (len(record) + 2 + len(str(len(record) + 3)), record)
    return _header("pax", tarfile.XHDTYPE, len(body)) + _padded(body)


def _manifest_after(prefix: bytes) -> bytes:
    return prefix + _header("manifest.json", tarfile.REGTYPE, 0) + b"\0" * 1024


HEADER_CASES = {
    # Each extended header made tarfile parse the next one recursively: RecursionError escaped.
    "chained pax headers": (_manifest_after(_pax(b"path=manifest.json") * 1200), "chained too deep"),
    "GNU long name": (_manifest_after(_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 13) +
                                      _padded(b"manifest.json")), "GNU long name header, refused"),
    # A GNU sparse map in a pax header: int() of its numbers raised ValueError out of tarfile.
    "sparse map 0.1": (_manifest_after(_pax(b"GNU.sparse.map=1,x")), "GNU sparse member, refused"),
    "sparse map 1.0": (_pax(b"GNU.sparse.major=1", b"GNU.sparse.minor=0") +
                       _header("manifest.json", tarfile.REGTYPE, 512) + _padded(b"zz\n"), "GNU sparse member, refused"),
    # hdrcharset's value was decoded as strict UTF-8: UnicodeDecodeError escaped.
    "undecodable hdrcharset": (_manifest_after(_pax(b"hdrcharset=\xff\xfe")), "unreadable archive"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_tar_headers_are_refused(case, install, tmp_path):
    data, expected = HEADER_CASES[case]
    bundle = tmp_path / "hostile.edgepack"
    bundle.write_bytes(data)
    with pytest.raises(EdgepackError, match=expected):
        Store(tmp_path / "store").install(bundle)
    assert not (tmp_path / "store").exists()
    install(data)  # and into a store with a release: unchanged


def test_a_large_pax_header_is_refused_before_tarfile_parses_it(tmp_path):
    # CPython < 3.11.10 parses pax records with a backtracking regex (CVE-2024-6232): 80 KB of records with one
    # '=' at the end took a second, 1 MB minutes. The reader refuses any pax header above its limit unparsed.
    body = b"4 xx" * (MAX_PAX_HEADER_BYTES // 2) + b"=\n"
    bundle = tmp_path / "slow.edgepack"
    bundle.write_bytes(_manifest_after(_header("pax", tarfile.XHDTYPE, len(body)) + _padded(body)))
    started = time.monotonic()
    with pytest.raises(EdgepackError, match=f"pax header of {len(body)} bytes, refused"):
        Store(tmp_path / "store").install(bundle)
    assert time.monotonic() - started < 1


def test_a_zstd_frame_asking_for_a_huge_window_is_refused_without_allocating_it(install, tmp_path):
    # A frame's header names the window its decoder must hold; the reader caps it (store._MAX_ZSTD_WINDOW).
    content = targets.BLOBS[b"segment"]
    window_256mib = bytes([0x00, 18 << 3])  # no content size, not single-segment; window log 10 + 18
    raw_last_block = ((len(content) << 3) | 1).to_bytes(3, "little")
    frame = b"\x28\xb5\x2f\xfd" + window_256mib + raw_last_block + content
    uncapped = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    assert uncapped.decompressobj().decompress(frame) == content  # a valid frame, for a decoder that allows it
    digest = Digest.of_bytes(content)
    members = targets.seed_members()
    doc = targets.json.loads(members[0][1])
    doc["blobs"][str(digest)]["zsize"] = len(frame)
    members[0] = targets.member("manifest.json", targets.json.dumps(doc).encode())
    members[[m[0].name for m in members].index(digest.member_name)] = targets.member(digest.member_name, frame)
    bundle = tmp_path / "window.edgepack"
    bundle.write_bytes(targets.write_bundle(members))
    with pytest.raises(EdgepackError, match="too much memory"):
        Store(tmp_path / "store").install(bundle)
    install(bundle.read_bytes())
