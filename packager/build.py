"""`edgepack build`: source GGUF(s) -> quantized (by llama.cpp) -> GGUF splits -> one verifiable bundle.

A source is a GGUF or a Hugging Face checkpoint directory (converted by llama.cpp's own converter, cached). A
bundle holds one model, or (from a recipe) several models, LoRA adapters (GGUF or PEFT directories) and agents;
segments that models share are stored once. With `since`, the archive carries only the blobs the old bundle lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click

from edgepack.runtime import __version__, llama, memory, signatures
from edgepack.runtime.boards import BoardProfile
from edgepack.runtime.bundle_format import (
    BUNDLE_SUFFIX,
    MEDIA_GGUF_LORA,
    AdapterInfo,
    Digest,
    EncoderInfo,
    Manifest,
    ModelInfo,
    RuntimeDefaults,
)
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.files import sha256_file
from edgepack.runtime.schema import check_name
from edgepack.runtime.store import bundle_manifest

from . import (
    bundle_writer,
    chat_templates,
    compress,
    convert_hf,
    convert_lora,
    encoder,
    encoder_build,
    evaluate,
    gates,
    gguf_info,
    quant_types,
    report,
    segment,
    vocab,
    vocab_trim,
)
from .errors import PackagerError
from .recipe import AdapterSpec, Recipe


@dataclass(frozen=True)
class BuildOptions:
    output: Path
    board: BoardProfile
    source: Path | None = None  # one model, or:
    recipe: Recipe | None = None  # several models, adapters and agents
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
    since: Path | None = None  # write a delta against this older bundle
    sign: Path | None = None  # an ed25519 private key (edgepack keygen): the manifest's signature travels along
    threads: int = 2
    vocab: vocab.Request | None = None  # trim the vocabulary (docs/vocab.md)


@dataclass(frozen=True)
class _ModelJob:
    name: str
    source: Path
    quant: str | None
    chat_template: str | None
    target_size: int | None
    tier: str | None
    vocab: vocab.Request | None = None


@dataclass(frozen=True)
class ModelResult:
    info: ModelInfo
    source_size: int
    model_size: int
    bits_per_weight: float
    quality: dict
    steps: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: Manifest
    models: tuple[ModelResult, ...]
    bundle_size: int
    blobs_shipped: int
    shared_bytes: int  # bytes of segments used by more than one model, counted once per extra use
    seconds: float
    signed_by: str | None = None  # the signing key's id

    @property
    def first(self) -> ModelResult:
        return self.models[0]

    @property
    def source_size(self) -> int:
        return sum(m.source_size for m in self.models)

    @property
    def bits_per_weight(self) -> float:
        return self.first.bits_per_weight

    @property
    def segments(self) -> int:
        return len(self.first.info.segments)


def build(opts: BuildOptions) -> BuildResult:
    started = time.monotonic()
    ui = _Ui(opts.quiet)
    if opts.output.suffix != BUNDLE_SUFFIX:
        raise PackagerError(f"output {opts.output} must end in {BUNDLE_SUFFIX}")
    if not opts.output.parent.is_dir():
        raise PackagerError(f"output directory {opts.output.parent} does not exist")
    if (opts.source is None) == (opts.recipe is None):
        raise PackagerError("build needs either a SOURCE model or --recipe")
    old = bundle_manifest(opts.since) if opts.since is not None else None
    key = signatures.load_private(opts.sign) if opts.sign is not None else None  # a bad key fails before the work
    jobs = _jobs(opts)
    _check_sources(jobs, opts.recipe)  # a bad checkpoint fails before the first model's work
    default = _default_name(Path(opts.output.stem)) if opts.recipe else jobs[0].name
    bundle_name = check_name(opts.name or default, "bundle name")
    with tempfile.TemporaryDirectory(prefix="edgepack-build-", dir=opts.output.parent) as tmp:
        work = Path(tmp)
        blobs: dict[Digest, bundle_writer.CompressedBlob] = {}
        results = []
        imatrix_cache: dict = {}
        for job in jobs:
            result, segments = _build_model(job, opts, work / job.name, ui, imatrix_cache)
            results.append(result)
            with ui.bar(sum(s.size for s in segments), f"compress {job.name} (zstd)") as bar:
                for seg in segments:
                    if seg.digest not in blobs:
                        blobs[seg.digest] = bundle_writer.compress(seg.path, seg.digest, work, opts.zstd_level,
                                                                   bar.update)
                    else:
                        bar.update(seg.size)
        adapters = _adapters(opts.recipe, results, blobs, work, opts.zstd_level, ui) if opts.recipe else ()
        encoders = _encoders(opts.recipe, blobs, work, opts.zstd_level, opts.threads, ui) if opts.recipe else ()
        agents = opts.recipe.agents if opts.recipe else ()
        created = build_time()
        context = min(r.info.context_length or opts.board.n_ctx for r in results)
        manifest = Manifest(
            name=bundle_name,
            bundle_version=opts.bundle_version if opts.bundle_version is not None else int(created.timestamp()),
            created=created.isoformat().replace("+00:00", "Z"),
            builder=f"edgepack {__version__}",
            llama_cpp_version=llama.version(),
            board=opts.board.name,
            models=tuple(r.info for r in results),
            runtime=RuntimeDefaults(threads=opts.board.threads, n_ctx=min(opts.board.n_ctx, context)),
            blobs={d: b.info for d, b in blobs.items()},
            adapters=adapters,
            encoders=encoders,
            agents=agents,
            delta_since=f"{old.name} v{old.bundle_version}" if old else None,
            auto_promote=opts.recipe.auto_promote if opts.recipe else False,
        )
        shipped = [b for d, b in blobs.items() if old is None or d not in old.blobs]
        ui.step("write bundle" + (f" (delta: {len(shipped)} of {len(blobs)} blobs)" if old else ""))
        bundle_size = bundle_writer.write_archive(opts.output, manifest, shipped, int(created.timestamp()),
                                                  key)
    uses = Counter(d for r in results for d in r.info.segments)
    shared = sum(manifest.blobs[d].size * (n - 1) for d, n in uses.items() if n > 1)
    return BuildResult(opts.output, manifest, tuple(results), bundle_size, len(shipped), shared,
                       time.monotonic() - started, signatures.key_id(key.public_key()) if key else None)


def _jobs(opts: BuildOptions) -> list[_ModelJob]:
    if opts.recipe is None:
        assert opts.source is not None
        name = check_name(opts.name or _default_name(opts.source), "model name")
        return [_ModelJob(name, opts.source, opts.quant, opts.chat_template, opts.target_size, opts.tier,
                          opts.vocab)]
    return [
        _ModelJob(m.name, m.source, m.quant or opts.quant, m.chat_template or opts.chat_template,
                  parse_size(m.target_size) if m.target_size else opts.target_size,
                  opts.tier or opts.recipe.model_tier(m), m.vocab or opts.vocab)
        for m in opts.recipe.models
    ]


def _check_sources(jobs: list[_ModelJob], recipe: Recipe | None) -> None:
    for job in jobs:
        if job.source.is_dir():
            convert_hf.check(job.source)
    for spec in recipe.adapters if recipe else ():
        if spec.source.is_dir():
            convert_lora.check_inputs(spec.source, _adapter_base_dir(spec, recipe))
    for enc in recipe.encoders if recipe else ():
        encoder_build.check(enc.source, enc.runtime)


def _source_gguf(job: _ModelJob, ui: _Ui) -> tuple[Path, dict]:
    """The job's GGUF (a checkpoint directory's conversion, from the cache when it has one) and what the manifest
    says of where it came from."""
    if not job.source.is_dir():
        return job.source, {"file": job.source.name}
    converted = convert_hf.converted(job.source, ui.step)
    if not converted.cached:
        ui.note(f"converted in {converted.seconds:.1f}s, cached as {converted.gguf}")
    return converted.gguf, {"checkpoint": job.source.name, "checkpoint_sha256": converted.digest,
                            "converter": f"llama.cpp {convert_hf.SCRIPT}"}


def _build_model(job: _ModelJob, opts: BuildOptions, work: Path, ui: _Ui,
                 imatrix_cache: dict) -> tuple[ModelResult, list]:
    work.mkdir(parents=True)
    path, origin = _source_gguf(job, ui)
    ui.step(f"{job.name}: reading {job.source.name}")
    source = gguf_info.read(path)
    template, template_note = chat_templates.choose(source.architecture, source.chat_template, job.chat_template)
    qtype, quant_note = _choose_quant(source, job.quant, opts)
    for note in (quant_note, template_note):
        if note:
            ui.note(note)
    options = dataclasses.replace(_quality_options(opts, job, source, qtype, template), imatrix_cache=imatrix_cache)
    original = source
    vocab_report = None
    if job.vocab is not None:
        source, vocab_report = _trim_vocab(job, opts, options, source, work, template, ui)
    result = compress.compress(source, work, options, ui.step)
    if vocab_report is not None:
        result.quality["vocab"] = vocab_report
    model = gguf_info.read(result.model) if result.model != source.path else source
    source = original
    if opts.report is not None:
        directory = opts.report if opts.recipe is None else opts.report / job.name
        _write_report(directory, job, source, result)
    if result.verdict is not None:
        ui.note(result.verdict.message)
        if not result.verdict.passed:
            raise PackagerError(f"quality gate ({job.name}): {result.verdict.message}; no bundle written")
    seg_dir = work / "segments"
    seg_dir.mkdir()
    with ui.bar(sum(t.n_bytes for t in model.tensors), f"segment {job.name}") as bar:
        segments = segment.write_segments(model, seg_dir, opts.blocks_per_segment, bar.update)
    info = ModelInfo(
        name=job.name,
        architecture=model.architecture,
        parameters=model.parameters,
        file_type=model.file_type,
        quant_types=model.quant_types,
        segments=tuple(s.digest for s in segments),
        chat_template=template,
        context_length=model.context_length,
        source={**origin, "size": source.size, "file_type": source.file_type},
        quality=result.quality,
        plan=result.plan,
    )
    return ModelResult(info, source.size, model.size, model.bits_per_weight, result.quality,
                       tuple(result.steps)), segments


def _trim_vocab(job: _ModelJob, opts: BuildOptions, options: compress.QualityOptions, source: gguf_info.GGUFInfo,
                work: Path, template: str | None, ui: _Ui) -> tuple[gguf_info.GGUFInfo, dict]:
    """The source with its vocabulary trimmed (what the later steps then quantize, plan and measure against), gated by
    the tier against the untrimmed source."""
    assert job.vocab is not None
    agent = vocab_trim.AgentText(
        calibration=options.calibration_text or evaluate.default_text("calibration"),
        system_prompts=tuple(a.system_prompt for a in (opts.recipe.agents if opts.recipe else ())
                             if a.model == job.name and a.system_prompt),
        tasks=options.tasks or evaluate.load_tasks(evaluate.default_tasks_path()),
        chat_template=template,
    )
    ui.step(f"{job.name}: trim vocabulary (--vocab {job.vocab})")
    trimmed = vocab_trim.trim(source.path, job.vocab, work, agent, eval_text=options.eval_text, tier=job.tier,
                              threads=opts.threads, note=ui.note)
    if trimmed.verdict is not None:
        ui.note(trimmed.verdict.message)
        if not trimmed.verdict.passed:
            raise PackagerError(f"quality gate ({job.name}): {trimmed.verdict.message}; no bundle written")
    return gguf_info.read(trimmed.path), trimmed.report


def _adapters(recipe: Recipe, results: list[ModelResult], blobs: dict, work: Path, level: int,
              ui: _Ui) -> tuple[AdapterInfo, ...]:
    """LoRA adapters ship as they are, one blob each, after checking they fit their base's architecture; a PEFT
    directory is converted first by llama.cpp's convert_lora_to_gguf.py."""
    arch = {r.info.name: r.info.architecture for r in results}
    out = []
    for spec in recipe.adapters:
        ui.step(f"adapter {spec.name}: {spec.source.name}")
        path = spec.source
        if path.is_dir():
            path = work / f"adapter-{spec.name}.gguf"
            convert_lora.convert(spec.source, _adapter_base_dir(spec, recipe), path)
        adapter = gguf_info.read(path)
        if adapter.general_type != "adapter":
            raise PackagerError(f"{spec.source}: not a LoRA adapter GGUF (general.type is {adapter.general_type!r})")
        if adapter.architecture != arch[spec.base]:
            raise PackagerError(f"{spec.source}: adapter is for {adapter.architecture!r}, its base {spec.base!r} "
                                f"is {arch[spec.base]!r}")
        digest = Digest(sha256_file(path))
        if digest not in blobs:
            blobs[digest] = bundle_writer.compress(path, digest, work, level, lambda n: None, MEDIA_GGUF_LORA)
        out.append(AdapterInfo(spec.name, spec.base, digest, spec.scale))
    return tuple(out)


