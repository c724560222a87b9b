"""Install, skip, rollback, and refusal of corrupted or hostile bundles with the store left untouched."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from conftest import build_bundle, run_cli
from store_snapshot import snapshot

from edgepack.runtime.bundle_format import Digest, Manifest
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store


def members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as archive:
        return [(m, archive.extractfile(m).read()) for m in archive.getmembers()]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for info, data in entries:
            info = tarfile.TarInfo(info) if isinstance(info, str) else info
            if info.isreg():
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return path


def test_install_writes_read_only_blobs_and_switches_current(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    result = store.install(tiny_bundle)
    manifest = store.manifest()
    assert store.release_id() == result.release
    assert result.blobs_written == len(manifest.blobs) and result.blobs_skipped == 0
    for digest, blob in manifest.blobs.items():
        path = store.blob_path(digest)
        assert path.stat().st_size == blob.size
        assert Digest.of_bytes(path.read_bytes()) == digest
        assert not path.stat().st_mode & 0o222
    assert not any(p.name.startswith(".staging") for p in store.root.iterdir())


def test_second_bundle_skips_present_blobs_and_rollback_switches_back(tiny_gguf, tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    first = store.install(tiny_bundle)
    # Same model, another version and chat template: every segment is already in the store.
    second_bundle = build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny", bundle_version=2,
                                 chat_template="chatml")
    second = store.install(second_bundle)
    assert second.blobs_written == 0 and second.blobs_skipped == len(second.manifest.blobs)
    assert store.release_id("current") == second.release
    assert store.release_id("previous") == first.release
    result = run_cli("rollback", "--store", str(store.root))
    assert result.returncode == 0, result.stderr
    assert store.release_id("current") == first.release
    assert store.release_id("previous") == second.release


def test_reinstalling_the_current_release_is_a_no_op(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    before = snapshot(store.root)
    assert store.install(tiny_bundle).already_current
    assert snapshot(store.root) == before


def test_rollback_without_previous_release_fails_cleanly(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    result = run_cli("rollback", "--store", str(store.root))
    assert result.returncode == 1
    assert "no previous release" in result.stderr


def _flip_bit_in_first_blob(entries):
    info, data = entries[1]
    middle = len(data) // 2
    entries[1] = (info, data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    return entries


def _wrong_digest(entries):
    """The manifest names a digest that the blob's content does not have (sizes all right)."""
    manifest = json.loads(entries[0][1])
    old = next(iter(manifest["blobs"]))
    new = "sha256-" + "0" * 64
    text = entries[0][1].decode().replace(old, new)
    renamed = []
    for info, data in entries[1:]:
        if info.name == f"blobs/{old}.zst":
            info = tarfile.TarInfo(f"blobs/{new}.zst")
        renamed.append((info, data))
    return [(tarfile.TarInfo("manifest.json"), text.encode())] + renamed


def _extra_member(entries):
    return entries + [(tarfile.TarInfo("blobs/evil.sh"), b"#!/bin/sh\nrm -rf /\n")]


def _path_traversal(entries):
    return entries[:1] + [(tarfile.TarInfo("../../escape.txt"), b"pwned")] + entries[1:]


def _symlink_member(entries):
    info, _ = entries[1]
    link = tarfile.TarInfo(info.name)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [entries[0], (link, b"")] + entries[2:]


def _oversized_member(entries):
    info, data = entries[1]
    return [entries[0], (tarfile.TarInfo(info.name), data + b"\0" * 4096)] + entries[2:]


def _decompression_bomb(entries):
    """A member whose zstd frame inflates far beyond the size the manifest declares."""
    manifest = json.loads(entries[0][1])
    info, _ = entries[1]
    digest = info.name.removeprefix("blobs/").removesuffix(".zst")
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (manifest["blobs"][digest]["size"] + (1 << 20)))
    manifest["blobs"][digest]["zsize"] = len(bomb)
    return [(tarfile.TarInfo("manifest.json"), json.dumps(manifest).encode()), (tarfile.TarInfo(info.name), bomb)] \
        + entries[2:]


def _garbage_manifest(entries):
    return [(tarfile.TarInfo("manifest.json"), b"\x00{not json")] + entries[1:]


def _manifest_wrong_types(entries):
    manifest = json.loads(entries[0][1])
    manifest["models"][0]["segments"] = "all of them"
    return [(tarfile.TarInfo("manifest.json"), json.dumps(manifest).encode())] + entries[1:]


