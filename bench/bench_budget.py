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
import datetime as dt
import json
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
from bench_serve import (
    BIN,
    OUT,
    RESULTS,
    BenchError,
    _cpu_count,
    _cpu_model,
    _run,
    build_bundle,
    free_port,
    model_path,
    new_client,
    running,
    wait_healthy,
)

from edgepack.runtime.cli import format_table

WORK = OUT / "budget"
MIB = 2**20
BUDGETS = ("900MiB", "480MiB", "300MiB")
CLIENTS = 4
PROMPTS = ["Once upon a time", "The weather today is", "Write a list of three fruits:",
           "In a small village by the sea there lived an old fisherman who"]


def rss_pss(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    fields = {k: int(v) * 1024 for k, v in re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, re.M)}
    return fields["Rss"], fields["Pss"]


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_pss, self.stop = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss, pss = rss_pss(self.pid)
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
    base = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "edgepack"), "serve", "--store", str(store), "--port", str(port), "--threads", "2",
           "--slots", str(CLIENTS), "--ctx", "4096", "--no-cache", "--memory-budget", budget]
    log = WORK / f"serve-{budget}.log"
    with running(cmd, log) as proc:
        sampler = Sampler(proc.pid)
        sampler.start()
        wait_healthy(base, proc, log)
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
        bundle = build_bundle(model_path())
        store = WORK / "store"
        shutil.rmtree(store, ignore_errors=True)
        _run([str(BIN / "edgepack"), "install", str(bundle), "--store", str(store)])
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
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"budget-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"arch": platform.machine(), "cpus": _cpu_count(), "cpu": _cpu_model()},
        "model": model_path().name, "clients": CLIENTS, "requests_per_client": args.requests, "runs": runs,
    }, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
