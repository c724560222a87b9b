"""Cost of `edgepack eval` against llama.cpp's `llama-perplexity` (wall seconds and peak memory on the same
candidate), and with --imatrix, of `edgepack calibrate`'s importance matrix against plain forward passes.

Each round runs, on one reference (Gemma 3 270M Q4_K_M), one candidate (it requantized, Q2_K by default), one
text and chunk count: llama-perplexity's base pass (the reference's log-probs to a file) and its KL-divergence
pass on the candidate; `edgepack eval REF CAND` (one command: reference pass, then candidate pass); edgepack's
reference pass and candidate pass (evaluate.Reference, as a build shares one reference among its candidates),
timed in this process; and with --before DIR, `edgepack eval` of another checkout (DIR/edgepack/
{packager,runtime,boards}, e.g. `git archive COMMIT packager runtime boards | tar -x -C DIR/edgepack`).
Rounds rotate the order. Goals (issue 8): time <= 1.2x and peak memory <= 1.0x llama-perplexity's.

--imatrix: each round runs, in child processes on the calibration text, a plain forward pass (logits of the
last position only, as generation computes them), one with the logits of every position, imatrix.collect
(with --before, also the other checkout's), and llama.cpp's llama-imatrix --process-output; and compares
the matrices (edgepack's with --before's, exactly; with llama-imatrix's, which sums in float32).

The machine is shared: before each pass the script waits (up to a limit) for a second in which other
processes take under a quarter of the CPUs, and it records the CPU seconds they took during the pass.
Run: .venv/bin/python bench/bench_eval.py [--imatrix] [--runs 5] [--chunks 8] [--threads 2] [--type Q2_K]
     [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_quality import (
    CTX,
    MIB,
    Metrics,
    Ran,
    edgepack_metrics,
    eval_text,
    llama_base,
    llama_metrics,
    quantized_candidate,
    run_measured,
)
from common import OUT, ROOT, BenchError, Spread, cpu_times, llama_tool, model_path, wait_quiet, write_results

from edgepack.packager import evaluate, imatrix, quant_types
from edgepack.packager.errors import PackagerError
from edgepack.runtime.cli_common import format_table

FIGURES = ("ppl_reference", "ppl_candidate", "kld_mean", "kld_median", "kld_p99", "top1")
QUIET_SHARE = 0.25  # of all CPUs
QUIET_WAIT_S = 30


@dataclass(frozen=True)
class Pass:
    """One measured pass: wall and CPU seconds, other processes' CPU seconds meanwhile, peak memory."""

    seconds: float
    cpu_seconds: float
    others_cpu_seconds: float
    peak_mib: float | None  # None: measured inside this process, whose peak is not the pass's

    @classmethod
    def of(cls, ran: Ran, seconds: float | None = None) -> Pass:
        return cls(ran.seconds if seconds is None else seconds, ran.cpu_seconds, ran.others_cpu_seconds,
                   ran.peak_bytes / MIB)


def quiet() -> None:
    if not wait_quiet(QUIET_SHARE, QUIET_WAIT_S):
        print(f"  (other processes stayed above {QUIET_SHARE:.0%} of the CPUs for {QUIET_WAIT_S}s: measuring anyway)",
              flush=True)


def in_process(fn: Callable[[], Any]) -> tuple[Any, Pass]:
    quiet()
    usage, machine, started = resource.getrusage(resource.RUSAGE_SELF), cpu_times(), time.perf_counter()
    result = fn()
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return result, Pass(seconds, cpu, max(0.0, cpu_times().busy_s - machine.busy_s - cpu), None)


def rotated(names: list[str], order: int) -> list[str]:
    return names[order % len(names):] + names[: order % len(names)]


# ---- edgepack eval ----


