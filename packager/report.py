"""The build report of `edgepack build --report DIR`: plots, a Markdown page and the same facts as JSON.

Callers fill a BuildReport; write_report turns it into files a person can look at (PNGs embedded in
report.md) and a machine can read (report.json). matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIB = 1024 * 1024
MISSING = "–"
SIZE_VS_KLD = "size_vs_kld.png"
LAYERS = "layers.png"

# kind -> (marker, colour) in the size/KLD plot
_RULES = {"l": ":---", "r": "---:", "c": ":---:"}
_KIND_STYLE = {"uniform": ("o", "tab:blue"), "plan": ("s", "tab:orange"), "pruned": ("^", "tab:green")}


@dataclass(frozen=True)
class CandidateRow:
    """One model tried during the build (a uniform type, a plan, a pruned model, the chosen one)."""

    label: str
    kind: str  # "uniform" | "plan" | "pruned"
    size_bytes: int
    bits_per_weight: float
    ppl: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None  # fraction 0..1
    chosen: bool = False
    note: str = ""


@dataclass(frozen=True)
class LayerRow:
    """Importance of one block: 1 - cosine(h_in, h_out) averaged over calibration tokens."""

    layer: int
    influence: float
    kld_if_dropped: float | None = None
    pruned: bool = False


@dataclass(frozen=True)
class TensorRow:
    """One tensor of the type plan."""

    name: str
    type_name: str
    size_bytes: int
    predicted_error: float | None = None  # the planner's loss proxy for that choice
    source_type: str = ""


@dataclass(frozen=True)
class BuildReport:
    model: str
    reference: str  # what quality was measured against
    reference_ppl: float | None
    candidates: tuple[CandidateRow, ...]
    layers: tuple[LayerRow, ...] = ()
    tensors: tuple[TensorRow, ...] = ()
    steps: tuple[tuple[str, float], ...] = ()  # (step name, seconds)
    tier: str | None = None  # "critical" | "general" | "low-risk" | None
    verdict: str = ""


def write_report(directory: Path, report: BuildReport) -> list[Path]:
    """Write the plots (those with data), report.md and report.json into `directory`; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [path for path in (_plot_size_vs_kld(directory, report), _plot_layers(directory, report)) if path]
    markdown = directory / "report.md"
    markdown.write_text(_render_markdown(report, [path.name for path in written]), encoding="utf-8")
    machine = directory / "report.json"
    machine.write_text(json.dumps(dataclasses.asdict(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, markdown, machine]


# --- numbers -------------------------------------------------------------------------------------


def _fmt_mib(size_bytes: int) -> str:
    return f"{size_bytes / MIB:.1f}"


def _fmt_sig(value: float | None) -> str:
    """4 significant digits: KLD, influence, loss proxies."""
    return MISSING if value is None else f"{value:.4g}"


def _fmt_fixed(value: float | None) -> str:
    """2 decimals: perplexity, bits per weight."""
    return MISSING if value is None else f"{value:.2f}"


def _fmt_percent(fraction: float | None) -> str:
    return MISSING if fraction is None else f"{fraction * 100:.2f}"


# --- Markdown ------------------------------------------------------------------------------------


def _render_markdown(report: BuildReport, images: Sequence[str]) -> str:
    """The whole report.md; `images` are the PNG file names written next to it."""
    sections = [
        _header(report),
        _candidates_section(report.candidates),
        *(f"![{name.removesuffix('.png')}]({name})" for name in images),
        _layers_section(report.layers),
        _tensors_section(report.tensors),
        _steps_section(report.steps),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _header(report: BuildReport) -> str:
    lines = [f"# Build report: {report.model}", "", f"- **Reference:** {report.reference}"]
    if report.reference_ppl is not None:
        lines.append(f"- **Reference PPL:** {_fmt_fixed(report.reference_ppl)}")
    lines.append(f"- **Tier:** {report.tier or MISSING}")
    if report.verdict:
        lines.append(f"- **Verdict:** {report.verdict}")
    chosen = next((row for row in report.candidates if row.chosen), None)
    if chosen:
        lines.append(
            f"- **Chosen:** {chosen.label} ({_fmt_mib(chosen.size_bytes)} MiB, "
            f"{_fmt_fixed(chosen.bits_per_weight)} bits/weight)"
        )
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A Markdown table; `align` holds one character per column: 'l', 'r' or 'c'."""
    rule = [_RULES[a] for a in align]
    lines = [header, rule, *([cell.replace("|", "\\|") for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _candidates_section(candidates: Sequence[CandidateRow]) -> str:
    if not candidates:
        return ""
    header = ["", "candidate", "kind", "size MiB", "bits/weight", "PPL", "mean KLD", "p99 KLD", "top-1 %", "note"]
    rows = (
        [
            "✔" if row.chosen else "",
            row.label,
            row.kind,
            _fmt_mib(row.size_bytes),
            _fmt_fixed(row.bits_per_weight),
            _fmt_fixed(row.ppl),
            _fmt_sig(row.kld_mean),
            _fmt_sig(row.kld_p99),
            _fmt_percent(row.top1_agreement),
            row.note,
        ]
        for row in candidates
    )
    return "## Candidates\n\n" + _table(header, rows, "cllrrrrrrl")


def _layers_section(layers: Sequence[LayerRow]) -> str:
    if not layers:
        return ""
    rows = (
        [str(row.layer), _fmt_sig(row.influence), _fmt_sig(row.kld_if_dropped), "✔" if row.pruned else ""]
        for row in layers
    )
    table = _table(["layer", "influence", "KLD if dropped", "pruned"], rows, "rrrc")
    return "## Layer importance\n\ninfluence = 1 − cosine(h_in, h_out), averaged over calibration tokens\n\n" + table


def _bytes_per_type(tensors: Iterable[TensorRow]) -> dict[str, tuple[int, int]]:
    """type name -> (tensor count, bytes), largest share first."""
    totals: dict[str, tuple[int, int]] = {}
    for row in tensors:
        count, size = totals.get(row.type_name, (0, 0))
        totals[row.type_name] = (count + 1, size + row.size_bytes)
    return dict(sorted(totals.items(), key=lambda item: -item[1][1]))


def _tensors_section(tensors: Sequence[TensorRow]) -> str:
    if not tensors:
        return ""
    total = sum(row.size_bytes for row in tensors) or 1
    summary = _table(
        ["type", "tensors", "MiB", "share %"],
        (
            [name, str(count), _fmt_mib(size), _fmt_percent(size / total)]
            for name, (count, size) in _bytes_per_type(tensors).items()
        ),
        "lrrr",
    )
    detail = _table(
        ["tensor", "type", "from", "MiB", "predicted error"],
        (
            [
                row.name,
                row.type_name,
                row.source_type or MISSING,
                _fmt_mib(row.size_bytes),
                _fmt_sig(row.predicted_error),
            ]
            for row in tensors
        ),
        "lllrr",
    )
    return f"## Tensor types\n\n{summary}\n\n{detail}"


def _steps_section(steps: Sequence[tuple[str, float]]) -> str:
    if not steps:
        return ""
    rows = [[name, f"{seconds:.1f}"] for name, seconds in steps]
    rows.append(["**total**", f"**{sum(seconds for _, seconds in steps):.1f}**"])
    return "## Build steps\n\n" + _table(["step", "seconds"], rows, "lr")


# --- plots ---------------------------------------------------------------------------------------


def _pyplot() -> ModuleType:
    """pyplot on the Agg backend, imported late so importing this module stays cheap and needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_size_vs_kld(directory: Path, report: BuildReport) -> Path | None:
    """Size against mean KLD per candidate; None (no file) when no candidate has a KLD."""
    points = [row for row in report.candidates if row.kld_mean is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        for kind in dict.fromkeys(row.kind for row in points):
            rows = [row for row in points if row.kind == kind]
            marker, colour = _KIND_STYLE.get(kind, ("x", "tab:gray"))
            ax.scatter([_mib(r) for r in rows], [r.kld_mean for r in rows], marker=marker, c=colour, label=kind)
        for row in points:
            xy = (_mib(row), row.kld_mean)
            ax.annotate(row.label, xy, textcoords="offset points", xytext=(5, 4), fontsize=8)
            if row.chosen:
                ax.scatter(*xy, s=250, facecolors="none", edgecolors="tab:red", linewidths=2, label="chosen")
                ax.annotate(
                    "chosen",
                    xy,
                    textcoords="offset points",
                    xytext=(14, -26),
                    color="tab:red",
                    fontweight="bold",
                    arrowprops={"arrowstyle": "->", "color": "tab:red"},
                )
        if all(row.kld_mean > 0 for row in points):
            ax.set_yscale("log")
        ax.set(xlabel="size (MiB)", ylabel="mean KLD vs reference", title=f"{report.model}: size vs quality loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return _save(fig, directory / SIZE_VS_KLD)
    finally:
        plt.close(fig)


def _plot_layers(directory: Path, report: BuildReport) -> Path | None:
    """Influence per layer, pruned layers in red; None (no file) without layers."""
    if not report.layers:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    try:
        for pruned, colour, label in ((False, "tab:blue", "kept"), (True, "tab:red", "pruned")):
            rows = [row for row in report.layers if row.pruned == pruned]
            if rows:
                ax.bar([r.layer for r in rows], [r.influence for r in rows], color=colour, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.15)  # headroom for the legend
        ax.set(xlabel="layer", ylabel="influence (1 − cosine)", title=f"{report.model}: layer importance")
        ax.legend()
        return _save(fig, directory / LAYERS)
    finally:
        plt.close(fig)


def _mib(row: CandidateRow) -> float:
    return row.size_bytes / MIB


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path
