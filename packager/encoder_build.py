"""One sentence encoder built and gated, for `edgepack build-encoder` and for a recipe's [encoders.NAME]: the ONNX
graph (INT8 or fp32) and/or the .tflite file, each measured against the source model and refused below the tier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.runtime.memory import format_mib

from . import encoder, encoder_eval, tflite_export
from .errors import PackagerError

RUNTIMES = ("onnx", "tflite", "both")
HEADER = ("ENCODER", "RUNTIME", "QUANT", "SIZE", "FP32 SIZE", "DIMS", "BLOBS", "COSINE MEAN", "COSINE MIN", "TOP-1")
_METRICS = ("cosine_mean", "cosine_min", "top1_agreement", "reference_accuracy", "candidate_accuracy", "sentences",
            "queries")


@dataclass(frozen=True)
class GatedEncoder:
    build: encoder.EncoderBuild
    rows: list[tuple[str, ...]]  # one per runtime, under HEADER
    verdicts: list[str]  # one line per runtime


def check(source: Path, runtimes: str) -> encoder.EncoderSource:
    """The checkpoint read, and the converter present when a .tflite is wanted: before any slow step."""
    parsed = encoder.read_source(source)
    if runtimes not in RUNTIMES:
        raise PackagerError(f"unknown encoder runtime {runtimes!r}: choose {', '.join(RUNTIMES)}")
    if runtimes != "onnx":
        tflite_export.check_converter()
    return parsed


def build_gated(source: Path, name: str, *, quant: str, runtimes: str, tflite_quant: str, tier: str, work: Path,
                threads: int, log: Callable[[str], None]) -> GatedEncoder:
    """The encoder `name` from the checkpoint `source`, built in `work` for `runtimes` (onnx, tflite or both)."""
    parsed = check(source, runtimes)
    rows: list[tuple[str, ...]] = []
    verdicts: list[str] = []
    built = None
    if runtimes != "tflite":
        built, fp32 = encoder.build_encoder(parsed, name, quant, work, threads=threads, log=log)
        verdict = _gate(name, "ONNX", tier, built.info.quality)
        built = encoder.with_quality(built, tier=tier, verdict=verdict.message)
        rows.append(_row(name, "onnx", quant, built.bytes, (fp32 or built).bytes, built.info.dimensions,
                         len(built.info.segments) + 2, built.info.quality))
        verdicts.append(f"onnx {verdict.message}")
    if runtimes != "onnx":
        result, verdict = _export_tflite(source, work, tflite_quant, tier, log)
        quality = {**result.metrics.as_dict(), "tier": tier, "verdict": verdict.message,
                   "interpreter": result.runtime}
        built = encoder.with_tflite(built, parsed, name, result.path, result.quant, quality)
        rows.append(_row(name, "tflite", result.quant, result.bytes, result.fp32_bytes, built.info.dimensions, 2,
                         quality))
        verdicts.append(f"tflite {verdict.message} (runs on {result.runtime}; signatures "
                        f"{', '.join(result.signatures)})")
    assert built is not None
    return GatedEncoder(built, rows, verdicts)


def _gate(name: str, what: str, tier: str, quality: dict) -> encoder_eval.EncoderVerdict:
    verdict = encoder_eval.judge(tier, encoder_eval.EncoderMetrics(**{k: quality[k] for k in _METRICS}))
    if not verdict.passed:
        raise PackagerError(f"encoder {name!r} ({what}) {verdict.message}")
    return verdict


def _export_tflite(source: Path, work: Path, quant: str, tier: str,
                   log: Callable[[str], None]) -> tuple[tflite_export.TFLiteResult, encoder_eval.EncoderVerdict]:
    """The .tflite at `quant`; auto: int8 (4x smaller than fp32, the fastest) when it passes the tier, else
    int8-weights (as small, fp32's quality: MiniLM passes the critical tier with it), both measured."""
    for choice in ("int8", "int8-weights") if quant == "auto" else (quant,):
        result = tflite_export.export_tflite(source, work / f"encoder-{choice}.tflite", choice)
        log(result.summary())
        verdict = encoder_eval.judge(tier, result.metrics)
        if verdict.passed:
            return result, verdict
        log(f".tflite {choice} {verdict.message}")
    raise PackagerError(f"encoder .tflite ({result.quant}) {verdict.message}")


def _row(name: str, runtime: str, quant: str, size: int, fp32: int, dims: int, blobs: int,
         q: dict) -> tuple[str, ...]:
    return (name, runtime, quant, format_mib(size, 1), format_mib(fp32, 1), str(dims), str(blobs),
            f"{q['cosine_mean']:.4f}", f"{q['cosine_min']:.4f}", f"{q['top1_agreement']:.1%}")
