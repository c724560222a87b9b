"""Decode speed of `edgepack serve` against llama.cpp's own `llama-server` on the same model.

llama-server is built from the llama.cpp source llama-cpp-python 0.3.36 vendors
(native/build-llama-server.sh), so both servers run the same kernels; what differs is the serving
layer. Both are timed the same way, on the client, from the SSE stream of one request at a time.
Run: .venv/bin/python bench/bench_serve.py [--runs 5] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from common import (
    OUT,
    BenchError,
    Spread,
    build_bundle,
    edgepack,
    free_port,
    llama_tool,
    local_url,
    model_path,
    new_client,
    running,
    serve_command,
    stream_completion,
    wait_ready,
    write_results,
)

from edgepack.runtime.cli_common import format_table

PROMPT = "Once upon a time"
CTX = 4096
GOAL = 0.95
PAUSE_S = 0.5  # between requests, so one server's spinning worker threads have gone idle
EDGEPACK, LLAMA = "edgepack serve", "llama-server"


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # request sent -> first content chunk
    decode_tps: float  # (tokens - 1) / (last content chunk - first content chunk)
    tokens: int  # completion tokens the server reported in usage
    chunks: int  # SSE chunks that carried text


# ---- preparation ----


def timed_install(bundle: Path, store: Path) -> tuple[float, float]:
    """Wall seconds of the whole `edgepack install` command, and the seconds it reports itself."""
    started = time.perf_counter()
    out = edgepack("install", bundle, "--store", store)
    wall = time.perf_counter() - started
    reported = re.search(r"([0-9.]+)s\s*$", out.strip())
    return wall, float(reported.group(1)) if reported else float("nan")


# ---- servers ----


def edgepack_command(store: Path, port: int, threads: int) -> list[str]:
    # --no-cache: measure decoding, not the response cache; --preload: ready means loaded, as llama-server's
    return serve_command(store, port, "--threads", threads, "--ctx", CTX, "--no-cache", "--preload")


def llama_server_command(model: Path, port: int, threads: int) -> list[str]:
    tool = llama_tool("llama-server", "native/build-llama-server.sh")
    return [str(tool), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(CTX),
            "-np", "1", "--host", "127.0.0.1", "--port", str(port)]


# ---- measurement ----


def request_body(tokens: int) -> dict:
    # cache_prompt=false makes both servers evaluate the prompt every time (no prefix reuse)
    return {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False}


def stream_once(client: httpx.Client, base: str, tokens: int) -> Sample:
    """One streamed completion, timed from the client's side of the SSE stream."""
    c = stream_completion(client, base, request_body(tokens), base)
    stamps, usage = c.stamps, c.usage
    if usage is None or len(stamps) < 2:
        raise BenchError(f"{base}: stream had {len(stamps)} text chunks and usage {usage}")
    produced = usage["completion_tokens"]
    if produced != tokens:
        raise BenchError(f"{base}: asked for {tokens} tokens, the server reports {produced}")
    return Sample(stamps[0] - c.sent, (produced - 1) / (stamps[-1] - stamps[0]), produced, len(stamps))


def measure(bases: dict[str, str], runs: int, tokens: int) -> dict[str, list[Sample]]:
    """One uncounted warm-up per server, then `runs` rounds alternating which server goes first."""
    samples: dict[str, list[Sample]] = {name: [] for name in bases}
    with new_client() as client:
        for base in bases.values():
            stream_once(client, base, tokens)
        for i in range(runs):
            order = list(bases) if i % 2 == 0 else list(reversed(bases))
            for name in order:
                time.sleep(PAUSE_S)
                s = stream_once(client, bases[name], tokens)
                samples[name].append(s)
                print(f"  run {i + 1}/{runs} {name:<15} ttft {s.ttft_s * 1000:7.1f} ms  "
                      f"decode {s.decode_tps:6.1f} tok/s  ({s.tokens} tokens, {s.chunks} chunks)", flush=True)
    return samples


# ---- report ----


def summary(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Spread]]:
    return {
        name: {"decode_tps": Spread.of([s.decode_tps for s in ss]), "ttft_ms": Spread.of([s.ttft_s * 1e3 for s in ss])}
        for name, ss in samples.items()
    }


