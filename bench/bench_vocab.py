"""Vocabulary trimming on Gemma 3 270M (issue 17): kept tokens, file size, bits per byte, task agreement, and decode
speed against the untrimmed model, single stream and 4 streams, same llama.cpp, same threads.

The trimmed models are what `edgepack build --vocab N` makes (packager/vocab_trim.py's Trimmer, one source-side
pass shared by every size); `auto` is the smallest size of the build's ladder within the tier. Decode is timed with
llama.cpp's own llama_decode on 1 or 4 sequences of greedy tokens (argmax over the model's whole vocabulary, as a
sampler would), rounds alternating the order of the models; ratios are taken within a round.
Run: .venv/bin/python bench/bench_vocab.py [--sizes 16k,32k,64k] [--tier general] [--rounds 5] [--tokens 64]
     [--threads 2] [--quality-only | --speed-only]  (--speed-only times bench/out/vocab/*.gguf of the last
     quality run; the quality half needs no quiet machine, the timing half does)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from common import OUT, BenchError, Spread, cpu_times, model_path, others_share, wait_quiet, write_results

from edgepack.packager import evaluate, vocab, vocab_trim
from edgepack.runtime import llama
from edgepack.runtime.cli_common import format_table

WORK = OUT / "vocab"
PROMPTS = ["You can call these tools:\n- get_weather(city: string)\nWhat is the weather in Lyon?",
           "Write one sentence about the sea.", "List three fruits.", "Explain what a compiler does."]
BASE = "untrimmed"


def quality(sizes: list[int], tier: str, threads: int) -> tuple[dict[str, dict], list[str]]:
    """name -> the build's report for each size, and for auto (the ladder bisected under the tier); the source's
    answers to the tasks."""
    source = model_path()
    WORK.mkdir(parents=True, exist_ok=True)
    agent = vocab_trim.AgentText(calibration=evaluate.default_text("calibration"),
                                 tasks=evaluate.load_tasks(evaluate.default_tasks_path()), chat_template="gemma")
    started = time.monotonic()
    trimmer = vocab_trim.Trimmer(source, agent, eval_text=evaluate.default_text("eval"), measure=True, fill=True,
                                 threads=threads, note=lambda text: print(f"  {text}", file=sys.stderr))
    print(f"source side (answers, bits per byte, fill order): {time.monotonic() - started:.0f}s", file=sys.stderr)
    reports: dict[str, dict] = {}
    trials: dict[int, vocab_trim.Trial] = {}

    def attempt(size: int) -> vocab_trim.Trial:
        if size not in trials:
            _, trials[size], path = trimmer.attempt(size, WORK)
            path.rename(WORK / f"vocab-{size}.gguf")
        return trials[size]

    for size in sizes:
        reports[f"{size // 1024}k"] = vocab_trim.trial_dict(attempt(size))
        reports[f"{size // 1024}k"]["file"] = f"vocab-{size}.gguf"
    ladder = [s for s in vocab_trim.AUTO_SIZES if trimmer.required() < s < trimmer.tok.n_vocab]
    low, high, chosen = 0, len(ladder) - 1, None
    while low <= high:  # as the build's auto does (it also tries the required set alone first: never enough here)
        middle = (low + high) // 2
        if attempt(ladder[middle]).passes(tier):
            chosen, high = ladder[middle], middle - 1
        else:
            low = middle + 1
    if chosen is None:
        raise BenchError(f"no size of the ladder passes the {tier} tier")
    reports["auto"] = vocab_trim.trial_dict(trials[chosen]) | {"file": f"vocab-{chosen}.gguf", "tier": tier,
                                                              "ladder_tried": sorted(trials)}
    assert trimmer.answers is not None
    return reports, trimmer.answers.answers


def decode_tps(path: Path, streams: int, tokens: int, threads: int) -> float:
    """Generated tokens per second over `streams` sequences decoded together (prompts prefilled first)."""
    model = llama.load_model([path])
    vocab_ptr = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab_ptr)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 1024, 512, streams
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(512, 0, streams)
    try:
        prompts = [llama.tokenize(vocab_ptr, PROMPTS[i % len(PROMPTS)], add_special=True, parse_special=False)
                   for i in range(streams)]
        _fill(batch, [(p, s, 0) for s, p in enumerate(prompts)])
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise BenchError("prefill failed")
        positions = [len(p) for p in prompts]
        started = time.perf_counter()
        for _ in range(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(streams, n_vocab))
            nexts = [int(logits[row].argmax()) for row in range(streams)]
            _fill(batch, [([t], s, positions[s]) for s, t in enumerate(nexts)])
            positions = [p + 1 for p in positions]
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise BenchError("decode failed")
        return streams * tokens / (time.perf_counter() - started)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _fill(batch: llama_cpp.llama_batch, items: list[tuple[list[int], int, int]]) -> None:
    """Put each (tokens, sequence, first position) into the batch, with logits for each sequence's last token."""
    n = 0
    for tokens, seq, start in items:
        for i, token in enumerate(tokens):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = i == len(tokens) - 1
            n += 1
    batch.n_tokens = n


