"""GGUF split segments: the byte layout is pinned, since a segment's digest is its address in every store and
every delta bundle (a changed layout would make each update ship every segment again)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgepack.packager import gguf_info, segment

# sha256 of each segment of source() with blocks_per_segment=2, as edgepack has always written them (the source
# itself comes from gguf-py's writer, pinned in pyproject.toml)
PINNED = {
    32: [
        "9c9fadeb00a8f38ab186b6bcdd5a9a69dac82808e9c917a319f4e4d504e57a1f",
        "c45f5486809301ff38d375c6fcaee780b76e8a627e1837d4c69e90eeef5f3acb",
        "1ab46e716f3afe1b40c591e6164e98bf95d79b1b9a426dd220e458e355ddc812",
        "e71e9fcb7a1d1cf1214f2a3a242c25e0ab03a93c217189421646bbc853e9e5bf",
        "d47a760d39ac27fdad5d7ff74010b60742f1952787de0b7570b11ec15e215d24",
    ],
    64: [
        "ccd84c2273da3754ed5b9a3530dde7960f2c5c00f9fd377aaa811be19c1853c1",
        "71877c5c2c7a4086e0826df042332e6fa6b1c109630770b06f0887cbbb3a4e90",
        "a90a3bbb919261b29555d9a7a600c1ead76bd774094b81226b32eca0e1efd9ff",
        "211ea7861ca3359e6b284203b9b0ae5437903bcb835606f15ed75541b9ecdd4c",
        "12f67d65c7a99735b81a99aa45cc9e7660750c8e7ffae200edd0c0cbc7536d32",
    ],
}


def source(path, alignment: int | None) -> gguf_info.GGUFInfo:
    """A small llama-shaped GGUF with fixed values (no random stream): 3 blocks, odd-sized tensors that need
    padding, and metadata of several types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("pinned")
    writer.add_block_count(3)
    writer.add_context_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["<unk>", "a", "b"])

    def values(n: int, dtype: type = np.float32) -> np.ndarray:
        return (np.arange(n, dtype=np.float32) / n).astype(dtype)

    writer.add_tensor("token_embd.weight", values(3 * 8, np.float16).reshape(3, 8))
    writer.add_tensor("output_norm.weight", values(5))  # 20 bytes: padded
    for block in range(3):
        writer.add_tensor(f"blk.{block}.attn_q.weight", (values(64) + block).reshape(8, 8))
        writer.add_tensor(f"blk.{block}.attn_norm.weight", values(7 + block))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_info.read(path)


@pytest.mark.parametrize("alignment", sorted(PINNED))
def test_segment_bytes_are_unchanged(tmp_path, alignment):
    info = source(tmp_path / "model.gguf", None if alignment == 32 else alignment)
    segments = segment.write_segments(info, tmp_path, blocks_per_segment=2)
    assert [s.label for s in segments] == ["metadata", "blk.0-1", "blk.2-2", "output_norm", "token_embd"]
    assert [s.digest.hex for s in segments] == PINNED[alignment]


@pytest.mark.parametrize("alignment", sorted(PINNED))
def test_segments_are_gguf_splits_with_the_split_keys(tmp_path, alignment):
    info = source(tmp_path / "model.gguf", None if alignment == 32 else alignment)
    segments = segment.write_segments(info, tmp_path, blocks_per_segment=2)
    for index, seg in enumerate(segments):
        data = seg.path.read_bytes()
        assert data[:8] == b"GGUF\x03\x00\x00\x00"  # magic, version 3
        assert len(data) == seg.size and len(data) % alignment == 0
        fields = gguf.GGUFReader(seg.path).fields
        keys = {"split.no": (gguf.GGUFValueType.UINT16, index), "split.count": (gguf.GGUFValueType.UINT16, 5),
                "split.tensors.count": (gguf.GGUFValueType.INT32, len(info.tensors))}
        if alignment != 32:  # every split states a non-default alignment: split 0 copies it, the others add it
            keys["general.alignment"] = (gguf.GGUFValueType.UINT32, alignment)
        for key, (kind, value) in keys.items():
            assert (fields[key].types[0], fields[key].contents()) == (kind, value), key
        if index == 0:
            assert fields["general.name"].contents() == "pinned" and seg.tensors == 0
        else:
            assert "general.name" not in fields and seg.tensors > 0