def eval_round(reference: Path, candidate: Path, text: Path, args: argparse.Namespace,
               order: int) -> tuple[dict[str, Pass], dict[str, Metrics]]:
    """Every pass of one round, and what each tool measured (the figures)."""
    passes: dict[str, Pass] = {}
    figures: dict[str, Metrics] = {}

    def lp() -> None:
        quiet()
        _, base = llama_base(reference, text, args.chunks, args.threads)
        passes["lp_base"] = Pass.of(base)
        quiet()
        figures["lp_kld"] = m = llama_metrics(candidate, args.chunks, args.threads)
        passes["lp_kld"] = Pass(m.seconds, m.cpu_seconds, m.others_cpu_seconds, m.peak_bytes / MIB)

    def command(name: str, env: dict[str, str] | None) -> Callable[[], None]:
        def run() -> None:
            quiet()
            figures[name] = m = edgepack_metrics(reference, candidate, text, args.chunks, args.threads, env)
            passes[name] = Pass(m.seconds, m.cpu_seconds, m.others_cpu_seconds, m.peak_bytes / MIB)
        return run

    def shared() -> None:
        ref, passes["reference_pass"] = in_process(lambda: evaluate.Reference(
            [reference], text.read_text(), ctx=CTX, max_chunks=args.chunks, threads=args.threads, scratch=OUT))
        with ref:
            m, passes["candidate_pass"] = in_process(lambda: ref.compare([candidate]))
        figures["shared"] = Metrics(m.ppl_reference, m.ppl_candidate, m.kld_mean, m.kld_median, m.kld_p99,
                                    m.top1_agreement, 0, 0, 0, 0)

    steps = {"llama-perplexity": lp, "eval": command("eval", None), "shared": shared}
    if args.before is not None:
        steps["before_eval"] = command("before_eval", {**os.environ, "PYTHONPATH": str(args.before)})
    for name in rotated(list(steps), order):
        steps[name]()
    return passes, figures


def largest_difference(a: Metrics, b: Metrics) -> float:
    """The largest relative difference between two measurements' figures (top-1 as a difference of fractions)."""
    out = [abs(getattr(a, m) - getattr(b, m)) / abs(getattr(b, m)) for m in FIGURES if m != "top1" and getattr(b, m)]
    return max(out + [abs(a.top1 - b.top1)])


def eval_summary(rounds: list[dict[str, Pass]]) -> tuple[dict[str, Spread], dict[str, float]]:
    """Spreads of every pass's seconds, CPU seconds and peak; the ratios of the medians the goals are about."""
    series: dict[str, list[float]] = {}
    for r in rounds:
        base, kld = r["lp_base"], r["lp_kld"]
        combined = {**r, "lp_base_plus_kld": Pass(base.seconds + kld.seconds, base.cpu_seconds + kld.cpu_seconds,
                                                  base.others_cpu_seconds + kld.others_cpu_seconds, None)}
        for name, p in combined.items():
            series.setdefault(f"{name}_s", []).append(p.seconds)
            series.setdefault(f"{name}_cpu_s", []).append(p.cpu_seconds)
            series.setdefault(f"{name}_others_cpu_s", []).append(p.others_cpu_seconds)
            if p.peak_mib is not None:
                series.setdefault(f"{name}_peak_mib", []).append(p.peak_mib)
    spreads = {name: Spread.of(values) for name, values in series.items()}
    med = {name: s.median for name, s in spreads.items()}
    ratios = {
        # the goals: a candidate against a reference computed once, as llama-perplexity measures one against
        # its base file; and the peak of the whole `edgepack eval` command against the KL-divergence pass's
        "candidate_pass_vs_lp_kld_time": med["candidate_pass_s"] / med["lp_kld_s"],
        "candidate_pass_vs_lp_kld_cpu": med["candidate_pass_cpu_s"] / med["lp_kld_cpu_s"],
        "eval_vs_lp_kld_peak": med["eval_peak_mib"] / med["lp_kld_peak_mib"],
        # one command from scratch: both tools need the reference's pass too
        "eval_vs_lp_base_plus_kld_time": med["eval_s"] / med["lp_base_plus_kld_s"],
        "eval_vs_lp_base_plus_kld_cpu": med["eval_cpu_s"] / med["lp_base_plus_kld_cpu_s"],
        "eval_vs_lp_kld_time": med["eval_s"] / med["lp_kld_s"],
        "eval_vs_lp_base_peak": med["eval_peak_mib"] / med["lp_base_peak_mib"],
    }
    if "before_eval_s" in med:
        ratios["before_vs_eval_time"] = med["before_eval_s"] / med["eval_s"]
        ratios["before_vs_eval_cpu"] = med["before_eval_cpu_s"] / med["eval_cpu_s"]
        ratios["before_vs_eval_peak"] = med["before_eval_peak_mib"] / med["eval_peak_mib"]
    return spreads, ratios


