"""Quality metrics of `edgepack eval` against llama.cpp's own `llama-perplexity --kl-divergence`.

The reference (Gemma 3 270M Q4_K_M) is requantized to each type by llama.cpp's llama_model_quantize;
both tools then measure every candidate against the reference on the same text, context and chunks.
Run: .venv/bin/python bench/bench_quality.py [--chunks 8] [--threads 2] [--types Q8_0,Q6_K,...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import BIN, OUT, ROOT, BenchError, cpu_times, llama_tool, model_path, write_results

from edgepack.packager import gguf_info, quant_types
from edgepack.packager.errors import PackagerError
from edgepack.packager.quantize import quantize
from edgepack.runtime.cli_common import format_table

LLAMA_SRC = ROOT / "native" / "out" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BASE_LOGITS = OUT / "ref-logits.bin"
CTX = 512
DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K"
MIB = 2**20
NOISE = 1e-4


@dataclass(frozen=True)
class Metrics:
    """One tool's view of a candidate against the reference."""

    ppl_reference: float
    ppl_candidate: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    top1: float  # fraction of scored positions where both models' most likely token is the same
    seconds: float
    peak_bytes: int  # the tool's maximum resident set size
    cpu_seconds: float
    others_cpu_seconds: float  # taken by the machine's other processes meanwhile


@dataclass(frozen=True)
class Ran:
    """One tool run: its stdout, wall seconds, CPU seconds and peak resident memory (the kernel's, from wait4)."""

    stdout: str
    seconds: float
    peak_bytes: int
    cpu_seconds: float  # user + system: less sensitive than wall time to other work on the machine
    others_cpu_seconds: float  # CPU seconds the machine's other processes took meanwhile


@dataclass(frozen=True)
class EvalText:
    path: Path
    source: str  # where it came from, for the record


@dataclass(frozen=True)
class Row:
    qtype: str
    size: int
    parameters: int
    bpw_file: float  # file size * 8 / parameters (metadata and tokenizer included)
    bpw_tensors: float  # tensor data only, as `edgepack inspect` reports it
    quantize_s: float
    edgepack: Metrics
    llama: Metrics


# ---- inputs ----


def eval_text() -> EvalText:
    """The project's evaluation text, else a wikitext file in the llama.cpp source, else our READMEs."""
    own = ROOT / "packager" / "data" / "eval.txt"
    if own.is_file():
        return EvalText(own, "packager/data/eval.txt")
    wiki = sorted(LLAMA_SRC.rglob("*wiki*.raw")) if LLAMA_SRC.is_dir() else []
    if wiki:
        return EvalText(wiki[0], str(wiki[0].relative_to(ROOT)))
    readmes = sorted(p for p in ROOT.glob("**/README.md") if ".venv" not in p.parts and "out" not in p.parts)
    path = OUT / "readmes.txt"
    path.write_text("\n\n".join(p.read_text() for p in readmes))
    return EvalText(path, "README.md files concatenated: " + ", ".join(str(p.relative_to(ROOT)) for p in readmes))


def quantized_candidate(reference: Path, qtype: str, threads: int) -> tuple[Path, float]:
    """The reference requantized to `qtype` in bench/out/, and the seconds llama_model_quantize took."""
    target = OUT / f"{reference.stem}-to-{qtype}.gguf"
    started = time.perf_counter()
    try:
        quantize(reference, target, quant_types.parse(qtype), allow_requantize=True, threads=threads)
    except PackagerError as exc:
        raise BenchError(str(exc)) from None
    return target, time.perf_counter() - started


def describe(path: Path, qtype: str, quantize_s: float, edgepack: Metrics, llama: Metrics) -> Row:
    info = gguf_info.read(path)
    return Row(qtype, info.size, info.parameters, info.size * 8 / info.parameters, info.bits_per_weight,
               quantize_s, edgepack, llama)


# ---- the two tools ----


def edgepack_metrics(reference: Path, candidate: Path, text: Path, chunks: int, threads: int,
                     env: dict[str, str] | None = None) -> Metrics:
    """`edgepack eval` of one candidate (`env`: to run another checkout of edgepack, see bench_eval.py)."""
    cmd = [str(BIN / "edgepack"), "eval", str(reference), str(candidate), "--text", str(text), "--ctx", str(CTX),
           "--chunks", str(chunks), "--threads", str(threads), "--json"]
    ran = run_measured(cmd, OUT / f"edgepack-eval-{candidate.stem}.log", env)
    doc = json.loads(ran.stdout)
    return Metrics(doc["ppl_reference"], doc["ppl_candidate"], doc["kld_mean"], doc["kld_median"], doc["kld_p99"],
                   doc["top1_agreement"], ran.seconds, ran.peak_bytes, ran.cpu_seconds, ran.others_cpu_seconds)