def _encoders(recipe: Recipe, blobs: dict, work: Path, level: int, threads: int,
              ui: _Ui) -> tuple[EncoderInfo, ...]:
    """The recipe's sentence encoders, built and gated by their tier as `edgepack build-encoder` does; their tensors
    join the bundle's blobs (a tensor two encoders share is stored once)."""
    out = []
    for spec in recipe.encoders:
        ui.step(f"encoder {spec.name}: {spec.source.name} ({spec.runtime})")
        folder = work / f"encoder-{spec.name}"
        folder.mkdir()
        gated = encoder_build.build_gated(spec.source, spec.name, quant=spec.quant, runtimes=spec.runtime,
                                          tflite_quant=spec.tflite_quant, tier=spec.tier, work=folder,
                                          threads=threads, log=ui.note)
        for line in gated.verdicts:
            ui.note(f"encoder {spec.name}: {line}")
        for digest, path in gated.build.blobs.items():
            if digest not in blobs:
                blobs[digest] = bundle_writer.compress(path, digest, work, level, lambda n: None,
                                                       encoder.media_type(gated.build.info, digest))
        out.append(gated.build.info)
    return tuple(out)


def _adapter_base_dir(spec: AdapterSpec, recipe: Recipe) -> Path:
    """The Hugging Face directory a PEFT adapter's conversion reads its base's config.json from: its base model's
    checkpoint."""
    base = next(m for m in recipe.models if m.name == spec.base)
    if not base.source.is_dir():
        raise PackagerError(f"{recipe.path}: adapters.{spec.name}: a PEFT directory needs its base {spec.base!r} "
                            f"built from its Hugging Face checkpoint directory, not {base.source.name}; or convert it "
                            "first with edgepack convert-lora --base BASE_HF_DIR")
    return base.source


