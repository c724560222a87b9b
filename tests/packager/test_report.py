"""edgepack build --report: plots a person can look at, a Markdown page with the numbers, JSON for machines."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import pytest

from edgepack.packager.report import BuildReport, CandidateRow, LayerRow, TensorRow, write_report

MIB = 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_report() -> BuildReport:
    return BuildReport(
        model="gemma-3-270m",
        reference="source gemma-3-270m-q4_k_m.gguf (Q4_K_M)",
        reference_ppl=21.4567,
        candidates=(
            CandidateRow("Q8_0", "uniform", 292 * MIB, 8.5, 21.50, 0.0012345, 0.0213, 0.9951),
            CandidateRow("Q4_K_M", "uniform", int(241.26 * MIB), 4.85, 22.10, 0.03456789, 0.4102, 0.987),
            CandidateRow(
                "Q3_K_M",
                "uniform",
                200 * MIB,
                3.9,
                25.3,
                0.1234,
                1.52,
                0.9612,
                note="refused: general tier needs >= 98% agreement",
            ),
            CandidateRow("plan@160MiB", "plan", 160 * MIB, 4.31, 22.4, 0.04, 0.5, 0.9855, chosen=True),
            CandidateRow("pruned-2", "pruned", 150 * MIB, 4.31, 30.0, 0.2, 2.0, 0.95),
        ),
        layers=(LayerRow(0, 0.41), LayerRow(1, 0.052, 0.018), LayerRow(2, 0.0071, 0.00123, pruned=True)),
        tensors=(
            TensorRow("token_embd.weight", "Q8_0", 3 * MIB, 0.001, "F16"),
            TensorRow("blk.0.ffn_down.weight", "Q6_K", 2 * MIB, 0.0123456, "F16"),
            TensorRow("blk.1.ffn_down.weight", "Q4_K", MIB, None, "F16"),
            TensorRow("blk.0.attn_q.weight", "Q4_K", MIB),
        ),
        steps=(("quantize", 12.34), ("calibrate", 3.0)),
        tier="general",
        verdict="passed general tier: top-1 agreement 98.55% >= 98%",
    )


def assert_png(path, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000  # a drawn plot, not an empty canvas
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # not a blank image


def md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def test_report_writes_plots_markdown_and_json(tmp_path):
    report = sample_report()
    out = tmp_path / "nested" / "report"
    written = write_report(out, report)

    names = ["size_vs_kld.png", "layers.png", "report.md", "report.json"]
    assert written == [out / name for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert_png(out / "size_vs_kld.png", 960, 600)
    assert_png(out / "layers.png", 960, 480)


def test_markdown_has_the_numbers_formatted(tmp_path):
    write_report(tmp_path, sample_report())
    md = (tmp_path / "report.md").read_text(encoding="utf-8")

    head = md.split("## Candidates")[0]
    assert head.startswith("# Build report: gemma-3-270m\n")
    assert "source gemma-3-270m-q4_k_m.gguf (Q4_K_M)" in head and "21.46" in head
    assert "**Tier:** general" in head
    assert "passed general tier: top-1 agreement 98.55% >= 98%" in head
    assert "**Chosen:** plan@160MiB (160.0 MiB, 4.31 bits/weight)" in head

    # candidates: MiB 1 decimal, KLD 4 significant digits, top-1 in percent with 2 decimals, ✔ on the chosen
    assert md_row("", "Q8_0", "uniform", "292.0", "8.50", "21.50", "0.001234", "0.0213", "99.51", "") in md
    assert md_row("", "Q4_K_M", "uniform", "241.3", "4.85", "22.10", "0.03457", "0.4102", "98.70", "") in md
    assert md_row("✔", "plan@160MiB", "plan", "160.0", "4.31", "22.40", "0.04", "0.5", "98.55", "") in md
    assert "| refused: general tier needs >= 98% agreement |" in md
    assert sum(line.startswith("| ✔ |") for line in md.splitlines()) == 1

    # plots embedded by relative link
    assert "![size_vs_kld](size_vs_kld.png)" in md and "![layers](layers.png)" in md

    # layers: influence and KLD-if-dropped with 4 significant digits, pruned marked
    assert md_row("1", "0.052", "0.018", "") in md
    assert md_row("2", "0.0071", "0.00123", "✔") in md
    assert md_row("0", "0.41", "–", "") in md

    # tensors: per-type summary (largest first) and the plan itself
    summary = md.split("## Tensor types")[1]
    assert summary.index("| Q8_0 | 1 | 3.0 | 42.86 |") < summary.index("| Q4_K | 2 | 2.0 | 28.57 |")
    assert md_row("blk.0.ffn_down.weight", "Q6_K", "F16", "2.0", "0.01235") in md
    assert md_row("blk.0.attn_q.weight", "Q4_K", "–", "1.0", "–") in md

    # steps and their total
    assert md_row("quantize", "12.3") in md and md_row("**total**", "**15.3**") in md


def test_json_round_trips_to_the_same_report(tmp_path):
    report = sample_report()
    write_report(tmp_path, report)
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))

    rebuilt = BuildReport(
        **{
            **data,
            "candidates": tuple(CandidateRow(**row) for row in data["candidates"]),
            "layers": tuple(LayerRow(**row) for row in data["layers"]),
            "tensors": tuple(TensorRow(**row) for row in data["tensors"]),
            "steps": tuple(tuple(step) for step in data["steps"]),
        }
    )
    assert rebuilt == report
    assert data["candidates"][3]["chosen"] is True and data["candidates"][2]["top1_agreement"] == 0.9612


def test_without_any_kld_there_is_no_size_plot(tmp_path):
    report = BuildReport(
        model="tiny",
        reference="source tiny.gguf (F16)",
        reference_ppl=None,
        candidates=(CandidateRow("Q8_0", "uniform", 5 * MIB, 8.5, None, None, None, None, chosen=True),),
    )
    written = write_report(tmp_path, report)

    assert [p.name for p in written] == ["report.md", "report.json"]
    assert not (tmp_path / "size_vs_kld.png").exists() and not (tmp_path / "layers.png").exists()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert md_row("✔", "Q8_0", "uniform", "5.0", "8.50", "–", "–", "–", "–", "") in md
    assert "**Tier:** –" in md and ".png" not in md and "## Layer importance" not in md
    assert json.loads((tmp_path / "report.json").read_text())["candidates"][0]["kld_mean"] is None


@pytest.mark.parametrize("klds", [(0.0, 0.01), (0.02, 0.01)])
def test_size_plot_is_drawn_with_a_zero_kld(tmp_path, klds):
    # a lossless candidate (KLD 0) has no place on a log axis; the plot is still drawn
    candidates = tuple(
        CandidateRow(f"c{i}", "uniform", (i + 1) * MIB, 8.0, None, kld, None, None) for i, kld in enumerate(klds)
    )
    write_report(tmp_path, BuildReport("m", "ref", None, candidates))
    assert_png(tmp_path / "size_vs_kld.png", 960, 600)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, edgepack.packager.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