def bench_eval(args: argparse.Namespace) -> None:
    reference = model_path()
    text = eval_text()
    candidate, _ = quantized_candidate(reference, args.type, args.threads)
    print(f"reference {reference.name}, candidate {candidate.name}, {args.chunks} chunks of {CTX} from {text.source}",
          flush=True)
    rounds, figures = [], []
    for i in range(args.runs):
        passes, measured = eval_round(reference, candidate, text.path, args, i)
        rounds.append(passes)
        figures.append(measured)
        print(f"  round {i + 1}: " + ", ".join(f"{n} {p.seconds:.1f}s" for n, p in passes.items()), flush=True)
    spreads, ratios = eval_summary(rounds)
    first = figures[0]
    differences = {"eval_vs_shared": largest_difference(first["eval"], first["shared"]),
                   "eval_vs_llama_perplexity": largest_difference(first["eval"], first["lp_kld"])}
    if "before_eval" in first:
        differences["eval_vs_before"] = largest_difference(first["eval"], first["before_eval"])
    print_summary(spreads, ratios, differences)
    save("eval", args, spreads, ratios, differences, rounds, reference=reference.name, candidate=candidate.name,
         text=text.source, figures=figures)


# ---- --imatrix ----

# One measured pass in a child process: seconds from before loading the model to the end (load included),
# the same for every variant; the matrix is saved for comparison.
_CHILD = """
import json, sys, time
from pathlib import Path
from edgepack.packager import evaluate, imatrix
from edgepack.packager.forward import Forward
model, chunks, threads, what, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
text = evaluate.default_text("calibration")
started = time.perf_counter()
if what == "collect":
    matrix = imatrix.collect([model], text, max_chunks=chunks, threads=threads)
else:
    with Forward([model], n_ctx=512, threads=threads) as m:
        for chunk in m.chunks(m.tokenize(text), chunks):
            m.run(chunk, 0 if what == "all_logits" else len(chunk) - 1, keep_logits=False)
seconds = time.perf_counter() - started
if what == "collect":
    imatrix.save(matrix, Path(out))
print(json.dumps({"seconds": seconds}))
"""


def imatrix_round(model: Path, args: argparse.Namespace, order: int) -> dict[str, Pass]:
    runs: dict[str, tuple[list[str], dict[str, str] | None]] = {
        name: ([sys.executable, "-c", _CHILD, str(model), str(args.chunks), str(args.threads), name,
                str(OUT / "imatrix-edgepack.gguf")], None) for name in ("last_logit", "all_logits", "collect")
    }
    if args.before is not None:
        runs["collect_before"] = ([*runs["collect"][0][:-2], "collect", str(OUT / "imatrix-before.gguf")],
                                  {**os.environ, "PYTHONPATH": str(args.before)})
    runs["llama_imatrix"] = ([str(llama_tool("llama-imatrix", "native/build-llama-tools.sh")), "-m", str(model),
                              "-f", str(ROOT / "packager" / "data" / "calibration.txt"), "-c", str(CTX),
                              "--chunks", str(args.chunks), "--process-output", "-t", str(args.threads),
                              "-o", str(OUT / "imatrix-llama.gguf")], None)
    out = {}
    for name in rotated(list(runs), order):
        cmd, env = runs[name]
        quiet()
        ran = run_measured(cmd, OUT / f"bench-imatrix-{name}.log", env)
        out[name] = Pass.of(ran, None if name == "llama_imatrix" else json.loads(ran.stdout)["seconds"])
    return out


def matrix_difference(a: Path, b: Path) -> float:
    """The largest relative difference of mean squares between two imatrix files, over b's tensors."""
    ours, theirs = imatrix.load(a), imatrix.load(b)
    worst = 0.0
    for name in theirs.sums:
        x, y = ours.mean_squares(name), theirs.mean_squares(name)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
    return worst


