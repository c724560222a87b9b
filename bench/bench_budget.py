"""Peak memory of `edgepack serve` under a 4-client load, against its --memory-budget.

Gemma 3 270M, 4 slots x 4096 tokens asked for, 4 concurrent clients streaming 64-token completions
(prompts of different lengths, prefix reuse off), the server's RSS and PSS sampled from
/proc/PID/smaps_rollup every 50 ms from before it loads until the load ends. Budgets: one roomy, one
that makes the server cut the context, one too small for the model (every request must get 503, with
the server staying up and small).
Run: .venv/bin/python bench/bench_budget.py [--requests 4]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
from common import (
    OUT,
    BenchError,
    build_bundle,
    edgepack,
    free_port,
    local_url,
    model_path,
    new_client,
    running,
    serve_command,
    smaps_rollup,
    wait_ready,
    write_results,
)

from edgepack.runtime.cli_common import format_table

WORK = OUT / "budget"
MIB = 2**20
BUDGETS = ("900MiB", "480MiB", "300MiB")
CLIENTS = 4
PROMPTS = ["Once upon a time", "The weather today is", "Write a list of three fruits:",
           "In a small village by the sea there lived an old fisherman who"]


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_pss, self.stop = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                kb = smaps_rollup(self.pid)
                rss, pss = kb["Rss"] * 1024, kb["Pss"] * 1024
            except (OSError, KeyError):
                return
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(0.05)


def client_load(base: str, index: int, requests: int, statuses: list[int]) -> None:
    with new_client() as client:
        for j in range(requests):
            body = {"prompt": PROMPTS[(index + j) % len(PROMPTS)], "max_tokens": 64, "temperature": 0,
                    "ignore_eos": True, "stream": True, "cache_prompt": False}
            with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                statuses.append(response.status_code)
                for _ in response.iter_lines():
                    pass


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else None


def one_budget(store: Path, budget: str, requests: int) -> dict:
    port = free_port()
    base = local_url(port)
    cmd = serve_command(store, port, "--threads", 2, "--slots", CLIENTS, "--ctx", 4096, "--no-cache",
                        "--memory-budget", budget)
    log = WORK / f"serve-{budget}.log"
    with running(cmd, log) as proc:
        sampler = Sampler(proc.pid)
        sampler.start()
        wait_ready(base, proc, log)
        statuses: list[int] = []
        started = time.perf_counter()
        threads = [threading.Thread(target=client_load, args=(base, i, requests, statuses)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        metrics = httpx.get(f"{base}/metrics").text
        sampler.stop.set()
        sampler.join()
    text = log.read_text()
    cut = re.search(r"context cut to (\d+) tokens", text)
    return {
        "budget": budget, "budget_bytes": metric(metrics, "edgepack_memory_budget_bytes"),
        "estimate_bytes": metric(metrics, "edgepack_memory_estimate_bytes"),
        "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "statuses": sorted(set(statuses)),
        "requests": len(statuses), "ok": statuses.count(200), "seconds": seconds,
        "context_per_slot": int(cut.group(1)) if cut else (4096 if 200 in statuses else None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4, help="per client")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        bundle = build_bundle(model_path(), WORK / "gemma.edgepack")
        store = WORK / "store"
        shutil.rmtree(store, ignore_errors=True)
        edgepack("install", bundle, "--store", store)
        runs = [one_budget(store, budget, args.requests) for budget in BUDGETS]
    except BenchError as exc:
        print(f"bench_budget: {exc}", file=sys.stderr)
        return 1
    rows = [("BUDGET", "CONTEXT/SLOT", "ANSWERED", "ESTIMATE", "PEAK RSS", "PEAK PSS", "PEAK RSS / BUDGET")]
    for run in runs:
        budget = run["budget_bytes"] or 0
        rows.append((run["budget"], str(run["context_per_slot"] or "-"), f"{run['ok']}/{run['requests']} "
                     f"(HTTP {','.join(map(str, run['statuses']))})", f"{(run['estimate_bytes'] or 0) / MIB:.0f} MiB",
                     f"{run['peak_rss'] / MIB:.0f} MiB", f"{run['peak_pss'] / MIB:.0f} MiB",
                     f"{run['peak_rss'] / budget:.2f}" if budget else "-"))
    print(format_table(rows))
    write_results("budget", {
        "model": model_path().name, "clients": CLIENTS, "requests_per_client": args.requests, "runs": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
