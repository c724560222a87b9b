"""Cut a GGUF model into GGUF split files laid out so identical tensors give identical bytes.

Layout (docs/bundle-format.md): split 0 holds every metadata key and no tensor; then one split per
group of `blocks_per_segment` consecutive blocks (blk.N.*); then one split per other tensor family
(token_embd, output, output_norm, ...) in name order. Tensors inside a split are in name order, and
the bytes are copied verbatim from the source, so a split depends only on its tensors and its place.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGUFReader, GGUFValueType, Keys

from edgepack.runtime.bundle_format import Digest

from .errors import PackagerError
from .gguf_info import GGUFInfo, TensorInfo

_BLOCK_RE = re.compile(r"blk\.(\d+)\.")
_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Segment:
    path: Path
    digest: Digest
    size: int
    label: str
    tensors: int


def plan(info: GGUFInfo, blocks_per_segment: int) -> list[tuple[str, list[TensorInfo]]]:
    """The ordered (label, tensors) groups; the metadata split comes first with no tensors."""
    if blocks_per_segment < 1:
        raise PackagerError(f"blocks per segment must be at least 1, got {blocks_per_segment}")
    blocks: dict[int, list[TensorInfo]] = defaultdict(list)
    others: dict[str, list[TensorInfo]] = defaultdict(list)
    for tensor in info.tensors:
        match = _BLOCK_RE.match(tensor.name)
        if match:
            blocks[int(match.group(1)) // blocks_per_segment].append(tensor)
        else:
            others[tensor.name.split(".")[0]].append(tensor)
    groups: list[tuple[str, list[TensorInfo]]] = [("metadata", [])]
    for group in sorted(blocks):
        first = group * blocks_per_segment
        last = min(first + blocks_per_segment, max(info.block_count, first + 1)) - 1
        groups.append((f"blk.{first}-{last}", sorted(blocks[group], key=lambda t: t.name)))
    for family in sorted(others):
        groups.append((family, sorted(others[family], key=lambda t: t.name)))
    return groups


def write_segments(
    info: GGUFInfo,
    out_dir: Path,
    blocks_per_segment: int,
    progress: Callable[[int], None] = lambda n: None,
) -> list[Segment]:
    """Write the splits into out_dir; `progress` gets the bytes of tensor data copied."""
    if info.is_split:
        raise PackagerError(f"{info.path}: source is itself a GGUF split; merge it with llama-gguf-split first")
    groups = plan(info, blocks_per_segment)
    total_tensors = len(info.tensors)
    segments = []
    with open(info.path, "rb") as source:
        kv_bytes = _read(source, info.kv_start, info.kv_end - info.kv_start)
        for index, (label, tensors) in enumerate(groups):
            path = out_dir / f"segment-{index:05d}.gguf"
            split_kvs = [  # the keys and types llama.cpp's gguf-split writes
                _kv(Keys.Split.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, index),
                _kv(Keys.Split.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, len(groups)),
                _kv(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, total_tensors),
            ]
            if index == 0:
                kvs, n_kv = kv_bytes + b"".join(split_kvs), info.kv_count + len(split_kvs)
            else:
                if info.alignment != GGUF_DEFAULT_ALIGNMENT:
                    split_kvs.append(_kv(Keys.General.ALIGNMENT, GGUFValueType.UINT32, info.alignment))
                kvs, n_kv = b"".join(split_kvs), len(split_kvs)
            digest, size = _write_split(source, path, kvs, n_kv, tensors, info.alignment, progress)
            segments.append(Segment(path, digest, size, label, len(tensors)))
    return segments


def _write_split(
    source, path: Path, kvs: bytes, n_kv: int, tensors: list[TensorInfo], alignment: int,
    progress: Callable[[int], None],
) -> tuple[Digest, int]:
    hasher = hashlib.sha256()
    written = 0

    def emit(out, data: bytes) -> None:
        nonlocal written
        out.write(data)
        hasher.update(data)
        written += len(data)

    header = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), n_kv)
    infos = []
    offset = 0
    for tensor in tensors:
        raw = _read(source, tensor.info_offset, tensor.info_end - tensor.info_offset)
        infos.append(raw + struct.pack("<Q", offset))
        offset += _padded(tensor.n_bytes, alignment)
    with open(path, "wb") as out:
        emit(out, header + kvs + b"".join(infos))
        emit(out, b"\0" * (_padded(written, alignment) - written))
        for tensor in tensors:
            source.seek(tensor.data_offset)
            remaining = tensor.n_bytes
            while remaining:
                chunk = source.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise PackagerError(f"{path}: source ended inside tensor {tensor.name}")
                emit(out, chunk)
                remaining -= len(chunk)
                progress(len(chunk))
            emit(out, b"\0" * (_padded(tensor.n_bytes, alignment) - tensor.n_bytes))
    return Digest(hasher.hexdigest()), written


def _kv(key: str, value_type: GGUFValueType, value: int) -> bytes:
    """One little-endian key-value record holding a number, stored as gguf-py's reader reads that type."""
    number = np.array(value, dtype=np.dtype(GGUFReader.gguf_scalar_to_np[value_type]).newbyteorder("<"))
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", value_type) + number.tobytes()


def _padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _read(source, offset: int, size: int) -> bytes:
    source.seek(offset)
    data = source.read(size)
    if len(data) != size:
        raise PackagerError("source GGUF is truncated")
    return data