def _manifest_edited(edit):
    """A manifest changed by `edit(doc)` (as a hand edit or a buggy builder would), blobs as they were."""
    def mutate(entries):
        manifest = json.loads(entries[0][1])
        edit(manifest)
        return [(tarfile.TarInfo("manifest.json"), json.dumps(manifest).encode())] + entries[1:]
    return mutate


def _agent_sampling(sampling):
    def edit(manifest):
        model = manifest["models"][0]["name"]
        manifest["agents"] = [{"name": "helper", "model": model, "sampling": sampling}]
    return edit


def _manifest_not_first(entries):
    return entries[1:] + entries[:1]


def _missing_blob(entries):
    return entries[:-1]


def _duplicate_member(entries):
    return entries + [entries[1]]


HOSTILE = {
    "bit flip in a blob": (_flip_bit_in_first_blob, "corrupt"),
    "wrong digest": (_wrong_digest, "corrupt"),
    "extra member": (_extra_member, "unexpected archive member 'blobs/evil.sh'"),
    "path traversal": (_path_traversal, "unexpected archive member '../../escape.txt'"),
    "symlink member": (_symlink_member, "link or special file"),
    "oversized member": (_oversized_member, "manifest declares"),
    "decompression bomb": (_decompression_bomb, "beyond its declared"),
    "garbage manifest": (_garbage_manifest, "not valid JSON"),
    "manifest with wrong types": (_manifest_wrong_types, "models[0].segments"),
    # Each of these used to install, then every request to the agent failed with a 500.
    "unknown sampling key": (_manifest_edited(_agent_sampling({"temprature": 0.2})),
                             "agents[0].sampling: unknown field temprature"),
    "float top_k": (_manifest_edited(_agent_sampling({"top_k": 2.5})), "agents[0].sampling.top_k: expected int"),
    "unknown manifest field": (_manifest_edited(lambda m: m.update(signature="x")), "unknown field signature"),
    "manifest not first": (_manifest_not_first, "first archive member must be manifest.json"),
    "missing blob": (_missing_blob, "neither in the bundle nor in the store"),
    "duplicate member": (_duplicate_member, "duplicate archive member"),
}


@pytest.mark.parametrize("fresh_store", [True, False], ids=["fresh-store", "store-with-release"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bundle_is_refused_and_store_unchanged(case, fresh_store, tiny_bundle, tiny_gguf, tmp_path):
    mutate, expected = HOSTILE[case]
    store_dir = tmp_path / "store"
    if not fresh_store:
        # An older release of another model is installed, so the hostile one must not touch it.
        other = build_bundle(tiny_gguf, tmp_path / "other.edgepack", quant="Q4_0", name="other")
        Store(store_dir).install(other)
    hostile = write_tar(tmp_path / "hostile.edgepack", mutate(members(tiny_bundle)))
    before = snapshot(store_dir)
    result = run_cli("install", str(hostile), "--store", str(store_dir))
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(store_dir) == before
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("cut", [0.001, 0.5, 0.999])
def test_truncated_bundle_is_refused(cut, tiny_bundle, tmp_path):
    data = tiny_bundle.read_bytes()
    truncated = tmp_path / "cut.edgepack"
    truncated.write_bytes(data[: int(len(data) * cut)])
    store = Store(tmp_path / "store")
    with pytest.raises(EdgepackError) as err:
        store.install(truncated)
    assert "truncated" in str(err.value) or "first archive member" in str(err.value)
    assert not store.root.exists()


def test_not_a_bundle_at_all(tmp_path):
    junk = tmp_path / "junk.edgepack"
    junk.write_bytes(os.urandom(4096))
    result = run_cli("install", str(junk), "--store", str(tmp_path / "store"))
    assert result.returncode == 1 and "not an edgepack bundle" in result.stderr
    assert not (tmp_path / "store").exists()


def test_manifest_round_trips(tiny_bundle):
    with tarfile.open(tiny_bundle) as archive:
        raw = archive.extractfile("manifest.json").read()
    manifest = Manifest.from_json(raw)
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("text", ["sha256-" + "A" * 64, "sha256-abc", "md5-" + "0" * 64, "", "sha256-" + "0" * 65])
def test_digest_rejects_malformed(text):
    with pytest.raises(EdgepackError):
        Digest.parse(text)


def test_digest_accepts_both_separators():
    assert Digest.parse("sha256:" + "ab" * 32) == Digest.parse("sha256-" + "ab" * 32)
    assert str(Digest.parse("sha256:" + "ab" * 32)) == "sha256-" + "ab" * 32
