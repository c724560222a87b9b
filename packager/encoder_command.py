"""`edgepack build-encoder`: a sentence encoder checkpoint -> a bundle of it in ONNX (INT8 or fp32) and/or as a .tflite
file, each measured against the source model and gated by the tier."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from edgepack.runtime import __version__, hardware, signatures
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX
from edgepack.runtime.cli_common import format_table
from edgepack.runtime.memory import format_mib

from . import encoder, encoder_build, tflite_export
from .build import build_time
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
    encoder_build.check(source, runtimes)  # a wrong directory or a missing converter, before torch is imported
    import torch

    torch.set_num_threads(threads)
    log = (lambda line: None) if quiet else (lambda line: click.echo(f"edgepack: {line}", err=True))
    key = signatures.load_private(sign_key) if sign_key else None
    with tempfile.TemporaryDirectory(prefix="edgepack-encoder-") as tmp:
        work = Path(tmp)
        gated = encoder_build.build_gated(source, name, quant=quant, runtimes=runtimes, tflite_quant=tflite_quant,
                                          tier=tier, work=work, threads=threads, log=log)
        built = gated.build
        created = build_time()
        encoder.write_bundle([built], output, name=name, board=board, work=work,
                             created=created.isoformat().replace("+00:00", "Z"), mtime=int(created.timestamp()),
                             bundle_version=bundle_version if bundle_version is not None else int(created.timestamp()),
                             builder=f"edgepack {__version__}", key=key)
    q = built.info.tflite.quality if built.info.graph is None else built.info.quality  # type: ignore[union-attr]
    click.echo(format_table([encoder_build.HEADER, *gated.rows]))
    for line in gated.verdicts:
        click.echo(f"quality: {line}")
    click.echo(f"(on {q['sentences']} sentences; retrieval accuracy {q['candidate_accuracy']:.1%}, source model "
               f"{q['reference_accuracy']:.1%})")
    click.echo(f"wrote {output} ({format_mib(output.stat().st_size, 1)}) in {time.monotonic() - started:.1f}s")
