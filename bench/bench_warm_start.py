"""Time to first token of an agent's first request after a restart: with the saved warm state (the agent's
system-prompt KV loaded from the release at start) vs without it (`--no-warm-state`: the first request
processes the system prompt), on Gemma 3 270M with a ~500-token agent system prompt.

Each round starts the server twice, alternating the order; each start: `serve --preload` (ready = loaded
and warmed up), then one streamed chat request to the agent (its first), then a second one. A first
start before the rounds writes the snapshot. Medians over the rounds.
Run: .venv/bin/python bench/bench_warm_start.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
from common import (
    OUT,
    BenchError,
    edgepack,
    free_port,
    local_url,
    model_path,
    running,
    serve_command,
    wait_ready,
    write_results,
)

from edgepack.runtime.cli_common import format_table

WORK = OUT / "warm-start"
SYSTEM_PROMPT = " ".join([
    "You are the operations agent of a small warehouse. You receive requests from staff and answer with one",
    "tool call or one short sentence. Tools: find_item(sku), move_item(sku, from_bin, to_bin),",
    "count_bin(bin), order_stock(sku, quantity), report_damage(sku, note). Rules: never order more than 50",
    "units at once; bins are named by aisle letter and shelf number, like C12; when a request names no bin,",
    "ask for it; when a SKU is unknown, call find_item first; reply in the staff member's language; keep",
    "answers under twenty words; do not invent stock levels.",
] * 5)
QUESTION = "Please move two boxes of SKU 4471 from A3 to C12."


def build_store() -> Path:
    model = model_path()
    project = WORK / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "edgepack.toml").write_text(
        f'[models.gemma]\nsource = "{model}"\n\n[agents.warehouse]\nmodel = "gemma"\n'
        f"system_prompt = {json.dumps(SYSTEM_PROMPT)}\ntemperature = 0\n")
    bundle = project / "warehouse.edgepack"
    edgepack("build", "--recipe", project / "edgepack.toml", "-o", bundle, "-q", "--no-eval")
    store = WORK / "store"
    shutil.rmtree(store, ignore_errors=True)
    edgepack("install", bundle, "--store", store)
    return store


def first_token(client: httpx.Client, base: str) -> float:
    body = {"model": "warehouse", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "stream": True}
    started = time.perf_counter()
    with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise BenchError(f"{base}: HTTP {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return time.perf_counter() - started
    raise BenchError(f"{base}: no token came back")


def one_start(store: Path, threads: int, warm: bool) -> dict[str, float]:
    port = free_port()
    base = local_url(port)
    cmd = serve_command(store, port, "--threads", threads, "--preload", "--no-cache", "--slots", 2, "--ctx", 2048,
                        *([] if warm else ["--no-warm-state"]))
    log = WORK / f"serve-{'warm' if warm else 'cold'}.log"
    started = time.perf_counter()
    with running(cmd, log) as proc, httpx.Client(timeout=120) as client:
        wait_ready(base, proc, log)
        ready = time.perf_counter() - started
        ttft_first = first_token(client, base)
        ttft_second = first_token(client, base)
    how = [line for line in log.read_text().splitlines() if "warehouse prefix" in line]
    return {"ready_s": ready, "ttft_first_s": ttft_first, "ttft_second_s": ttft_second,
            "prefix": how[-1].split("warehouse prefix", 1)[1].split(";")[0].strip() if how else "none"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        store = build_store()
        one_start(store, args.threads, warm=True)  # writes the snapshot
        runs: dict[str, list[dict]] = {"with warm state": [], "without (--no-warm-state)": []}
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            for warm in order:
                runs["with warm state" if warm else "without (--no-warm-state)"].append(
                    one_start(store, args.threads, warm))
    except BenchError as exc:
        print(f"bench_warm_start: {exc}", file=sys.stderr)
        return 1
    rows = [("START", "READY (median)", "FIRST REQUEST TTFT", "SECOND REQUEST TTFT", "PREFIX AT START")]
    medians = {}
    for name, samples in runs.items():
        med = {k: statistics.median(s[k] for s in samples) for k in ("ready_s", "ttft_first_s", "ttft_second_s")}
        medians[name] = med
        rows.append((name, f"{med['ready_s']:.2f} s", f"{med['ttft_first_s'] * 1000:.0f} ms",
                     f"{med['ttft_second_s'] * 1000:.0f} ms", samples[-1]["prefix"]))
    print(format_table(rows))
    with_, without = medians["with warm state"], medians["without (--no-warm-state)"]
    print(f"first-request TTFT: {with_['ttft_first_s'] * 1000:.0f} ms with vs {without['ttft_first_s'] * 1000:.0f} ms"
          f" without = {without['ttft_first_s'] / with_['ttft_first_s']:.1f}x faster")
    write_results("warm-start", {
        "model": model_path().name, "threads": args.threads, "rounds": args.rounds,
        "system_prompt_chars": len(SYSTEM_PROMPT), "runs": runs, "medians": medians,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
