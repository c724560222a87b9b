"""Cost of `edgepack eval` against llama.cpp's `llama-perplexity` (wall seconds and peak memory on the same
candidate), and with --imatrix, of `edgepack calibrate`'s importance matrix against plain forward passes.

Each round runs, on one reference (Gemma 3 270M Q4_K_M), one candidate (it requantized, Q2_K by default), one
text and chunk count: llama-perplexity's base pass (the reference's log-probs to a file) and its KL-divergence
pass on the candidate; `edgepack eval REF CAND` (one command: reference pass, then candidate pass); edgepack's
candidate pass alone against a reference computed once (evaluate.Reference, as a build shares it among its
candidates), timed in this process; and with --before DIR, `edgepack eval` of another checkout (DIR/edgepack/
{packager,runtime,boards}, e.g. `git archive COMMIT packager runtime boards | tar -x -C DIR/edgepack`).
Rounds alternate which tool goes first. Goals (issue 8): time <= 1.2x and peak memory <= 1.0x llama-perplexity's.

--imatrix: each round runs, in child processes on the calibration text, a plain forward pass (logits of the
last position only, as generation computes them), one with the logits of every position, imatrix.collect
(with --before, also the other checkout's), and llama.cpp's llama-imatrix --process-output; and compares
the matrices (edgepack's with --before's, exactly; with llama-imatrix's, which sums in float32).
Run: .venv/bin/python bench/bench_eval.py [--imatrix] [--runs 3] [--chunks 8] [--threads 2] [--type Q2_K]
     [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from bench_quality import (
    CTX,
    MIB,
    Metrics,
    edgepack_metrics,
    eval_text,
    llama_base,
    llama_metrics,
    quantized_candidate,
    run_measured,
)
from common import OUT, ROOT, BenchError, Spread, llama_tool, model_path, write_results

from edgepack.packager import evaluate, imatrix, quant_types
from edgepack.packager.errors import PackagerError
from edgepack.runtime.cli_common import format_table

METRICS = ("ppl_reference", "ppl_candidate", "kld_mean", "kld_median", "kld_p99", "top1")


@dataclass(frozen=True)
class Round:
    lp_base_s: float
    lp_base_peak: int
    lp_kld: Metrics
    eval: Metrics  # edgepack eval, one command
    reference_s: float  # edgepack's reference pass, in this process
    candidate_s: float  # edgepack's candidate pass against that reference, in this process
    shared: Metrics  # what that candidate pass measured
    before: Metrics | None  # edgepack eval of the --before checkout


def one_round(reference: Path, candidate: Path, text: Path, args: argparse.Namespace, lp_first: bool) -> Round:
    def lp() -> tuple[float, int, Metrics]:
        _, base = llama_base(reference, text, args.chunks, args.threads)
        return base.seconds, base.peak_bytes, llama_metrics(candidate, args.chunks, args.threads)

    def ours() -> tuple[Metrics, float, float, Metrics, Metrics | None]:
        full = edgepack_metrics(reference, candidate, text, args.chunks, args.threads)
        started = time.perf_counter()
        with evaluate.Reference([reference], text.read_text(), ctx=CTX, max_chunks=args.chunks,
                                threads=args.threads, scratch=OUT) as ref:
            computed = time.perf_counter()
            m = ref.compare([candidate])
            compared = time.perf_counter()
        shared = Metrics(m.ppl_reference, m.ppl_candidate, m.kld_mean, m.kld_median, m.kld_p99, m.top1_agreement,
                         compared - computed, 0)
        before = None
        if args.before is not None:
            env = {**os.environ, "PYTHONPATH": str(args.before)}
            before = edgepack_metrics(reference, candidate, text, args.chunks, args.threads, env)
        return full, computed - started, compared - computed, shared, before

    if lp_first:
        base_s, base_peak, kld = lp()
        full, ref_s, cand_s, shared, before = ours()
    else:
        full, ref_s, cand_s, shared, before = ours()
        base_s, base_peak, kld = lp()
    return Round(base_s, base_peak, kld, full, ref_s, cand_s, shared, before)


def summary(rounds: list[Round]) -> dict[str, dict[str, float]]:
    """Median, min and max of every timing and peak, and the ratios of the medians the goals are about."""
    series = {
        "lp_base_s": [r.lp_base_s for r in rounds],
        "lp_kld_s": [r.lp_kld.seconds for r in rounds],
        "lp_base_plus_kld_s": [r.lp_base_s + r.lp_kld.seconds for r in rounds],
        "eval_s": [r.eval.seconds for r in rounds],
        "reference_pass_s": [r.reference_s for r in rounds],
        "candidate_pass_s": [r.candidate_s for r in rounds],
        "lp_base_peak_mib": [r.lp_base_peak / MIB for r in rounds],
        "lp_kld_peak_mib": [r.lp_kld.peak_bytes / MIB for r in rounds],
        "eval_peak_mib": [r.eval.peak_bytes / MIB for r in rounds],
    }
    if rounds[0].before is not None:
        series["before_eval_s"] = [r.before.seconds for r in rounds if r.before]
        series["before_eval_peak_mib"] = [r.before.peak_bytes / MIB for r in rounds if r.before]
    spreads = {name: Spread.of(values) for name, values in series.items()}
    med = {name: s.median for name, s in spreads.items()}
    ratios = {
        # the goals: a candidate measured against a reference computed once, as llama-perplexity measures one
        # against its base file; and the whole `edgepack eval` command's peak against the KL-divergence pass's
        "candidate_pass_vs_lp_kld_time": med["candidate_pass_s"] / med["lp_kld_s"],
        "eval_vs_lp_kld_peak": med["eval_peak_mib"] / med["lp_kld_peak_mib"],
        # one command from scratch: both tools need the reference's pass too
        "eval_vs_lp_base_plus_kld_time": med["eval_s"] / med["lp_base_plus_kld_s"],
        "eval_vs_lp_kld_time": med["eval_s"] / med["lp_kld_s"],
        "eval_vs_lp_base_peak": med["eval_peak_mib"] / med["lp_base_peak_mib"],
    }
    if "before_eval_s" in med:
        ratios["before_vs_eval_time"] = med["before_eval_s"] / med["eval_s"]
        ratios["before_vs_eval_peak"] = med["before_eval_peak_mib"] / med["eval_peak_mib"]
    return {"spreads": {n: asdict(s) for n, s in spreads.items()}, "ratios": ratios}


def largest_difference(a: Metrics, b: Metrics) -> float:
    """The largest relative difference between two tools' figures (top-1 as a difference of fractions)."""
    out = [abs(getattr(a, m) - getattr(b, m)) / abs(getattr(b, m)) for m in METRICS if m != "top1" and getattr(b, m)]
    return max(out + [abs(a.top1 - b.top1)])


