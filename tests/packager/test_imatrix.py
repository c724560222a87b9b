"""The importance matrix: the output projection's statistics taken from its input without computing it give
the same matrix as a full evaluation, and the same as llama.cpp's own llama-imatrix where that is built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import stops_recorded

from edgepack.packager import evaluate, imatrix

TEXT = evaluate.default_text("calibration")
LLAMA_IMATRIX = Path(__file__).parents[2] / "native" / "out" / "llama.cpp-build" / "bin" / "llama-imatrix"


def assert_same(a: imatrix.Imatrix, b: imatrix.Imatrix, rtol: float) -> None:
    assert set(a.sums) == set(b.sums) and a.counts == b.counts
    for name in a.sums:
        np.testing.assert_allclose(a.mean_squares(name), b.mean_squares(name), rtol=rtol, err_msg=name)


def test_skipping_the_output_projection_leaves_the_matrix_unchanged(tiny_gguf, monkeypatch):
    with stops_recorded(monkeypatch, imatrix._Collector) as stops:
        cut = imatrix.collect([tiny_gguf], TEXT, max_chunks=3)
    assert stops == [b"result_norm"] * 3  # every chunk stops at the final norm (after a short uncounted pass)
    # never learning which weight the final norm feeds: every chunk evaluated in full, as before
    never = property(lambda self: None, lambda self, value: None)
    monkeypatch.setattr(imatrix._Collector, "output", never, raising=False)
    full = imatrix.collect([tiny_gguf], TEXT, max_chunks=3)
    assert "output.weight" in cut.sums and cut.counts["output.weight"] == 3 * 512
    assert_same(cut, full, rtol=0)


@pytest.mark.skipif(not LLAMA_IMATRIX.exists(), reason="llama-imatrix not built (native/build-llama-tools.sh)")
def test_matrix_matches_llama_imatrix(tiny_gguf, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    out = tmp_path / "llama.gguf"
    subprocess.run([str(LLAMA_IMATRIX), "-m", str(tiny_gguf), "-f", str(text), "-c", "512", "--chunks", "2",
                    "--process-output", "-t", "2", "-o", str(out)], check=True, capture_output=True)
    theirs = imatrix.load(out)
    ours = imatrix.collect([tiny_gguf], TEXT, max_chunks=2)
    assert_same(ours, theirs, rtol=1e-4)  # llama-imatrix sums in float32, edgepack in float64
