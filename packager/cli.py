"""Host commands of `edgepack`: build, inspect, eval, demo, wheels (registered into the runtime's command group)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

from edgepack.runtime import hardware, signatures
from edgepack.runtime.boards import HOST, load_board
from edgepack.runtime.bundle_format import BUNDLE_SUFFIX, Manifest
from edgepack.runtime.cli_common import format_table
from edgepack.runtime.memory import format_mib
from edgepack.runtime.store import bundle_manifest

from . import build as build_mod
from . import evaluate, gguf_info, imatrix, model_files, vocab, wheels
from . import recipe as recipe_mod
from .build import parse_size
from .convert_lora import convert_lora
from .errors import PackagerError
from .evaluate import SCORINGS, read_text
from .gates import TIERS


@click.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"The bundle to write (*{BUNDLE_SUFFIX}).")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="A TOML recipe of models, adapters and agents (see `edgepack init`) instead of SOURCE.")
@click.option("--board", help="Target board profile (see `edgepack boards`; default: the recipe's, else this host).")
@click.option("--quant", help="llama.cpp type (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, ...) or 'keep'; "
                              "default: the board's, or keep for an already quantized source.")
@click.option("--allow-requantize", is_flag=True, help="Requantize an already quantized source.")
@click.option("--chat-template", help="A llama.cpp built-in template name (gemma, chatml, llama3, ...).")
@click.option("--name", help="Model name clients use (default: from the file name); with a recipe, the bundle's.")
@click.option("--bundle-version", type=click.IntRange(0), help="Monotonic bundle version (default: build time).")
@click.option("--blocks-per-segment", default=4, show_default=True, type=click.IntRange(1))
@click.option("--since", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a delta: only the blobs this older bundle does not have.")
@click.option("--calibration", help="Calibration text for the importance matrix (default: the project's own "
                                     "text), or 'none' to quantize without one.")
@click.option("--imatrix", "imatrix_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A precomputed importance matrix (edgepack calibrate / llama-imatrix GGUF format).")
@click.option("--target-size", help="Plan per-tensor types to fit this size: bytes or with a unit (160MiB, 1.2GB).")
@click.option("--target-bpw", type=click.FloatRange(1, 32), help="Plan per-tensor types for these bits per weight.")
@click.option("--prune", help="Drop blocks: 'auto' (as many as the --tier allows) or a count; with --target-size "
                              "or --target-bpw, the plan then spends the target on the remaining blocks.")
@click.option("--tier", type=click.Choice(list(TIERS)), help="Tolerance tier: refuse a model that degrades more.")
@click.option("--eval-text", type=click.Path(dir_okay=False, path_type=Path),
              help="Text to measure quality on (default: the project's own evaluation text).")
@click.option("--tasks", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL agent prompts: the answers must stay the same (part of the tier's measure).")
@click.option("--no-eval", is_flag=True, help="Do not measure quality (not with --tier).")
@click.option("--vocab", "vocab_spec", help="Trim the vocabulary to the agent's language: 'auto' (the smallest "
                                            "within --tier), a token count (32768, 32k) or a file of token ids.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path),
              help="Write a report (tables, plots) of the candidates, layers and types to this directory.")
@click.option("--threads", default=hardware.default_threads(), show_default=True, type=click.IntRange(1))
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the bundle's manifest with this ed25519 private key (edgepack keygen).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def build(source: Path | None, output: Path, recipe: Path | None, board: str | None, quant: str | None,
          allow_requantize: bool, chat_template: str | None, name: str | None, bundle_version: int | None,
          blocks_per_segment: int, since: Path | None, calibration: str | None, imatrix_file: Path | None,
          target_size: str | None, target_bpw: float | None, prune: str | None, tier: str | None,
          eval_text: Path | None, tasks: Path | None, no_eval: bool, vocab_spec: str | None, report: Path | None,
          threads: int, sign_key: Path | None, quiet: bool) -> None:
    """Quantize SOURCE (a GGUF model, or a Hugging Face checkpoint directory, converted by llama.cpp's
    convert_hf_to_gguf.py), or the models of a --recipe, for a board and write one compressed, verifiable bundle."""
    if prune is not None and prune != "auto" and not prune.isdigit():
        raise PackagerError(f"--prune {prune!r}: expected 'auto' or a number of blocks")
    if (source is None) == (recipe is None):
        raise PackagerError("give either a SOURCE model or --recipe FILE")
    trim = vocab.parse_request(vocab_spec) if vocab_spec is not None else None
    parsed = recipe_mod.load(recipe) if recipe else None
    result = build_mod.build(build_mod.BuildOptions(
        source=source, recipe=parsed, output=output, board=load_board(board or (parsed and parsed.board) or HOST),
        quant=quant, allow_requantize=allow_requantize, chat_template=chat_template, name=name,
        bundle_version=bundle_version, blocks_per_segment=blocks_per_segment, quiet=quiet, since=since,
        calibration=None if calibration in (None, "none") else Path(calibration),
        no_calibration=calibration == "none", imatrix=imatrix_file,
        target_size=parse_size(target_size) if target_size else None, target_bpw=target_bpw, prune=prune,
        tier=tier, eval_text=eval_text, tasks=tasks, no_eval=no_eval, report=report, threads=threads,
        sign=sign_key, vocab=trim,
    ))
    rows = [("MODEL", "SOURCE", "MODEL SIZE", "BITS/WEIGHT", "SEGMENTS", "TYPE")]
    for m in result.models:
        rows.append((m.info.name, f"{format_mib(m.source_size, 1)} {m.info.source.get('file_type', '')}",
                     format_mib(m.model_size, 1), f"{m.bits_per_weight:.2f}", str(len(m.info.segments)),
                     m.info.file_type))
    click.echo(format_table(rows))
    for m in result.models:
        _echo_model_details(m, len(result.models) > 1)
    if result.manifest.adapters:
        click.echo("adapters: " + ", ".join(f"{a.name} (on {a.base})" for a in result.manifest.adapters))
    for e in result.manifest.encoders:
        for runtime, quant, q in (("onnx", e.quant, e.quality), ("tflite", e.tflite and e.tflite.quant,
                                                                  e.tflite and e.tflite.quality)):
            if quant:
                click.echo(f"encoder {e.name} ({runtime}): {quant}, {e.dimensions} dimensions, cosine to the source "
                           f"model {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f}), nearest-neighbour agreement "
                           f"{q['top1_agreement']:.1%}")
    if result.manifest.agents:
        click.echo("agents: " + ", ".join(a.name for a in result.manifest.agents))
    if result.shared_bytes:
        click.echo(f"shared segments: {format_mib(result.shared_bytes, 1)} stored once instead of per model")
    delta = f" (delta since {result.manifest.delta_since}: {result.blobs_shipped} of " \
            f"{len(result.manifest.blobs)} blobs)" if result.manifest.delta_since else ""
    click.echo(f"bundle: {format_mib(result.bundle_size, 1)}, {result.bundle_size / result.source_size:.0%} of the "
               f"sources{delta}")
    signed = f", signed by {result.signed_by}" if result.signed_by else ""
    click.echo(f"wrote {result.output} ({result.manifest.name}, board {result.manifest.board}{signed}) "
               f"in {result.seconds:.1f}s")


@click.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The private key file to write; the public key goes to OUTPUT.pub.")
def keygen(output: Path) -> None:
    """Write an ed25519 key pair for signing bundles (build --sign KEY; on devices: edgepack trust add KEY.pub)."""
    kid = signatures.generate(output)
    click.echo(f"wrote {output} (private, keep it secret) and {output}.pub: key {kid}")


def _echo_model_details(m: build_mod.ModelResult, prefix_name: bool) -> None:
    prefix = f"{m.info.name}: " if prefix_name else ""
    quality = m.quality
    if "kld_mean" in quality:
        click.echo(f"{prefix}quality vs source: PPL {quality['ppl_reference']:.3f} -> {quality['ppl_candidate']:.3f}, "
                   f"mean KLD {quality['kld_mean']:.5f}, p99 KLD {quality['kld_p99']:.4f}, "
                   f"top-1 agreement {quality['top1_agreement']:.2%} ({quality['tokens']} positions)")
    if "vocab" in quality:
        click.echo(f"{prefix}{_vocab_line(quality['vocab'])}")
    if m.info.plan:
        plan = m.info.plan
        types = ", ".join(f"{k}x{v}" for k, v in plan["types"].items())
        click.echo(f"{prefix}plan: {len(plan['tensors'])} tensors planned for {plan['target_bytes']:,} bytes "
                   f"(got {plan['size']:,}): {types}")
    if quality.get("pruned_layers"):
        click.echo(f"{prefix}pruned blocks: {quality['pruned_layers']}")
    if m.steps:
        click.echo(f"{prefix}steps: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in m.steps))


def _vocab_line(v: dict) -> str:
    line = (f"vocabulary: {v['kept']:,} of {v['source_tokens']:,} tokens kept ({v['required']:,} required), "
            f"tokenization unchanged on {v['unchanged_calibration']:.1%} of the calibration text")
    if v.get("unchanged_eval") is not None:
        line += f", {v['unchanged_eval']:.1%} of the evaluation text"
    if v.get("bpb_candidate") is not None:
        line += f"; bits per byte {v['bpb_reference']:.4f} -> {v['bpb_candidate']:.4f}"
    if v.get("tasks"):
        line += f"; task answers unchanged {v['tasks']['exact_match']:.1%} of {v['tasks']['tasks']}"
    return line


@click.command()
@click.argument("path", default="edgepack.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented example recipe (default: edgepack.toml)."""
    if path.exists() and not force:
        raise PackagerError(f"{path} exists: pass --force to overwrite it")
    path.write_text(recipe_mod.EXAMPLE)
    click.echo(f"wrote {path}: edit the sources, then `edgepack build --recipe {path} -o agents.edgepack`")


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a .gguf model or a .edgepack bundle."""
    if path.suffix == BUNDLE_SUFFIX:
        manifest = bundle_manifest(path)
        if as_json:
            click.echo(manifest.to_json().decode(), nl=False)
        else:
            click.echo(_bundle_table(path, manifest))
        return
    if path.suffix != ".gguf":
        raise PackagerError(f"{path}: expected a .gguf or {BUNDLE_SUFFIX} file")
    info = gguf_info.read(path)
    doc = {
        "path": str(path), "size": info.size, "architecture": info.architecture, "name": info.name,
        "file_type": info.file_type, "quantized": info.quantized, "parameters": info.parameters,
        "bits_per_weight": round(info.bits_per_weight, 3), "blocks": info.block_count,
        "context_length": info.context_length, "tensors": len(info.tensors), "quant_types": info.quant_types,
        "chat_template": info.chat_template is not None, "metadata_keys": info.kv_count,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(format_table([("FIELD", "VALUE")] + [(k, _show(v)) for k, v in doc.items()]))


@click.command(name="eval")
@click.argument("reference")
@click.argument("candidate")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Evaluation text (default: the project's own, packager/data/eval.txt).")
@click.option("--tasks", "tasks_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL of agent prompts whose greedy answers are compared.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(16, 8192), help="Chunk size in tokens.")
@click.option("--scoring", default="half", show_default=True, type=click.Choice(SCORINGS),
              help="half: score the second half of each chunk (llama-perplexity's convention); all: every position.")
@click.option("--chunks", "max_chunks", type=click.IntRange(1), help="Use at most this many chunks.")
@click.option("--threads", default=hardware.default_threads(), show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def eval_command(reference: str, candidate: str, text_file: Path | None, tasks_file: Path | None, ctx: int,
                 scoring: str, max_chunks: int | None, threads: int, as_json: bool) -> None:
    """Measure CANDIDATE against REFERENCE (each a .gguf, a checkpoint directory, or a .edgepack[#model]): bits per
    byte, PPL, KLD, top-1, tasks. Models with different vocabularies are compared by bits per byte and tasks."""
    started = time.monotonic()
    text = read_text(text_file) if text_file else evaluate.default_text("eval")
    with tempfile.TemporaryDirectory(prefix="edgepack-eval-") as scratch:
        ref = model_files.resolve(reference, Path(scratch))
        cand = model_files.resolve(candidate, Path(scratch))
        per_byte = evaluate.compare_bytes(ref.paths, cand.paths, text, window=2 * ctx, max_windows=max_chunks,
                                          threads=threads)
        with vocab.VocabModel(ref.paths) as a, vocab.VocabModel(cand.paths) as b:
            sizes = (a.n_vocab, b.n_vocab)
        metrics = None
        if sizes[0] == sizes[1]:
            metrics = evaluate.compare_text(ref.paths, cand.paths, text, ctx=ctx, scoring=scoring,
                                            max_chunks=max_chunks, threads=threads)
        tasks = None
        if tasks_file is not None:
            tasks = evaluate.compare_tasks(ref.paths, cand.paths, evaluate.load_tasks(tasks_file), threads=threads,
                                           chat_template=ref.chat_template or cand.chat_template)
    doc = evaluate.as_dict(metrics, tasks, time.monotonic() - started, per_byte)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [("METRIC", "VALUE"), ("reference", ref.label), ("candidate", cand.label),
            ("bits/byte reference", f"{per_byte.bpb_reference:.4f}"),
            ("bits/byte candidate", f"{per_byte.bpb_candidate:.4f} "
                                    f"({per_byte.bpb_candidate / per_byte.bpb_reference - 1:+.2%})"),
            ("bytes scored", f"{per_byte.bytes} ({per_byte.windows} windows of up to {2 * ctx} bytes)")]
    if metrics is None:
        rows += [("PPL, KLD, top-1", f"not comparable: vocabularies of {sizes[0]:,} and {sizes[1]:,} tokens")]
    else:
        rows += [
            ("PPL reference", f"{metrics.ppl_reference:.4f}"), ("PPL candidate", f"{metrics.ppl_candidate:.4f}"),
            ("mean KLD", f"{metrics.kld_mean:.6f}"), ("median KLD", f"{metrics.kld_median:.6f}"),
            ("p99 KLD", f"{metrics.kld_p99:.6f}"), ("top-1 agreement", f"{metrics.top1_agreement:.2%}"),
            ("positions scored", f"{metrics.tokens} ({metrics.chunks} chunks of {ctx}, scoring {scoring})"),
        ]
    if tasks is not None:
        rows += [("task exact match", f"{tasks.exact_match:.2%} of {tasks.tasks}")]
        if tasks.structured:
            rows += [("tool/JSON name agreement", f"{tasks.name_agreement:.2%} of {tasks.structured}"),
                     ("tool/JSON argument agreement", f"{tasks.arguments_agreement:.2%}")]
    click.echo(format_table(rows))


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration text (default: the project's own, packager/data/calibration.txt).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The importance matrix to write (GGUF, llama.cpp's imatrix format).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(16, 8192))
@click.option("--chunks", "max_chunks", type=click.IntRange(1), help="Use at most this many chunks.")
@click.option("--threads", default=hardware.default_threads(), show_default=True, type=click.IntRange(1))
def calibrate(model: Path, text_file: Path | None, output: Path, ctx: int, max_chunks: int | None,
              threads: int) -> None:
    """Collect MODEL's importance matrix (mean squared activations per input channel) over a text."""
    text = read_text(text_file) if text_file else evaluate.default_text("calibration")
    dataset = text_file.name if text_file else "edgepack calibration.txt"
    matrix = imatrix.collect([model], text, ctx=ctx, threads=threads, max_chunks=max_chunks, dataset=dataset)
    imatrix.save(matrix, output)
    click.echo(f"wrote {output}: {len(matrix.sums)} tensors, {matrix.chunks} chunks of {ctx} tokens")


def _bundle_table(path: Path, m: Manifest) -> str:
    head = [("FIELD", "VALUE")] + [(k, str(v)) for k, v in (
        ("bundle", path.name), ("name", m.name), ("version", m.bundle_version), ("created", m.created),
        ("builder", m.builder), ("llama.cpp", m.llama_cpp_version), ("board", m.board),
        ("blobs", f"{len(m.blobs)}: {format_mib(sum(b.size for b in m.blobs.values()), 1)} stored, "
                  f"{format_mib(sum(b.zsize for b in m.blobs.values()), 1)} shipped"),
    )]
    rows = [("MODEL", "ARCH", "PARAMS", "TYPE", "SEGMENTS", "SIZE", "CHAT TEMPLATE")]
    for model in m.models:
        size = sum(m.blobs[d].size for d in model.segments)
        rows.append((model.name, model.architecture, f"{model.parameters / 1e6:.1f}M", model.file_type,
                     str(len(model.segments)), format_mib(size, 1), model.chat_template or "(model's own)"))
    return format_table(head) + "\n\n" + format_table(rows)




@click.command(name="wheels")
@click.option("--board", required=True, help="The board to build for: rpi4, rpi5 or jetson-orin-nano.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The wheelhouse folder to write (new, or an earlier wheelhouse).")
@click.option("--python", help="The board's Python, e.g. 3.13 on Raspberry Pi OS Trixie (default: the board OS's).")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(1), help="Parallel compile jobs.")
@click.option("--json", "as_json", is_flag=True, help=f"Print the wheelhouse's record (also in DIR/{wheels.RECORD}).")
def wheels_command(board: str, output: Path, python: str | None, jobs: int, as_json: bool) -> None:
    """Build a wheelhouse that installs the device runtime on BOARD offline, with no compiler there:
    llama-cpp-python cross-compiled for the board's CPU, the other dependencies' wheels for its platform, and
    edgepack. On the board: pip install --no-index --find-links DIR edgepack."""
    record = wheels.build_wheelhouse(board, output, python, jobs=jobs, log=None if as_json else sys.stderr)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for line in wheels.summary(record):
        click.echo(line)


def _show(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**6:
        return f"{value:,}"
    return str(value)


def register(group: click.Group) -> None:
    from .demo import demo
    from .deploy import ansible_roles_command, delta_command, deploy_command
    from .encoder_command import build_encoder_command
    from .flash_command import flash_command

    for command in (build, init, inspect, eval_command, calibrate, convert_lora, demo, deploy_command, keygen,
                    wheels_command, delta_command, ansible_roles_command, flash_command, build_encoder_command):
        group.add_command(command)
