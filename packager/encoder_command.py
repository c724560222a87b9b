"""`edgepack build-encoder`: a sentence encoder checkpoint -> a bundle of it in ONNX (INT8 or fp32) and/or as a .tflite
file, each measured against the source model and gated by the tier."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from edgepack.runtime import __version__, hardware, signatures
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX
from edgepack.runtime.cli_common import format_table
from edgepack.runtime.memory import format_mib

from . import encoder, encoder_eval, tflite_export
from .errors import PackagerError
from .gates import TIERS


@click.command(name="build-encoder")
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"The bundle to write ({BUNDLE_SUFFIX}).")
@click.option("--name", default="minilm", show_default=True, help="The encoder's name (the 'model' of /v1/embeddings).")
@click.option("--quant", type=click.Choice(encoder.QUANTS), default="int8", show_default=True,
              help="Of the ONNX graph.")
@click.option("--runtime", "runtimes", type=click.Choice(["onnx", "tflite", "both"]), default="onnx",
              show_default=True, help="What the bundle carries: the ONNX graph (ONNX Runtime), a .tflite file (a "
                                      "TFLite interpreter; needs the converter, docs/tflite.md) or both; the device "
                                      "picks.")
@click.option("--tflite-quant", type=click.Choice(["auto", *tflite_export.QUANTS]), default="auto", show_default=True,
              help="Of the .tflite file; auto: int8 when it passes the tier, else int8-weights.")
@click.option("--tier", type=click.Choice(list(TIERS)), default="general", show_default=True,
              help="Tolerance tier: refuse an encoder whose embeddings change more.")
@click.option("--board", default="host", show_default=True, help="The board profile the bundle is for.")
@click.option("--bundle-version", type=click.IntRange(0), help="Monotonic bundle version (default: build time).")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the bundle's manifest with this ed25519 private key (edgepack keygen).")
@click.option("--threads", default=hardware.default_threads(), show_default=True, type=click.IntRange(1))
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def build_encoder_command(source: Path, output: Path, name: str, quant: str, runtimes: str, tflite_quant: str,
                          tier: str, board: str, bundle_version: int | None, sign_key: Path | None, threads: int,
                          quiet: bool) -> None:
    """Export SOURCE (a sentence-transformers BERT checkpoint directory, e.g. all-MiniLM-L6-v2) to ONNX and/or
    TFLite, quantize it, measure it against the source model and write a bundle that serves /v1/embeddings."""
    started = time.monotonic()
    parsed = encoder.read_source(source)  # a wrong directory is refused before torch is imported
    if runtimes != "onnx":
        tflite_export.check_converter()  # and a missing converter before the ONNX build's half minute
    import torch

    from .build import _now  # the build time, SOURCE_DATE_EPOCH honoured, as `edgepack build` records it

    torch.set_num_threads(threads)
    log = (lambda line: None) if quiet else (lambda line: click.echo(f"edgepack: {line}", err=True))
    key = signatures.load_private(sign_key) if sign_key else None
    rows = [("ENCODER", "RUNTIME", "QUANT", "SIZE", "FP32 SIZE", "DIMS", "BLOBS", "COSINE MEAN", "COSINE MIN", "TOP-1")]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="edgepack-encoder-") as tmp:
        work = Path(tmp)
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
        created = _now()
        encoder.write_bundle([built], output, name=name, board=board, work=work,
                             created=created.isoformat().replace("+00:00", "Z"), mtime=int(created.timestamp()),
                             bundle_version=bundle_version if bundle_version is not None else int(created.timestamp()),
                             builder=f"edgepack {__version__}", key=key)
    q = built.info.tflite.quality if built.info.graph is None else built.info.quality  # type: ignore[union-attr]
    click.echo(format_table(rows))
    for line in verdicts:
        click.echo(f"quality: {line}")
    click.echo(f"(on {q['sentences']} sentences; retrieval accuracy {q['candidate_accuracy']:.1%}, source model "
               f"{q['reference_accuracy']:.1%})")
    click.echo(f"wrote {output} ({format_mib(output.stat().st_size, 1)}) in {time.monotonic() - started:.1f}s")


def _gate(name: str, what: str, tier: str, quality: dict) -> encoder_eval.EncoderVerdict:
    verdict = encoder_eval.judge(tier, encoder_eval.EncoderMetrics(**{k: quality[k] for k in _METRICS}))
    if not verdict.passed:
        raise PackagerError(f"encoder {name!r} ({what}) {verdict.message}")
    return verdict


_METRICS = ("cosine_mean", "cosine_min", "top1_agreement", "reference_accuracy", "candidate_accuracy", "sentences",
            "queries")


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