def bench_imatrix(args: argparse.Namespace) -> None:
    model = model_path()
    print(f"model {model.name}, {args.chunks} chunks of {CTX} from packager/data/calibration.txt", flush=True)
    rounds = []
    for i in range(args.runs):
        rounds.append(imatrix_round(model, args, i))
        print(f"  round {i + 1}: " + ", ".join(f"{n} {p.seconds:.1f}s" for n, p in rounds[-1].items()), flush=True)
    spreads = {f"{name}_{unit}": Spread.of([getattr(r[name], field) for r in rounds])
               for name in rounds[0] for unit, field in (("s", "seconds"), ("cpu_s", "cpu_seconds"),
                                                          ("others_cpu_s", "others_cpu_seconds"),
                                                          ("peak_mib", "peak_mib"))}
    med = {name: s.median for name, s in spreads.items()}
    ratios = {f"{name}_vs_last_logit_time": med[f"{name}_s"] / med["last_logit_s"] for name in rounds[0]}
    ratios |= {f"{name}_vs_last_logit_cpu": med[f"{name}_cpu_s"] / med["last_logit_cpu_s"] for name in rounds[0]}
    if args.before is not None:
        ratios["collect_before_vs_collect_time"] = med["collect_before_s"] / med["collect_s"]
    differences = {"collect_vs_llama_imatrix": matrix_difference(OUT / "imatrix-edgepack.gguf",
                                                                 OUT / "imatrix-llama.gguf")}
    if args.before is not None:
        differences["collect_vs_before"] = matrix_difference(OUT / "imatrix-edgepack.gguf", OUT / "imatrix-before.gguf")
    print_summary(spreads, ratios, differences)
    save("imatrix", args, spreads, ratios, differences, rounds, model=model.name,
         text="packager/data/calibration.txt")


# ---- output ----


def print_summary(spreads: dict[str, Spread], ratios: dict[str, float], differences: dict[str, float]) -> None:
    rows = [("MEASURE", "MEDIAN", "MIN-MAX")]
    for name, s in spreads.items():
        unit = "MiB" if name.endswith("_mib") else "s"
        rows.append((name, f"{s.median:.1f} {unit}", f"{s.low:.1f}-{s.high:.1f}"))
    print()
    print(format_table(rows))
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for name, value in differences.items():
        print(f"largest relative difference of the figures, {name}: {value:.1e}")


def save(kind: str, args: argparse.Namespace, spreads: dict[str, Spread], ratios: dict[str, float],
         differences: dict[str, float], rounds: list[dict[str, Pass]], **extra: object) -> None:
    doc = {
        "settings": {"runs": args.runs, "chunks": args.chunks, "threads": args.threads, "ctx": CTX,
                     "type": args.type, "before": str(args.before) if args.before else None},
        **extra,
        "spreads": {n: asdict(s) for n, s in spreads.items()}, "ratios": ratios, "differences": differences,
        "rounds": [{n: asdict(p) for n, p in r.items()} for r in rounds],
    }
    if "figures" in doc:
        doc["figures"] = [{n: asdict(m) for n, m in f.items()} for f in doc["figures"]]
    write_results(kind, doc, load_1min_after=os.getloadavg()[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imatrix", action="store_true", help="measure the importance matrix's collection instead")
    p.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--chunks", type=int, default=8, help=f"chunks of {CTX} tokens (default 8)")
    p.add_argument("--threads", type=int, default=2, help="threads for every tool (default 2)")
    p.add_argument("--type", default="Q2_K", help="the candidate's type (default Q2_K)")
    p.add_argument("--before", type=Path, help="a directory holding edgepack/{packager,runtime,boards} to compare")
    args = p.parse_args(argv)
    if args.runs < 1 or args.chunks < 1 or args.threads < 1:
        p.error("--runs, --chunks and --threads must be >= 1")
    if args.before is not None and not (args.before / "edgepack" / "packager" / "evaluate.py").is_file():
        p.error(f"--before {args.before}: no edgepack/packager/evaluate.py in it")
    try:
        args.type = quant_types.parse(args.type).name
    except PackagerError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        OUT.mkdir(parents=True, exist_ok=True)
        if args.imatrix:
            bench_imatrix(args)
        else:
            bench_eval(args)
    except BenchError as exc:
        print(f"bench_eval: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