def report(rounds: list[Round], doc: dict) -> str:
    spreads, ratios = doc["spreads"], doc["ratios"]
    rows = [("MEASURE", "MEDIAN", "MIN-MAX")]
    for name, s in spreads.items():
        unit = "MiB" if name.endswith("mib") else "s"
        rows.append((name.removesuffix("_mib").removesuffix("_s"), f"{s['median']:.1f} {unit}",
                     f"{s['low']:.1f}-{s['high']:.1f}"))
    lines = [format_table(rows), ""]
    lines += [f"{name}: {value:.2f}x" for name, value in ratios.items()]
    first = rounds[0]
    lines.append(f"figures: eval vs the shared-reference pass differ by at most "
                 f"{largest_difference(first.eval, first.shared):.1e}, vs llama-perplexity by "
                 f"{largest_difference(first.eval, first.lp_kld):.1e}")
    if first.before is not None:
        lines.append(f"figures: eval vs --before differ by at most {largest_difference(first.eval, first.before):.1e}")
    return "\n".join(lines)


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
            m.run(chunk, 0 if what == "all-logits" else len(chunk) - 1, keep_logits=False)
seconds = time.perf_counter() - started
if what == "collect":
    imatrix.save(matrix, Path(out))
print(json.dumps({"seconds": seconds}))
"""
PASSES = ("last-logit", "all-logits", "collect")


def imatrix_round(model: Path, args: argparse.Namespace, order: int) -> dict[str, dict[str, float]]:
    """Seconds and peak MiB of every pass; the order rotates from round to round."""
    runs: dict[str, tuple[list[str], dict[str, str] | None]] = {
        name: ([sys.executable, "-c", _CHILD, str(model), str(args.chunks), str(args.threads), name,
                str(OUT / "imatrix-edgepack.gguf")], None) for name in PASSES
    }
    if args.before is not None:
        runs["collect-before"] = ([*runs["collect"][0][:-1], str(OUT / "imatrix-before.gguf")],
                                  {**os.environ, "PYTHONPATH": str(args.before)})
    runs["llama-imatrix"] = ([str(llama_tool("llama-imatrix", "native/build-llama-tools.sh")), "-m", str(model),
                              "-f", str(calibration_text()), "-c", str(CTX), "--chunks", str(args.chunks),
                              "--process-output", "-t", str(args.threads), "-o", str(OUT / "imatrix-llama.gguf")],
                             None)
    names = list(runs)
    names = names[order % len(names):] + names[: order % len(names)]
    out = {}
    for name in names:
        cmd, env = runs[name]
        ran = run_measured(cmd, OUT / f"bench-imatrix-{name}.log", env)
        seconds = json.loads(ran.stdout)["seconds"] if name != "llama-imatrix" else ran.seconds
        out[name] = {"seconds": seconds, "cpu_seconds": ran.cpu_seconds, "peak_mib": ran.peak_bytes / MIB}
    return out


def calibration_text() -> Path:
    return ROOT / "packager" / "data" / "calibration.txt"


def matrix_difference(a: Path, b: Path) -> float:
    """The largest relative difference of mean squares between two imatrix files (over a's tensors)."""
    ours, theirs = imatrix.load(a), imatrix.load(b)
    worst = 0.0
    for name in theirs.sums:
        x, y = ours.mean_squares(name), theirs.mean_squares(name)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
    return worst


def bench_imatrix(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    model = model_path()
    print(f"model {model.name}, {args.chunks} chunks of {CTX} from packager/data/calibration.txt", flush=True)
    rounds = []
    for i in range(args.runs):
        rounds.append(imatrix_round(model, args, i))
        print(f"  round {i + 1}: " + ", ".join(f"{n} {r['seconds']:.1f}s" for n, r in rounds[-1].items()), flush=True)
    spreads = {f"{name}_{unit}": Spread.of([r[name][unit] for r in rounds])
               for name in rounds[0] for unit in ("seconds", "cpu_seconds", "peak_mib")}
    med = {name: s.median for name, s in spreads.items()}
    ratios = {f"{name}_vs_last-logit": med[f"{name}_seconds"] / med["last-logit_seconds"] for name in rounds[0]}
    if args.before is not None:
        ratios["collect-before_vs_collect"] = med["collect-before_seconds"] / med["collect_seconds"]
    differences = {"collect_vs_llama-imatrix": matrix_difference(OUT / "imatrix-edgepack.gguf",
                                                                 OUT / "imatrix-llama.gguf")}
    if args.before is not None:
        differences["collect_vs_before"] = matrix_difference(OUT / "imatrix-edgepack.gguf", OUT / "imatrix-before.gguf")
    rows = [("PASS", "SECONDS (MEDIAN)", "MIN-MAX", "VS LAST-LOGIT", "CPU S (PROCESS)", "PEAK MIB")]
    for name in rounds[0]:
        s = spreads[f"{name}_seconds"]
        rows.append((name, f"{s.median:.2f}", f"{s.low:.2f}-{s.high:.2f}", f"{ratios[f'{name}_vs_last-logit']:.2f}x",
                     f"{med[f'{name}_cpu_seconds']:.1f}", f"{med[f'{name}_peak_mib']:.0f}"))
    print()
    print(format_table(rows))
    for name, value in differences.items():
        print(f"largest relative difference of the matrices, {name}: {value:.1e}")
    write_results("imatrix", {
        "settings": {"runs": args.runs, "chunks": args.chunks, "threads": args.threads, "ctx": CTX,
                     "before": str(args.before) if args.before else None},
        "model": model.name, "text": "packager/data/calibration.txt",
        "spreads": {n: asdict(s) for n, s in spreads.items()}, "ratios": ratios, "matrix_differences": differences,
        "rounds": rounds,
    }, load_1min_before=load_before, load_1min_after=os.getloadavg()[0])


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--chunks", type=int, default=8, help=f"chunks of {CTX} tokens (default 8)")
    p.add_argument("--threads", type=int, default=2, help="threads for both tools (default 2)")
    p.add_argument("--type", default="Q2_K", help="the candidate's type (default Q2_K)")
    p.add_argument("--before", type=Path, help="a directory holding edgepack/{packager,runtime,boards} to compare")
    p.add_argument("--imatrix", action="store_true", help="measure the importance matrix's collection instead")
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


def bench(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    reference = model_path()
    text = eval_text()
    candidate, _ = quantized_candidate(reference, args.type, args.threads)
    print(f"reference {reference.name}, candidate {candidate.name}, {args.chunks} chunks of {CTX} from {text.source}",
          flush=True)
    rounds = []
    for i in range(args.runs):
        r = one_round(reference, candidate, text.path, args, lp_first=i % 2 == 0)
        rounds.append(r)
        print(f"  round {i + 1}: llama-perplexity base {r.lp_base_s:.1f}s + KLD {r.lp_kld.seconds:.1f}s "
              f"({r.lp_kld.peak_bytes / MIB:.0f} MiB); edgepack eval {r.eval.seconds:.1f}s "
              f"({r.eval.peak_bytes / MIB:.0f} MiB) = reference {r.reference_s:.1f}s + candidate {r.candidate_s:.1f}s"
              + (f"; before {r.before.seconds:.1f}s ({r.before.peak_bytes / MIB:.0f} MiB)" if r.before else ""),
              flush=True)
    doc = summary(rounds)
    print()
    print(report(rounds, doc))
    write_results("eval", {
        "settings": {"runs": args.runs, "chunks": args.chunks, "threads": args.threads, "ctx": CTX,
                     "type": args.type, "before": str(args.before) if args.before else None},
        "reference": reference.name, "candidate": candidate.name, "text": text.source,
        **doc, "rounds": [asdict(r) for r in rounds],
    }, load_1min_before=load_before, load_1min_after=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.imatrix:
            bench_imatrix(args)
        else:
            bench(args)
    except BenchError as exc:
        print(f"bench_eval: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