def llama_base(reference: Path, text: Path, chunks: int, threads: int) -> tuple[float, Ran]:
    """Write the reference's log-probs to BASE_LOGITS; its PPL from float logits, and the run."""
    cmd = [llama_perplexity(), "-m", str(reference), "-f", str(text), "-c", str(CTX), "--chunks", str(chunks),
           "--kl-divergence-base", str(BASE_LOGITS), *_threads(threads)]
    log = OUT / "llama-perplexity-base.log"
    ran = run_measured(cmd, log)
    return _number(log, r"Final estimate: PPL = ([0-9.]+)"), ran


def llama_metrics(candidate: Path, chunks: int, threads: int) -> Metrics:
    """llama-perplexity's KL-divergence pass; it reads the tokens and chunk count from BASE_LOGITS."""
    cmd = [llama_perplexity(), "-m", str(candidate), "--kl-divergence-base", str(BASE_LOGITS), "--kl-divergence",
           "-c", str(CTX), "--chunks", str(chunks), *_threads(threads)]
    log = OUT / f"llama-perplexity-{candidate.stem}.log"
    ran = run_measured(cmd, log)
    return Metrics(
        ppl_reference=_number(log, r"Mean PPL\(base\)\s*:\s*([0-9.]+)"),
        ppl_candidate=_number(log, r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"),
        kld_mean=_number(log, r"Mean\s+KLD:\s*(-?[0-9.]+)"),
        kld_median=_number(log, r"Median\s+KLD:\s*(-?[0-9.]+)"),
        kld_p99=_number(log, r"99\.0%\s+KLD:\s*(-?[0-9.]+)"),
        top1=_number(log, r"Same top p:\s*([0-9.]+)") / 100,
        seconds=ran.seconds,
        peak_bytes=ran.peak_bytes,
        cpu_seconds=ran.cpu_seconds,
        others_cpu_seconds=ran.others_cpu_seconds,
    )


def llama_perplexity() -> str:
    return str(llama_tool("llama-perplexity", "native/build-llama-tools.sh"))


def _threads(threads: int) -> list[str]:
    return ["-t", str(threads), "-tb", str(threads)]


def _number(log: Path, pattern: str) -> float:
    """A number from a tool's log (llama-perplexity reports some errors with exit status 0)."""
    match = re.search(pattern, log.read_text())
    if match is None:
        raise BenchError(f"no {pattern!r} in {log.relative_to(ROOT)}: the run failed or its output changed")
    return float(match.group(1))


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Ran:
    """Run a tool with its stdout and stderr (where llama.cpp's tools log) kept in `log`; its wall seconds
    and peak RSS (wait4's ru_maxrss: this child alone, unlike getrusage(RUSAGE_CHILDREN), which keeps the max)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started, machine = time.perf_counter(), cpu_times()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds, busy = time.perf_counter() - started, cpu_times().busy_s - machine.busy_s
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    log.write_text(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}")
    if proc.returncode != 0:
        raise BenchError(f"{Path(cmd[0]).name} failed ({proc.returncode}), see {log.relative_to(ROOT)}: "
                         f"{stderr.strip()[-300:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Ran(stdout, seconds, usage.ru_maxrss * 1024, cpu, max(0.0, busy - cpu))


# ---- report ----


def relative(ours: float, theirs: float) -> float | None:
    """(ours - theirs) / theirs; None where theirs is at the level llama-perplexity reports for a candidate
    identical to the reference (its reference log-probs are stored in 16 bits, steps up to 2.4e-4 nats)."""
    return (ours - theirs) / theirs if abs(theirs) >= NOISE else None


def differences(row: Row) -> dict[str, float | None]:
    """edgepack relative to llama-perplexity per metric; top-1 as a difference of fractions."""
    e, lp = row.edgepack, row.llama
    out = {m: relative(getattr(e, m), getattr(lp, m)) for m in ("ppl_candidate", "kld_mean", "kld_median", "kld_p99")}
    return {**out, "top1_difference": e.top1 - lp.top1}


def report_table(rows: list[Row]) -> str:
    head = ("TYPE", "MIB", "BPW", "QUANT S", "PPL EP", "PPL LP", "Δ", "KLD EP", "KLD LP", "Δ",
            "P99 EP", "P99 LP", "Δ", "TOP1 EP", "TOP1 LP", "Δ PP")
    lines = [head]
    for r in rows:
        e, lp, d = r.edgepack, r.llama, differences(r)
        lines.append((
            r.qtype, f"{r.size / MIB:.1f}", f"{r.bpw_file:.2f}", f"{r.quantize_s:.1f}",
            f"{e.ppl_candidate:.3f}", f"{lp.ppl_candidate:.3f}", _pct(d["ppl_candidate"]),
            f"{e.kld_mean:.5f}", f"{lp.kld_mean:.5f}", _pct(d["kld_mean"]),
            f"{e.kld_p99:.4f}", f"{lp.kld_p99:.4f}", _pct(d["kld_p99"]),
            f"{e.top1:.2%}", f"{lp.top1:.2%}", _points(d["top1_difference"]),
        ))
    return format_table(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value, 4) + 0:+.2%}"  # + 0 turns a rounded -0.0 into 0.0


def _points(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{round(fraction * 100, 2) + 0:+.2f}"


def save_results(args: argparse.Namespace, text: EvalText, reference: Path, base: dict[str, float],
                 rows: list[Row], load_before: float) -> None:
    doc = {
        "settings": {"chunks": args.chunks, "threads": args.threads, "ctx": CTX, "scoring": "half",
                     "types": args.types},
        "text": {"source": text.source, "bytes": text.path.stat().st_size,
                 "sha256": hashlib.sha256(text.path.read_bytes()).hexdigest()},
        "reference": {"file": reference.name, "size": reference.stat().st_size},
        "llama_perplexity_base": base,
        "rows": [{**asdict(r), "relative": differences(r)} for r in rows],
    }
    # other work on the machine skews the seconds (never the metrics, which are deterministic)
    write_results("quality", doc, load_1min_before=load_before, load_1min_after=os.getloadavg()[0])


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8, help=f"chunks of {CTX} tokens to score (default 8)")
    p.add_argument("--threads", type=int, default=2, help="threads for both tools and quantization (default 2)")
    p.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated types (default {DEFAULT_TYPES})")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.threads < 1:
        p.error("--chunks and --threads must be >= 1")
    try:
        args.types = [quant_types.parse(t.strip()).name for t in args.types.split(",") if t.strip()]
    except PackagerError as exc:
        p.error(str(exc))
    return args


def bench(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    reference = model_path()
    text = eval_text()
    print(f"reference: {reference.name} ({reference.stat().st_size / MIB:.1f} MiB); text: {text.source}", flush=True)
    ppl, ran = llama_base(reference, text.path, args.chunks, args.threads)
    base = {"ppl_reference_float": ppl, "seconds": round(ran.seconds, 2), "peak_bytes": ran.peak_bytes}
    print(f"llama-perplexity base: PPL {ppl:.4f} in {ran.seconds:.1f}s -> {BASE_LOGITS.name}", flush=True)
    rows = []
    for qtype in args.types:
        candidate, quantize_s = quantized_candidate(reference, qtype, args.threads)
        ours = edgepack_metrics(reference, candidate, text.path, args.chunks, args.threads)
        theirs = llama_metrics(candidate, args.chunks, args.threads)
        rows.append(describe(candidate, qtype, quantize_s, ours, theirs))
        print(f"  {qtype:<7} quantize {quantize_s:5.1f}s  edgepack eval {ours.seconds:5.1f}s "
              f"{ours.peak_bytes / MIB:.0f} MiB  llama-perplexity {theirs.seconds:5.1f}s "
              f"{theirs.peak_bytes / MIB:.0f} MiB  KLD {ours.kld_mean:.5f} / {theirs.kld_mean:.5f}", flush=True)
    print()
    print(report_table(rows))
    ours_ref = sorted({r.edgepack.ppl_reference for r in rows})
    print(f"\nreference PPL: edgepack {' / '.join(f'{v:.4f}' for v in ours_ref)}; llama-perplexity "
          f"{ppl:.4f} from float logits, {rows[0].llama.ppl_reference:.4f} from its 16-bit log-probs")
    print("EP = edgepack eval, LP = llama-perplexity; Δ = (EP - LP) / LP, Δ PP = EP - LP in percentage points")
    save_results(args, text, reference, base, rows, load_before)


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_quality: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
