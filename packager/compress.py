"""The measured compression step of a build: calibrate, prune, plan, quantize, evaluate, gate.

llama.cpp does every heavy step; this module decides what to ask it for and measures the result
against the source model, so the build can refuse what breaks the agent's tolerance tier.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from . import evaluate, gates, gguf_info, imatrix, plan, prune, quant_types, quantize
from .errors import PackagerError
from .gguf_info import GGUFInfo
from .report import CandidateRow, LayerRow, TensorRow

CALIBRATION_CHUNKS = 8
EVAL_CHUNKS = 8
PRUNE_EVAL_CHUNKS = 3
TARGET_TOLERANCE = 0.03  # a size target is met within 3%


@dataclass(frozen=True)
class QualityOptions:
    quant: quant_types.QuantType | None  # None: keep the source's types
    allow_requantize: bool = False
    calibration_text: str | None = None  # None: no importance matrix
    calibration_name: str = ""
    imatrix_file: Path | None = None
    target_bytes: int | None = None
    prune: int | str | None = None  # a block count, "auto", or None
    tier: str | None = None
    eval_text: str | None = None  # None: do not measure
    tasks: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    measure_candidates: bool = False  # also measure the uniform ladder types (for the report)
    threads: int = 2
    # Importance matrices by (architecture, parameters), shared by the models of one build: variants of a
    # base then quantize their identical tensors identically, so those segments stay shared.
    imatrix_cache: dict[tuple[str, int], imatrix.Imatrix] | None = None


@dataclass
class Compressed:
    model: Path
    quality: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    candidates: list[CandidateRow] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    tensors: list[TensorRow] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    verdict: gates.Verdict | None = None


def compress(source: GGUFInfo, work: Path, opts: QualityOptions, note: Callable[[str], None]) -> Compressed:
    out = Compressed(model=source.path)
    tolerance = gates.tolerance(opts.tier) if opts.tier else None
    if opts.prune == "auto" and tolerance is None:
        raise PackagerError("--prune auto needs a tolerance tier (--tier critical|general|low-risk)")
    if opts.target_bytes is not None and opts.imatrix_file is None and opts.calibration_text is None:
        raise PackagerError("--target-size needs an importance matrix: do not pass --calibration none")
    changes = opts.quant is not None or opts.target_bytes is not None or opts.prune is not None
    if not changes:
        return out
    quant = opts.quant or _keep_type(source)

    def step(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        note(name)
        started = time.monotonic()
        result = fn(*args, **kwargs)
        out.steps.append((name, round(time.monotonic() - started, 2)))
        return result

    matrix = None
    if opts.imatrix_file is not None:
        matrix = step("load imatrix", imatrix.load, opts.imatrix_file)
    elif opts.calibration_text is not None:
        key = (source.architecture, source.parameters)
        cache = opts.imatrix_cache if opts.imatrix_cache is not None else {}
        if key not in cache:
            cache[key] = step("calibrate (imatrix)", imatrix.collect, [source.path], opts.calibration_text,
                              threads=opts.threads, max_chunks=CALIBRATION_CHUNKS, dataset=opts.calibration_name)
        matrix = cache[key]

    with contextlib.ExitStack() as stack:
        reference = None
        if opts.eval_text is not None or opts.prune is not None:
            # Every comparison of this build (pruning steps, ladder types, the result) shares one pass of
            # the source over the evaluation text.
            chunks = EVAL_CHUNKS if opts.eval_text is not None else PRUNE_EVAL_CHUNKS
            reference = stack.enter_context(step(
                "evaluate source", evaluate.Reference, [source.path], opts.eval_text or evaluate.default_text("eval"),
                max_chunks=chunks, threads=opts.threads, scratch=work))

        pruned: list[int] = []
        if opts.prune is not None:
            assert reference is not None
            pruned = step("prune", _prune, source, quant, matrix, work, opts, out, tolerance, reference)

        if opts.target_bytes is not None:
            assert matrix is not None
            planned, planned_matrix = source, matrix
            if pruned:
                planned = gguf_info.read(step("drop pruned blocks", _without_blocks, source, pruned,
                                              work / "pruned-source.gguf", opts.threads))
                planned_matrix = matrix.renamed(lambda name: prune.renamed(name, pruned))
            out.model = step("plan + quantize", _planned, planned, planned_matrix, work, opts, out, reference)
        else:
            out.model = work / "model.gguf"
            step(f"quantize {quant.name}", quantize.quantize, source.path, out.model, quant,
                 allow_requantize=opts.allow_requantize, imatrix=matrix, prune_layers=pruned, threads=opts.threads)

        model = gguf_info.read(out.model)
        if opts.eval_text is not None:
            assert reference is not None
            metrics = step("evaluate", reference.compare, [out.model])
            tasks = None
            if opts.tasks:
                tasks = step("evaluate tasks", evaluate.compare_tasks, [source.path], [out.model], opts.tasks,
                             threads=opts.threads, chat_template=opts.chat_template)
            out.quality = {"reference": source.path.name, **evaluate.as_dict(metrics, tasks, 0)}
            out.quality.pop("seconds")
            out.candidates.append(_row(_label(opts, quant, pruned), "plan" if out.plan else
                                       ("pruned" if pruned else "uniform"), model, metrics, chosen=True))
            if opts.tier:
                out.verdict = gates.judge(opts.tier, metrics, tasks)
                out.quality["tier"] = {"name": opts.tier, "passed": out.verdict.passed,
                                       "degradation": round(out.verdict.degradation, 6)}
    if pruned:
        out.quality["pruned_layers"] = pruned
    out.tensors = [TensorRow(t.name, t.type_name, t.n_bytes) for t in model.tensors]
    return out


def _keep_type(source: GGUFInfo) -> quant_types.QuantType:
    """The file type that leaves a quantized source's tensors as they are (for pruning or planning)."""
    known = quant_types.TYPES.get(source.file_type)
    if known is None:
        raise PackagerError(f"source type {source.file_type} is unknown: pass --quant TYPE")
    return known


