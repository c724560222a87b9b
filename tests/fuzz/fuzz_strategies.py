"""Hypothesis strategies that turn the targets' valid seeds into hostile inputs: byte mutations, JSON edits and
archive member edits. Shared by tests/fuzz/ and bench/fuzz.py (its hypothesis engine)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
from fuzz_targets import MANIFEST_NAME, SIGNATURE_NAME, member, seed_manifest, seed_members, write_bundle
from hypothesis import reject

# Bytes that parsers treat specially: NULs, sign bits, length fields near their limits, JSON and TOML syntax,
# escapes that decode to no character.
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\xff" * 8,
               b"\xff\xff\xff\x7f", b"\x01\x00\x00\x00\x00\x00\x00\x00", b'"', b"\\", b"\\ud800", b"\\u0000", b"[",
               b"{", b"]", b"}", b"-1", b"1e999", b"99999999999999999999", b"\n", b"=", b"'''", b'"""', b"\xc3",
               b"\xed\xa0\x80"]

EXTREMES = [-1, 0, 2**63, -(2**63) - 1, 1e308, "", "\x00", "sha256-" + "0" * 64]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], end: Callable[[bytes], int] | None = None) -> bytes:
    """A seed with one to four byte-level edits; `end` bounds where they land (e.g. a GGUF's header)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        limit = max(1, min(len(data), end(bytes(data)) if end else len(data)))
        pos = draw(st.integers(0, limit - 1))
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "interesting", "truncate"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(INTERESTING))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "interesting":
            value = draw(st.sampled_from(INTERESTING))
            data[pos:pos + len(value)] = value
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _slots(doc: Any, parent: Any = None, key: Any = None) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value in a JSON document; (None, None) is the document itself."""
    yield parent, key
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _slots(v, doc, k)


@st.composite
def edited_json(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A JSON seed with one to three values replaced, removed or added (unknown keys, wrong types, extremes)."""
    doc = json.loads(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        parent, key = draw(st.sampled_from(list(_slots(doc))))
        op = draw(st.sampled_from(["replace", "remove", "add"]))
        value = draw(json_values | st.sampled_from(EXTREMES))
        if parent is None:
            doc = value if op == "replace" else doc
        elif op == "replace":
            parent[key] = value
        elif op == "remove":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = value
        else:
            parent.insert(key, value)
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()


def json_inputs(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return edited_json(seeds) | mutated(seeds) | st.binary(max_size=64)


_NAMES = [MANIFEST_NAME, SIGNATURE_NAME, "../../escape.txt", "/etc/passwd", "blobs/", "./manifest.json", "blobs//x",
          "blobs/sha256-" + "0" * 64 + ".zst", "x" * 200, "manifest.json/", ""]
_TYPES = [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
          tarfile.GNUTYPE_SPARSE, b"V", b"\x00"]


@st.composite
def edited_bundles(draw: st.DrawFn) -> bytes:
    """The seed bundle with members dropped, repeated, reordered, renamed, retyped or their bytes edited,
    written as ustar, GNU or pax."""
    members = seed_members(signed=draw(st.booleans()))
    manifest_seed = [seed_manifest().to_json()]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(members) - 1))
        info, data = members[i]
        op = draw(st.sampled_from(["drop", "repeat", "swap", "rename", "retype", "data"]))
        if op == "drop":
            del members[i]
        elif op == "repeat":
            members.insert(draw(st.integers(0, len(members))), members[i])
        elif op == "swap":
            j = draw(st.integers(0, len(members) - 1))
            members[i], members[j] = members[j], members[i]
        elif op == "rename":
            members[i] = member(draw(st.sampled_from(_NAMES) | st.text(max_size=20)), data)
        elif op == "retype":
            renamed, _ = member(info.name, b"", draw(st.sampled_from(_TYPES)))
            renamed.linkname = draw(st.sampled_from(["/etc/passwd", "manifest.json", "../x"]))
            members[i] = (renamed, b"")
        elif info.name == MANIFEST_NAME:
            members[i] = member(info.name, draw(edited_json(manifest_seed) | mutated(manifest_seed)))
        else:
            members[i] = member(info.name, draw(mutated([data])))
        if not members:
            break
    try:
        return write_bundle(members, draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                                          tarfile.PAX_FORMAT])))
    except (ValueError, UnicodeError):  # a name this format cannot hold
        reject()


def bundle_inputs(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return edited_bundles() | mutated(seeds) | st.binary(max_size=1536)
