"""`edgepack build-encoder`: a sentence encoder checkpoint -> a bundle of it in ONNX, INT8 or fp32, measured, gated."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from edgepack.runtime import __version__, hardware, signatures
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX
from edgepack.runtime.cli_common import format_table
from edgepack.runtime.memory import format_mib

from . import encoder, encoder_eval
from .errors import PackagerError
from .gates import TIERS


@click.command(name="build-encoder")
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"The bundle to write ({BUNDLE_SUFFIX}).")
@click.option("--name", default="minilm", show_default=True, help="The encoder's name (the 'model' of /v1/embeddings).")
@click.option("--quant", type=click.Choice(encoder.QUANTS), default="int8", show_default=True)
@click.option("--tier", type=click.Choice(list(TIERS)), default="general", show_default=True,
              help="Tolerance tier: refuse an encoder whose embeddings change more.")
@click.option("--board", default="host", show_default=True, help="The board profile the bundle is for.")
@click.option("--bundle-version", type=click.IntRange(0), help="Monotonic bundle version (default: build time).")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the bundle's manifest with this ed25519 private key (edgepack keygen).")
@click.option("--threads", default=hardware.default_threads(), show_default=True, type=click.IntRange(1))
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def build_encoder_command(source: Path, output: Path, name: str, quant: str, tier: str, board: str,
                          bundle_version: int | None, sign_key: Path | None, threads: int, quiet: bool) -> None:
    """Export SOURCE (a sentence-transformers BERT checkpoint directory, e.g. all-MiniLM-L6-v2) to ONNX, quantize
    it, measure it against the source model and write a bundle that serves /v1/embeddings."""
    started = time.monotonic()
    parsed = encoder.read_source(source)  # a wrong directory is refused before torch is imported
    import torch

    from .build import _now  # the build time, SOURCE_DATE_EPOCH honoured, as `edgepack build` records it

    torch.set_num_threads(threads)
    log = (lambda line: None) if quiet else (lambda line: click.echo(f"edgepack: {line}", err=True))
    key = signatures.load_private(sign_key) if sign_key else None
    with tempfile.TemporaryDirectory(prefix="edgepack-encoder-") as tmp:
        work = Path(tmp)
        built, fp32 = encoder.build_encoder(parsed, name, quant, work, threads=threads, log=log)
        verdict = encoder_eval.judge(tier, encoder_eval.EncoderMetrics(**built.info.quality))
        if not verdict.passed:
            raise PackagerError(f"encoder {name!r} {verdict.message}")
        created = _now()
        built = encoder.with_quality(built, tier=tier, verdict=verdict.message)
        encoder.write_bundle([built], output, name=name, board=board, work=work,
                             created=created.isoformat().replace("+00:00", "Z"), mtime=int(created.timestamp()),
                             bundle_version=bundle_version if bundle_version is not None else int(created.timestamp()),
                             builder=f"edgepack {__version__}", key=key)
    q = built.info.quality
    rows = [("ENCODER", "QUANT", "SIZE", "FP32 SIZE", "DIMS", "BLOBS", "COSINE MEAN", "COSINE MIN", "TOP-1")]
    rows.append((name, quant, format_mib(built.bytes, 1), format_mib((fp32 or built).bytes, 1),
                 str(built.info.dimensions), str(len(built.info.segments) + 2), f"{q['cosine_mean']:.4f}",
                 f"{q['cosine_min']:.4f}", f"{q['top1_agreement']:.1%}"))
    click.echo(format_table(rows))
    click.echo(f"quality: {verdict.message} (on {q['sentences']} sentences; retrieval accuracy "
               f"{q['candidate_accuracy']:.1%}, source model {q['reference_accuracy']:.1%})")
    click.echo(f"wrote {output} ({format_mib(output.stat().st_size, 1)}) in {time.monotonic() - started:.1f}s")
