"""Fuzzing the GGUF files llama.cpp loads: mutated tiny models, loaded and decoded in a worker process.

llama.cpp is not ours to fix: a file that kills it is reported upstream, and is why the store checks every blob's
sha256 against the (signed) manifest before llama.cpp sees it (docs/bundle-format.md, "Trust boundary"). The
mutation test tolerates the crashes already reported (fuzz_targets.KNOWN_UPSTREAM) and fails on any other.
"""

from __future__ import annotations

import struct

import fuzz_targets as targets
import pytest
import zstandard
from fuzz_strategies import mutated
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepack.runtime.bundle_format import Digest
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    return targets.seed_gguf(tmp_path_factory.mktemp("gguf") / "seed.gguf").read_bytes()


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    loader = targets.GgufLoader(tmp_path_factory.mktemp("gguf-load"))
    yield loader
    loader.close()


def test_the_seed_loads_and_decodes(loader, seed):
    assert loader.load(seed) == "ok"


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_mutated_ggufs_are_loaded_or_refused(loader, seed, data):
    end = targets.gguf_data_offset(seed)  # the metadata and tensor table: what llama.cpp parses
    loader(data.draw(mutated([seed], end=lambda _data: end)))  # raises on a crash not in KNOWN_UPSTREAM


def _set_value(seed: bytes, key: str, value: bytes) -> bytes:
    """The GGUF with the (4-byte) value of a metadata key replaced."""
    name = len(key).to_bytes(8, "little") + key.encode()
    at = seed.index(name) + len(name) + 4  # after the key: its value type, then the value
    return seed[:at] + value + seed[at + len(value):]


def _duplicate_token(seed: bytes) -> bytes:
    return seed.replace("\u2581the".encode(), "\u2581you".encode(), 1)  # "▁you" is a token already


CRASHERS = {
    "block count": lambda seed: _set_value(seed, "llama.block_count", struct.pack("<I", 0)),
    "duplicate token": _duplicate_token,
    # Passes loading; the first decode's RMS norm asserts (NaN does the same).
    "negative norm epsilon": lambda seed: _set_value(seed, "llama.attention.layer_norm_rms_epsilon",
                                                     struct.pack("<f", -1e-5)),
    # 2 + 2**27 KV heads of 32 dims: head_dim * n_head_kv wraps around 32 bits to the tensors' true 64, so the
    # shapes check out, and a reshape by the real head count asserts.
    "head count overflow": lambda seed: _set_value(seed, "llama.attention.head_count_kv",
                                                   struct.pack("<I", 2 + 2**27)),
}


@pytest.mark.xfail(strict=True, raises=targets.GgufCrash,
                   reason="llama.cpp aborts (SIGABRT) on these GGUFs: an upstream bug (targets.KNOWN_UPSTREAM); "
                          "when a llama.cpp upgrade fixes one, drop it there and in docs/bundle-format.md")
@pytest.mark.parametrize("finding", list(CRASHERS))
def test_llama_cpp_refuses_without_crashing(finding, loader, seed):
    try:
        loader.load(CRASHERS[finding](seed))
    except targets.GgufCrash as crash:
        assert targets.KNOWN_UPSTREAM[finding] in str(crash)
        raise


@pytest.mark.parametrize("finding", list(CRASHERS))
def test_a_crashing_gguf_never_reaches_llama_cpp_through_the_store(finding, seed, tmp_path):
    """The trust boundary: a segment altered after the manifest named its digest is refused at install."""
    good, bad = seed, CRASHERS[finding](seed)
    digest = Digest.of_bytes(good)
    manifest = targets.seed_manifest()
    doc = targets.json.loads(manifest.to_json())
    old_segment = doc["models"][0]["segments"][0]
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(bad)
    doc["blobs"][str(digest)] = {"size": len(good), "zsize": len(frame), "media_type": doc["blobs"][old_segment][
        "media_type"]}
    del doc["blobs"][old_segment]
    doc["models"][0]["segments"] = [str(digest)]
    members = [targets.member("manifest.json", targets.json.dumps(doc).encode()),
               targets.member(digest.member_name, frame)]
    members += [m for m in targets.seed_members()[1:] if m[0].name != Digest.parse(old_segment).member_name]
    bundle = tmp_path / "altered.edgepack"
    bundle.write_bytes(targets.write_bundle(members))
    store = Store(tmp_path / "store")
    with pytest.raises(EdgepackError, match=f"blob {digest} is corrupt"):
        store.install(bundle)
    assert not store.root.exists()