QUIET_SHARE = 0.15  # a measurement starts once other processes took less than this share of the CPUs for a second,
RETRIES = 3  # and is taken again (up to this many times) when they took more while it ran


def speed(files: dict[str, Path], rounds: int, tokens: int, threads: int,
          others: list[float]) -> dict[str, dict[str, list[float]]]:
    """name -> streams -> tokens/s per round; the order of the models alternates between rounds. `others` gets the
    share of the CPUs other processes took during each measurement."""
    names = list(files)
    out: dict[str, dict[str, list[float]]] = {n: {"1": [], "4": []} for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            for streams in (1, 4):
                for _ in range(RETRIES):  # a measurement another process disturbed is taken again
                    wait_quiet(QUIET_SHARE, 120, (os.getpid(),))
                    before = cpu_times(os.getpid())
                    tps = decode_tps(files[name], streams, tokens, threads)
                    share = others_share(before, cpu_times(os.getpid()))
                    if share < QUIET_SHARE:
                        break
                out[name][str(streams)].append(tps)
                others.append(share)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n]['1'][-1]:.0f}/{out[n]['4'][-1]:.0f}"
                                                         for n in names), file=sys.stderr)
    return out


def ratios(samples: dict[str, dict[str, list[float]]], name: str, streams: str) -> Spread:
    return Spread.of([a / b for a, b in zip(samples[name][streams], samples[BASE][streams], strict=True)])


def table(reports: dict[str, dict], samples: dict[str, dict[str, list[float]]], base_size: int) -> str:
    rows = [("VOCAB", "KEPT", "FILE MiB", "BITS/BYTE (src)", "TASKS SAME", "TOOL ARGS SAME", "TOKENS SAME cal/eval",
             "DECODE 1 tok/s", "x", "DECODE 4 tok/s", "x")]
    s = samples[BASE]
    rows.append((BASE, "262,144", f"{base_size / 2**20:.1f}", "", "", "", "", f"{statistics.median(s['1']):.1f}",
                 "1.00", f"{statistics.median(s['4']):.1f}", "1.00"))
    for name, r in reports.items():
        t = r["tasks"]
        one, four = ratios(samples, name, "1"), ratios(samples, name, "4")
        rows.append((name, f"{r['kept']:,}", f"{r['file_size'] / 2**20:.1f}",
                     f"{r['bpb_candidate']:.4f} ({r['bpb_reference']:.4f})",
                     f"{t['exact_match']:.0%} of {t['tasks']}", _share(t["arguments_agreement"], t["structured"]),
                     f"{r['unchanged_calibration']:.1%}/{r['unchanged_eval']:.1%}",
                     f"{statistics.median(samples[name]['1']):.1f}", f"{one.median:.2f} ({one.low:.2f}-{one.high:.2f})",
                     f"{statistics.median(samples[name]['4']):.1f}",
                     f"{four.median:.2f} ({four.low:.2f}-{four.high:.2f})"))
    return format_table(rows)


def _share(value: float | None, of: int) -> str:
    return f"{value:.0%} of {of}" if value is not None else f"none of {of}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16k,32k,64k")
    parser.add_argument("--tier", default="general")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--quality-only", action="store_true")
    args = parser.parse_args(argv)
    saved = WORK / "quality.json"
    try:
        if args.speed_only:
            reports = json.loads(saved.read_text())["reports"]
        else:
            sizes = [vocab.parse_request(s).size or 0 for s in args.sizes.split(",")]
            reports, answers = quality(sizes, args.tier, args.threads)
            saved.write_text(json.dumps({"reports": reports, "source_answers": answers}, indent=1))
            if args.quality_only:
                print(json.dumps(reports, indent=1))
                return 0
        source = model_path()
        load = os.getloadavg()
        files = {BASE: source} | {name: WORK / r["file"] for name, r in reports.items()}
        others: list[float] = []
        samples = speed(files, args.rounds, args.tokens, args.threads, others)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(reports, samples, source.stat().st_size))
    print(f"load average before timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; nice {os.nice(0)}; other "
          f"processes' share of the CPUs during the measurements: median {statistics.median(others):.0%}, "
          f"max {max(others):.0%}")
    write_results("vocab", {"args": vars(args), "quality": reports, "decode_tps": samples,
                            "load_before": load, "others_share": others}, nice=os.nice(0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