def report_table(stats: dict[str, dict[str, Spread]], ratio: float, sizes: dict[str, int],
                 install: tuple[float, float]) -> str:
    rows = [("SERVER", "DECODE TOK/S (MEDIAN)", "MIN-MAX", "TTFT MS (MEDIAN)", "MIN-MAX")]
    for name, st in stats.items():
        d, t = st["decode_tps"], st["ttft_ms"]
        rows.append((name, f"{d.median:.1f}", f"{d.low:.1f}-{d.high:.1f}", f"{t.median:.1f}",
                     f"{t.low:.1f}-{t.high:.1f}"))
    lines = [format_table(rows)]
    verdict = "meets" if ratio >= GOAL else "misses"
    mib = 2**20
    lines += [
        "",
        f"decode ratio edgepack/llama-server (medians): {ratio:.3f} ({verdict} the {GOAL} goal)",
        f"install: {install[0]:.2f}s wall for `edgepack install` ({install[1]:.2f}s reported by it)",
        (f"sizes: source {sizes['source'] / mib:.1f} MiB, bundle {sizes['bundle'] / mib:.1f} MiB "
         f"({sizes['bundle'] / sizes['source']:.0%} of source), installed store {sizes['store'] / mib:.1f} MiB"),
    ]
    return "\n".join(lines)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def save_results(args: argparse.Namespace, samples: dict[str, list[Sample]], stats: dict, ratio: float,
                 sizes: dict[str, int], install: tuple[float, float]) -> None:
    write_results("serve", {
        "settings": {"runs": args.runs, "tokens": args.tokens, "threads": args.threads, "ctx": CTX,
                     "prompt": PROMPT, "request": request_body(args.tokens)},
        "ratio_decode_median": round(ratio, 4),
        "goal": GOAL,
        "install_wall_s": round(install[0], 3),
        "install_reported_s": install[1],
        "sizes_bytes": sizes,
        "medians": {n: {k: round(v.median, 3) for k, v in st.items()} for n, st in stats.items()},
        "spread": {n: {k: [round(v.low, 3), round(v.high, 3)] for k, v in st.items()} for n, st in stats.items()},
        "raw": {n: [asdict(s) for s in ss] for n, ss in samples.items()},
    })


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="measured requests per server (default 5)")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads for both servers (default 2)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.tokens < 2 or args.threads < 1:
        p.error("--runs and --threads must be >= 1, --tokens >= 2")
    return args


def bench(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = model_path()
    print(f"model: {model} ({model.stat().st_size / 2**20:.1f} MiB)", flush=True)
    bundle = build_bundle(model, OUT / "gemma.edgepack")
    store = Path(tempfile.mkdtemp(prefix="store-", dir=OUT))
    try:
        install = timed_install(bundle, store)
        sizes = {"source": model.stat().st_size, "bundle": bundle.stat().st_size, "store": tree_size(store)}
        print(f"installed into {store} in {install[0]:.2f}s", flush=True)
        ports = {EDGEPACK: free_port(), LLAMA: free_port()}
        commands = {EDGEPACK: edgepack_command(store, ports[EDGEPACK], args.threads),
                    LLAMA: llama_server_command(model, ports[LLAMA], args.threads)}
        logs = {EDGEPACK: OUT / "edgepack-serve.log", LLAMA: OUT / "llama-server.log"}
        bases = {name: local_url(port) for name, port in ports.items()}
        with running(commands[EDGEPACK], logs[EDGEPACK]) as ep, running(commands[LLAMA], logs[LLAMA]) as ls:
            wait_ready(bases[EDGEPACK], ep, logs[EDGEPACK])
            wait_ready(bases[LLAMA], ls, logs[LLAMA])
            print(f"both servers healthy; {args.runs} runs x {args.tokens} tokens, {args.threads} threads",
                  flush=True)
            samples = measure(bases, args.runs, args.tokens)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    stats = summary(samples)
    ratio = stats[EDGEPACK]["decode_tps"].median / stats[LLAMA]["decode_tps"].median
    print()
    print(report_table(stats, ratio, sizes, install))
    save_results(args, samples, stats, ratio, sizes, install)


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