def parse_size(text: str) -> int:
    """'160MiB', '1.5GB', '123456' -> bytes (the runtime's reading of sizes, as a packager error)."""
    try:
        return memory.parse_size(text)
    except EdgepackError as exc:
        raise PackagerError(str(exc)) from None


def _quality_options(opts: BuildOptions, job: _ModelJob, source: gguf_info.GGUFInfo,
                     qtype: quant_types.QuantType | None, template: str | None) -> compress.QualityOptions:
    if job.tier is not None:
        gates.tolerance(job.tier)  # validate before any heavy work
    calibration, calibration_name = None, ""
    if not opts.no_calibration:
        calibration_name = opts.calibration.name if opts.calibration else "edgepack calibration.txt"
        calibration = evaluate.read_text(opts.calibration) if opts.calibration else evaluate.default_text("calibration")
    eval_text = None
    if not opts.no_eval or job.tier is not None:
        eval_text = evaluate.read_text(opts.eval_text) if opts.eval_text else evaluate.default_text("eval")
    target = job.target_size
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
        tier=job.tier,
        eval_text=eval_text,
        tasks=evaluate.load_tasks(opts.tasks) if opts.tasks else None,
        chat_template=template,
        measure_candidates=opts.report is not None,
        threads=opts.threads,
    )


def _write_report(directory: Path, job: _ModelJob, source: gguf_info.GGUFInfo, result: compress.Compressed) -> None:
    verdict = result.verdict.message if result.verdict else ""
    report.write_report(directory, report.BuildReport(
        model=job.name,
        reference=f"source {job.source.name} ({source.file_type})",
        reference_ppl=result.quality.get("ppl_reference"),
        candidates=tuple(result.candidates),
        layers=tuple(result.layers),
        tensors=tuple(result.tensors),
        steps=tuple(result.steps),
        tier=job.tier,
        verdict=verdict,
    ))


def _choose_quant(source: gguf_info.GGUFInfo, requested: str | None,
                  opts: BuildOptions) -> tuple[quant_types.QuantType | None, str]:
    """The type to quantize to (None: keep the source's tensors) and a note saying why."""
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
    stem = source.name.removesuffix(".gguf")  # a checkpoint directory: its own name
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-_")[:64] or "model"


def build_time() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), timezone.utc)
    return datetime.now(timezone.utc).replace(microsecond=0)


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
