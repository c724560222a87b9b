"""`edgepack build`: source GGUF -> quantized (by llama.cpp) -> GGUF splits -> one verifiable bundle."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from edgepack.runtime import __version__, llama
from edgepack.runtime.boards import BoardProfile
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX, Manifest, ModelInfo, RuntimeDefaults, check_name

from . import bundle_writer, chat_templates, compress, evaluate, gates, gguf_info, quant_types, report, segment
from .errors import PackagerError


@dataclass(frozen=True)
class BuildOptions:
    source: Path
    output: Path
    board: BoardProfile
    quant: str | None = None  # a type name, "keep", or None for the default
    allow_requantize: bool = False
    chat_template: str | None = None
    name: str | None = None
    bundle_version: int | None = None
    blocks_per_segment: int = 4
    zstd_level: int = 9
    quiet: bool = False
    calibration: Path | None = None  # calibration text; None: the project's default text
    no_calibration: bool = False
    imatrix: Path | None = None
    target_size: int | None = None  # bytes
    target_bpw: float | None = None
    prune: str | None = None  # "auto" or a block count
    tier: str | None = None
    eval_text: Path | None = None
    tasks: Path | None = None
    no_eval: bool = False
    report: Path | None = None
    threads: int = 2


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: Manifest
    source_size: int
    model_size: int
    bundle_size: int
    bits_per_weight: float
    segments: int
    seconds: float
    notes: tuple[str, ...]
    quality: dict
    steps: tuple[tuple[str, float], ...]


def build(opts: BuildOptions) -> BuildResult:
    started = time.monotonic()
    ui = _Ui(opts.quiet)
    if opts.output.suffix != BUNDLE_SUFFIX:
        raise PackagerError(f"output {opts.output} must end in {BUNDLE_SUFFIX}")
    if not opts.output.parent.is_dir():
        raise PackagerError(f"output directory {opts.output.parent} does not exist")
    ui.step("reading source")
    source = gguf_info.read(opts.source)
    name = check_name(opts.name or _default_name(opts.source), "model name")
    template, template_note = chat_templates.choose(source.architecture, source.chat_template, opts.chat_template)
    qtype, quant_note = _choose_quant(source, opts)
    notes = [n for n in (quant_note, template_note) if n]
    for note in notes:
        ui.note(note)

    with tempfile.TemporaryDirectory(prefix="edgepack-build-", dir=opts.output.parent) as tmp:
        work = Path(tmp)
        result = compress.compress(source, work, _quality_options(opts, source, qtype, template), ui.step)
        model_path = result.model
        model = gguf_info.read(model_path) if model_path != source.path else source
        if opts.report is not None:
            _write_report(opts, name, source, result)
        if result.verdict is not None:
            ui.note(result.verdict.message)
            if not result.verdict.passed:
                raise PackagerError(f"quality gate: {result.verdict.message}; no bundle written")
        seg_dir = work / "segments"
        seg_dir.mkdir()
        tensor_bytes = sum(t.n_bytes for t in model.tensors)
        with ui.bar(tensor_bytes, "segment") as bar:
            segments = segment.write_segments(model, seg_dir, opts.blocks_per_segment, bar.update)
        blobs: dict = {}
        with ui.bar(sum(s.size for s in segments), "compress (zstd)") as bar:
            for seg in segments:
                if seg.digest not in blobs:
                    blobs[seg.digest] = bundle_writer.compress(seg.path, seg.digest, work, opts.zstd_level, bar.update)
        created = _now()
        manifest = Manifest(
            name=name,
            bundle_version=opts.bundle_version if opts.bundle_version is not None else int(created.timestamp()),
            created=created.isoformat().replace("+00:00", "Z"),
            builder=f"edgepack {__version__}",
            llama_cpp_version=llama.version(),
            board=opts.board.name,
            models=(
                ModelInfo(
                    name=name,
                    architecture=model.architecture,
                    parameters=model.parameters,
                    file_type=model.file_type,
                    quant_types=model.quant_types,
                    segments=tuple(s.digest for s in segments),
                    chat_template=template,
                    context_length=model.context_length,
                    source={"file": opts.source.name, "size": source.size, "file_type": source.file_type},
                    quality=result.quality,
                    plan=result.plan,
                ),
            ),
            runtime=RuntimeDefaults(
                threads=opts.board.threads,
                n_ctx=min(opts.board.n_ctx, model.context_length or opts.board.n_ctx),
            ),
            blobs={d: b.info for d, b in blobs.items()},
        )
        ui.step("write bundle")
        bundle_size = bundle_writer.write_archive(
            opts.output, manifest, list(blobs.values()), int(created.timestamp())
        )
    return BuildResult(
        output=opts.output,
        manifest=manifest,
        source_size=source.size,
        model_size=model.size,
        bundle_size=bundle_size,
        bits_per_weight=model.bits_per_weight,
        segments=len(segments),
        seconds=time.monotonic() - started,
        notes=tuple(notes),
        quality=result.quality,
        steps=tuple(result.steps),
    )


def _quality_options(opts: BuildOptions, source: gguf_info.GGUFInfo, qtype: quant_types.QuantType | None,
                     template: str | None) -> compress.QualityOptions:
    if opts.tier is not None:
        gates.tolerance(opts.tier)  # validate before any heavy work
    calibration, calibration_name = None, ""
    if not opts.no_calibration:
        calibration_name = opts.calibration.name if opts.calibration else "edgepack calibration.txt"
        calibration = evaluate.read_text(opts.calibration) if opts.calibration else evaluate.default_text("calibration")
    eval_text = None
    if not opts.no_eval or opts.tier is not None:
        eval_text = evaluate.read_text(opts.eval_text) if opts.eval_text else evaluate.default_text("eval")
    target = opts.target_size
    if opts.target_bpw is not None:
        target = int(opts.target_bpw * source.parameters / 8) + (source.size - sum(t.n_bytes for t in source.tensors))
    return compress.QualityOptions(
        quant=qtype,
        allow_requantize=opts.allow_requantize,
        calibration_text=calibration,
        calibration_name=calibration_name,
        imatrix_file=opts.imatrix,
        target_bytes=target,
        prune=int(opts.prune) if opts.prune and opts.prune.isdigit() else opts.prune,
        tier=opts.tier,
        eval_text=eval_text,
        tasks=evaluate.load_tasks(opts.tasks) if opts.tasks else None,
        chat_template=template,
        measure_candidates=opts.report is not None,
        threads=opts.threads,
    )


def _write_report(opts: BuildOptions, name: str, source: gguf_info.GGUFInfo, result: compress.Compressed) -> None:
    assert opts.report is not None
    verdict = result.verdict.message if result.verdict else ""
    report.write_report(opts.report, report.BuildReport(
        model=name,
        reference=f"source {source.path.name} ({source.file_type})",
        reference_ppl=result.quality.get("ppl_reference"),
        candidates=tuple(result.candidates),
        layers=tuple(result.layers),
        tensors=tuple(result.tensors),
        steps=tuple(result.steps),
        tier=opts.tier,
        verdict=verdict,
    ))


def _choose_quant(source: gguf_info.GGUFInfo, opts: BuildOptions) -> tuple[quant_types.QuantType | None, str]:
    """The type to quantize to (None: keep the source's tensors) and a note saying why."""
    requested = opts.quant
    if requested is not None and requested.lower() == quant_types.KEEP:
        return None, f"keeping the source's types ({source.file_type})"
    if requested is None and source.quantized:
        return None, (
            f"source is already quantized ({source.file_type}): keeping its tensors; "
            "pass --quant TYPE --allow-requantize to requantize"
        )
    target = quant_types.parse(requested or opts.board.default_quant)
    if not source.quantized:
        return target, ""
    current = quant_types.TYPES.get(source.file_type)
    if current is not None and target.bpw >= current.bpw and not opts.allow_requantize:
        return None, (
            f"source is already quantized ({source.file_type}, at or below {target.name}): keeping its tensors"
        )
    if not opts.allow_requantize:
        raise PackagerError(
            f"source is already quantized ({source.file_type}); requantizing to {target.name} compounds the "
            "error: pass --allow-requantize to do it anyway, or --quant keep"
        )
    return target, f"requantizing {source.file_type} -> {target.name} (--allow-requantize)"


def _default_name(source: Path) -> str:
    stem = source.name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-_")[:64] or "model"


def _now() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC).replace(microsecond=0)


class _Ui:
    """Progress on stderr (hidden with --quiet); results go to stdout."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def step(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"- {text}", err=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"  note: {text}", err=True)

    @contextlib.contextmanager
    def bar(self, total: int, label: str) -> Iterator:
        if self.quiet:
            yield _NullBar()
            return
        with click.progressbar(
            length=max(total, 1), label=f"- {label}", file=sys.stderr, show_eta=False, show_percent=True
        ) as bar:
            yield bar


class _NullBar:
    pos = 0

    def update(self, n: int) -> None:
        self.pos += n
