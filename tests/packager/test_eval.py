"""`edgepack eval`'s reference pass: computed once, shared by candidates, the same figures block by block,
and the same as llama.cpp's own llama-perplexity where that tool is built (native/build-llama-tools.sh)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgepack.packager import evaluate, quant_types, quantize
from edgepack.packager.errors import PackagerError

TEXT = evaluate.default_text("eval")
LLAMA_PERPLEXITY = Path(__file__).parents[2] / "native" / "out" / "llama.cpp-build" / "bin" / "llama-perplexity"


@pytest.fixture(scope="module")
def q4(tiny_gguf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q4") / "q4.gguf"
    quantize.quantize(tiny_gguf, path, quant_types.parse("Q4_0"))
    return path


def test_one_reference_serves_every_candidate_with_the_figures_of_a_single_comparison(tiny_gguf, q4, tmp_path):
    with evaluate.Reference([tiny_gguf], TEXT, max_chunks=2, scratch=tmp_path) as reference:
        assert len(list(tmp_path.iterdir())) <= 1  # one scratch file at most (unnamed where the OS allows)
        first = reference.compare([q4])
        same = reference.compare([tiny_gguf])
        one_chunk = reference.compare([q4], max_chunks=1)
    assert first == evaluate.compare_text([tiny_gguf], [q4], TEXT, max_chunks=2)
    assert same.kld_mean == 0 and same.top1_agreement == 1 and same.ppl_candidate == first.ppl_reference
    assert one_chunk.tokens == 255 and one_chunk.chunks == 1 and first.tokens == 510
    assert list(tmp_path.iterdir()) == []  # the scratch file goes with the reference


def test_rows_compared_in_small_blocks_give_the_same_figures(tiny_gguf, q4, monkeypatch):
    whole = evaluate.compare_text([tiny_gguf], [q4], TEXT, max_chunks=2)
    monkeypatch.setattr(evaluate, "_BLOCK_VALUES", 7 * 320)  # 7 rows of the tiny vocabulary: ragged last block
    blocks = evaluate.compare_text([tiny_gguf], [q4], TEXT, max_chunks=2)
    assert blocks == whole  # every row is reduced on its own, however many share a block


def test_a_reference_that_does_not_fit_the_disk_is_refused_before_it_is_written(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    with pytest.raises(PackagerError, match=r"need 10 MiB in .*, which has 1 MiB free: score fewer chunks"):
        evaluate.Reference([tiny_gguf], TEXT * 4, max_chunks=32, scratch=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not LLAMA_PERPLEXITY.exists(), reason="llama-perplexity not built (native/build-llama-tools.sh)")
def test_figures_match_llama_perplexity(tiny_gguf, q4, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    base = tmp_path / "base.bin"
    common = ["-c", "512", "--chunks", "2", "-t", "2", "-tb", "2"]
    run = [str(LLAMA_PERPLEXITY), "-m", str(tiny_gguf), "-f", str(text), "--kl-divergence-base", str(base), *common]
    subprocess.run(run, check=True, capture_output=True)
    done = subprocess.run([str(LLAMA_PERPLEXITY), "-m", str(q4), "--kl-divergence-base", str(base),
                           "--kl-divergence", *common], check=True, capture_output=True, text=True)
    log = done.stdout + done.stderr

    def number(pattern: str) -> float:
        found = re.search(pattern, log)
        assert found, log[-3000:]
        return float(found.group(1))

    ours = evaluate.compare_text([tiny_gguf], [q4], TEXT, max_chunks=2)
    assert ours.tokens == 510
    assert ours.ppl_candidate == pytest.approx(number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"), rel=1e-5)
    # llama-perplexity keeps the reference's log-probs in 16 bits: its KLD moves by up to ~1%
    assert ours.kld_mean == pytest.approx(number(r"Mean\s+KLD:\s*(-?[0-9.]+)"), rel=0.01)
    assert ours.kld_p99 == pytest.approx(number(r"99\.0%\s+KLD:\s*(-?[0-9.]+)"), rel=0.01)
    assert ours.top1_agreement == pytest.approx(number(r"Same top p:\s*([0-9.]+)") / 100, abs=1e-4)
