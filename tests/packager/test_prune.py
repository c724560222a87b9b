"""Pruning with a size target: blocks dropped first, the freed bytes spent on the rest by the plan."""

from __future__ import annotations

import tarfile

import gguf
from conftest import build_bundle, stops_recorded

from edgepack.packager import compress, evaluate, gguf_info, prune, quant_types, quantize
from edgepack.runtime.bundle_format import Manifest

TARGET = int(1.4 * 2**20)


def manifest_model(bundle):
    with tarfile.open(bundle) as archive:
        return Manifest.from_json(archive.extractfile("manifest.json").read()).models[0]


def mean_bits(plan: dict) -> float:
    """Mean bits per weight of the planned block tensors (every block has the same shapes)."""
    bits = []
    for name, type_name in plan["tensors"].items():
        if name.startswith("blk."):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
            bits.append(8 * size / block)
    return sum(bits) / len(bits)


def test_renamed_follows_llama_cpp_renumbering(tiny_gguf, tmp_path):
    out = tmp_path / "pruned.gguf"
    quantize.quantize(tiny_gguf, out, quant_types.parse("Q8_0"), prune_layers=[1])
    expected = [prune.renamed(t.name, [1]) for t in gguf_info.read(tiny_gguf).tensors]
    assert sorted(n for n in expected if n is not None) == sorted(t.name for t in gguf_info.read(out).tensors)
    assert prune.renamed("blk.2.ffn_up.weight", [0, 1]) == "blk.0.ffn_up.weight"
    assert prune.renamed("blk.1.ffn_up.weight", [1]) is None and prune.renamed("output.weight", [1]) == "output.weight"


def test_prune_and_target_size_combine_and_the_freed_bytes_go_to_the_rest(tiny_gguf, tmp_path):
    both = manifest_model(build_bundle(tiny_gguf, tmp_path / "both.edgepack", prune="1", target_size=TARGET))
    alone = manifest_model(build_bundle(tiny_gguf, tmp_path / "plan.edgepack", target_size=TARGET, no_eval=True))
    assert len(both.quality["pruned_layers"]) == 1 and "kld_mean" in both.quality
    assert TARGET * 0.97 <= both.plan["size"] <= TARGET
    assert {n.split(".")[1] for n in both.plan["tensors"] if n.startswith("blk.")} == {"0", "1", "2"}
    assert mean_bits(both.plan) > mean_bits(alone.plan)  # 3 blocks in the bytes of 4


def test_dropping_blocks_keeps_every_other_tensor_as_it_was(tiny_gguf, tmp_path):
    mixed = tmp_path / "q4km.gguf"
    quantize.quantize(tiny_gguf, mixed, quant_types.parse("Q4_K_M"))  # llama.cpp's mix: several types by layer
    source = gguf_info.read(mixed)
    out = compress._without_blocks(source, [1], tmp_path / "pruned.gguf", threads=2)
    before = {prune.renamed(t.name, [1]): (t.type_name, t.n_bytes) for t in source.tensors}
    after = {t.name: (t.type_name, t.n_bytes) for t in gguf_info.read(out).tensors}
    assert after == {name: kept for name, kept in before.items() if name is not None}
    assert len(set(t.type_name for t in source.tensors)) >= 3


def test_block_influence_stops_after_the_last_block_with_the_same_scores(tiny_gguf, monkeypatch):
    text = evaluate.default_text("calibration")
    observe = prune._Influence.observe
    with stops_recorded(monkeypatch, prune._Influence) as stops:
        cut = prune.block_influence([tiny_gguf], text, n_layer=4)
    assert stops == [b"l_out-3", b"l_out-3"]  # each chunk stops after the last block: no output projection
    monkeypatch.setattr(prune._Influence, "observe", lambda self, *args: observe(self, *args) or True)
    full = prune.block_influence([tiny_gguf], text, n_layer=4)
    assert cut[1:] == full[1:] and str(cut[0]) == str(full[0])  # block 0: no input seen on the tiny model (nan)