def _label(opts: QualityOptions, quant: quant_types.QuantType, pruned: list[int]) -> str:
    label = f"plan@{opts.target_bytes / 2**20:.1f}MiB" if opts.target_bytes else quant.name
    return label + (f"-{len(pruned)}L" if pruned else "")


def _row(label: str, kind: str, model: GGUFInfo, metrics: evaluate.TextMetrics, chosen: bool = False,
         note: str = "") -> CandidateRow:
    return CandidateRow(label, kind, model.size, model.bits_per_weight, metrics.ppl_candidate, metrics.kld_mean,
                        metrics.kld_p99, metrics.top1_agreement, chosen, note)


def _prune(source: GGUFInfo, quant: quant_types.QuantType, matrix: imatrix.Imatrix | None, work: Path,
           opts: QualityOptions, out: Compressed, tolerance: float | None, reference: evaluate.Reference) -> list[int]:
    text = opts.calibration_text or evaluate.default_text("calibration")
    n_layer = source.block_count
    trial = work / "prune-trial.gguf"

    def make(pruned: list[int]) -> Path:
        if not pruned:
            return source.path
        if opts.target_bytes is None:
            quantize.quantize(source.path, trial, quant, allow_requantize=opts.allow_requantize, imatrix=matrix,
                              prune_layers=pruned, threads=opts.threads)
            return trial
        # The plan chooses the types afterwards: what a block's removal costs is measured on the source's own.
        return _without_blocks(source, pruned, trial, opts.threads)

    def influence_of(pruned: list[int]) -> list[float]:
        return prune.block_influence([make(pruned)], text, n_layer=n_layer - len(pruned), threads=opts.threads)

    def degradation_of(pruned: list[int]) -> float:
        return 1 - reference.compare([make(pruned)], max_chunks=PRUNE_EVAL_CHUNKS).top1_agreement

    count = None if opts.prune == "auto" else int(opts.prune)
    if count is not None and not 0 < count < n_layer - 1:
        raise PackagerError(f"--prune {count}: the model has {n_layer} blocks; prune between 1 and {n_layer - 2}")
    result = prune.progressive(n_layer, influence_of, degradation_of, count=count, tolerance=tolerance)
    dropped = {s.layer: s.degradation for s in result.steps}
    out.layers = [LayerRow(i, score, dropped.get(i), i in result.pruned) for i, score in enumerate(result.influence)]
    out.quality["prune_steps"] = [asdict(s) for s in result.steps]
    return result.pruned


def _without_blocks(source: GGUFInfo, pruned: list[int], path: Path, threads: int) -> Path:
    """The source with those blocks dropped (llama.cpp renumbers the rest) and every other tensor as it was:
    each keeps its type by name, since llama.cpp would decide a mix's types again for the new numbering."""
    types = {}
    for tensor in source.tensors:
        name = prune.renamed(tensor.name, pruned)
        if name is not None:
            types[name] = int(gguf.GGMLQuantizationType[tensor.type_name])
    quantize.quantize(source.path, path, _keep_type(source), tensor_types=types, prune_layers=pruned, pure=True,
                      threads=threads)
    return path


def _planned(source: GGUFInfo, matrix: imatrix.Imatrix, work: Path, opts: QualityOptions, out: Compressed,
             reference: evaluate.Reference | None) -> Path:
    """Per-tensor types of `source` (the build's source, or it with pruned blocks dropped) to the target size."""
    if source.quantized and not opts.allow_requantize:
        raise PackagerError(f"source is already quantized ({source.file_type}); planning requantizes it: "
                            "pass --allow-requantize")
    ladder = plan.build_ladder(source, matrix, work, allow_requantize=opts.allow_requantize, threads=opts.threads)
    if opts.measure_candidates and opts.eval_text is not None:
        assert reference is not None
        for name, path in ladder.files.items():
            metrics = reference.compare([path])
            out.candidates.append(_row(f"{name} (pure)", "uniform", gguf_info.read(path), metrics))
    target = opts.target_bytes
    assert target is not None
    path = work / "model.gguf"
    goal = target
    for _ in range(4):  # the plan predicts the planned tensors' bytes; the rest is corrected by measuring
        chosen = plan.choose(ladder, goal)
        quantize.quantize(source.path, path, quant_types.parse(chosen.base), allow_requantize=opts.allow_requantize,
                          imatrix=matrix, tensor_types=chosen.tensor_types(), pure=True,
                          threads=opts.threads)
        size = path.stat().st_size
        if size <= target:
            break
        goal -= size - target
    else:
        raise PackagerError(f"could not fit the target size of {target:,} bytes (last try: {size:,})")
    if size < target * (1 - TARGET_TOLERANCE):
        out.quality["target_note"] = f"plan is {1 - size / target:.1%} below the target: no larger choice helps"
    out.plan = {
        "target_bytes": target, "size": size, "base": chosen.base,
        "predicted_error": chosen.predicted_error,
        "types": dict(sorted(Counter(o.type_name for o in chosen.choices.values()).items())),
        "tensors": {name: o.type_name for name, o in sorted(chosen.choices.items())},
    }
    return path
