"""A candidate release on trial (docs/shadow.md), measured on Gemma 3 270M: the shipped Q4_K_M against a Q8_0 and a
Q2_K candidate requantized from it, under a replay of the project's agent tasks (packager/data/tasks.jsonl): the
verdict each reaches, after how many compared decisions, with which disagreements; then what shadowing 20% of the
traffic costs the live side's latency with 2 concurrent clients.

    .venv/bin/python bench/bench_trial.py [--candidates Q8_0,Q2_K,Q4_K_M-rebuilt:24] [--requests 300] [--minutes 8]
        [--runs 3] [--latency-requests 48] [--max-tokens 96] [--threads 2]   (bench/TRIAL.md)
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
from common import (
    OUT,
    ROOT,
    BenchError,
    Spread,
    edgepack,
    free_port,
    local_url,
    model_path,
    run,
    running,
    serve_command,
    wait_ready,
    write_results,
)

from edgepack.runtime.stats import percentile
from edgepack.runtime.verdict import shadow_verdict

WORK = OUT / "trial"
TASKS = ROOT / "packager" / "data" / "tasks.jsonl"
NAME = "gemma3-270m"
WARM_UP = 6  # uncounted requests before a latency run
# "repeat" (since 10dd772): a greedy request identical to one already compared is not replayed again
RESULTS_SEEN = ("agree", "disagree", "error", "skipped", "repeat")
# the shipped release keeps the package's Q4_K_M; candidates are requantized from it (the package ships nothing else),
# and a control: the same Q4_K_M in a new build, which must agree on every decision
BUNDLES = {"Q4_K_M": ("keep", 1), "Q8_0": ("Q8_0", 2), "Q2_K": ("Q2_K", 3), "Q4_K_M-rebuilt": ("keep", 4)}


def bundle(label: str) -> Path:
    """The bundle of one of BUNDLES, built once into bench/out/trial/ (delete it to rebuild)."""
    path = WORK / f"{label.lower()}.edgepack"
    if not path.exists():
        kind, version = BUNDLES[label]
        requantize = [] if kind == "keep" else ["--allow-requantize"]
        edgepack("build", model_path(), "-o", path, "--name", NAME, "--quant", kind, *requantize, "--no-eval",
                 "--bundle-version", version, "-q")
    return path


def fresh_store(candidate: str, name: str) -> Path:
    """A store bench/out/trial/store-NAME with the shipped release current and `candidate` installed beside it."""
    store = WORK / f"store-{name}"
    shutil.rmtree(store, ignore_errors=True)
    edgepack("install", bundle("Q4_K_M"), "--store", store)
    edgepack("install", bundle(candidate), "--store", store, "--candidate")
    return store


def load_tasks() -> list[dict]:
    return [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]


def ask(client: httpx.Client, base: str, task: dict, max_tokens: int) -> tuple[float, dict]:
    """One non-streamed, greedy chat completion of a task (its tools offered): the client-side seconds and the
    answer."""
    body = {"model": NAME, "messages": task["messages"], **({"tools": task["tools"]} if "tools" in task else {}),
            "temperature": 0, "max_tokens": max_tokens}
    sent = time.perf_counter()
    response = client.post(f"{base}/v1/chat/completions", json=body)
    seconds = time.perf_counter() - sent
    if response.status_code != 200:
        raise BenchError(f"{task['id']}: HTTP {response.status_code}: {response.text[:300]}")
    return seconds, response.json()


def samples(client: httpx.Client, base: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of the metric `name` on /metrics: (labels, value)."""
    text = client.get(f"{base}/metrics").text
    return [(dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))), float(found.group(2)))
            for found in re.finditer(re.escape(name) + r"\{([^}]*)\} (\S+)", text)]


def shadow_counts(client: httpx.Client, base: str) -> dict[str, int]:
    counts = dict.fromkeys(RESULTS_SEEN, 0)
    for labels, value in samples(client, base, "edgepack_shadow_requests_total"):
        counts[labels["result"]] = counts.get(labels["result"], 0) + int(value)
    return counts


def candidate_mode(client: httpx.Client, base: str) -> str:
    return next((labels["mode"] for labels, value in samples(client, base, "edgepack_candidate_info") if value), "")


def wait_replays(client: httpx.Client, base: str, done: int, timeout: float = 120) -> dict[str, int]:
    """The shadow counts once `done` replays have ended (compared, failed or skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = shadow_counts(client, base)
        if sum(counts.values()) >= done:
            return counts
        time.sleep(0.05)
    raise BenchError(f"replay {done} did not end within {timeout:.0f}s")


# ---- the verdict of one candidate ----


def trial(candidate: str, tasks: list[dict], requests: int, minutes: float, threads: int, max_tokens: int) -> dict:
    """Replay the tasks in turn (greedy, one at a time, each after the previous replay ended) against serve with
    --shadow-rate 100% --auto-promote until the candidate is promoted or rejected, or the cap."""
    store = fresh_store(candidate, candidate.lower())
    release = (store / "candidate").resolve().name
    port = free_port()
    base, log = local_url(port), WORK / f"serve-verdict-{candidate.lower()}.log"
    cmd = serve_command(store, port, "--threads", threads, "--no-cache", "--shadow-rate", "100%", "--auto-promote")
    by_id: dict[str, str] = {}  # live response id -> task id, to name the disagreements
    per_task: dict[str, dict[str, int]] = {}
    with running(cmd, log) as proc, httpx.Client(timeout=300) as client:
        wait_ready(base, proc, log)
        started = time.monotonic()
        mode, counts, sent = "shadow", dict.fromkeys(RESULTS_SEEN, 0), 0
        for task in itertools.cycle(tasks):
            if sent >= requests or time.monotonic() - started > minutes * 60 or mode != "shadow":
                break
            before = counts
            _, answer = ask(client, base, task, max_tokens)
            sent += 1
            by_id[answer["id"]] = task["id"]
            counts = wait_replays(client, base, sent)
            mode = candidate_mode(client, base)
            tally = per_task.setdefault(task["id"], dict.fromkeys(RESULTS_SEEN, 0))
            for result in RESULTS_SEEN:
                tally[result] += counts[result] - before[result]
            if sent % 10 == 0 or mode != "shadow":
                print(f"{candidate}: {sent} requests in {time.monotonic() - started:.0f} s, {counts['agree']} agree, "
                      f"{counts['disagree']} disagree, {counts['error']} errors, {counts['skipped']} skipped, {mode}",
                      flush=True)
        seconds = time.monotonic() - started
    compared = counts["agree"] + counts["disagree"]
    evidence_file = store / "verdicts" / f"{release}.json"
    evidence = json.loads(evidence_file.read_text()) if evidence_file.exists() else None
    if evidence is not None:
        agent = next(iter(evidence["agents"].values()))
        low, high = agent["interval"]
    else:  # undecided: no evidence in the store; the same rule, from the counts
        judged = shadow_verdict(compared, counts["disagree"], None)
        low, high = judged.low, judged.high
    logged = [json.loads(line) for line in (store / "decisions" / "log.jsonl").read_text().splitlines()
              ] if (store / "decisions" / "log.jsonl").exists() else []
    return {
        "candidate": candidate, "release": release, "verdict": mode if mode != "shadow" else "undecided",
        "requests": sent, "compared": compared, "disagreed": counts["disagree"], "errors": counts["error"],
        "skipped": counts["skipped"], "wilson_95": [low, high], "seconds": round(seconds, 1),
        "evidence": evidence, "per_task": per_task,
        "disagreements": [{"task": by_id.get(r["request_id"], "?"), "live": r["live"], "candidate": r["candidate"],
                           "comparison": r["comparison"]} for r in logged],
    }


# ---- the live latency cost of shadowing ----


def numbered(task: dict, mark: str) -> dict:
    """The task with `mark` after its last message: every request of a latency run differs, so each sampled one is
    replayed (the server does not replay a greedy request identical to one it has already compared)."""
    *head, last = task["messages"]
    return task | {"messages": [*head, last | {"content": f"{last['content']} ({mark})"}]}


def latency_run(store: Path, shadow_rate: str, tasks: list[dict], requests: int, threads: int, max_tokens: int,
                label: str) -> dict:
    """One server, a few warm-up requests (until a replay ran, with shadowing), then `requests` requests from 2
    concurrent clients, each taking the tasks in turn from its own offset, each numbered: the client-side seconds
    of each."""
    port = free_port()
    base, log = local_url(port), WORK / f"serve-latency-{label}.log"
    cmd = serve_command(store, port, "--threads", threads, "--no-cache", "--shadow-rate", shadow_rate,
                        "--min-decisions", 100000)
    with running(cmd, log) as proc, httpx.Client(timeout=300) as client:
        wait_ready(base, proc, log)
        for task in tasks[:WARM_UP]:  # load the live model (the candidate loads at its first replay), uncounted
            ask(client, base, task, max_tokens)
        if shadow_rate != "0":
            while sum(shadow_counts(client, base).values()) == 0:
                ask(client, base, tasks[0], max_tokens)
        time.sleep(3.0)  # the warm-up's last replay (one answer) ends before measuring
        counts_before = shadow_counts(client, base)
        seconds: list[list[float]] = [[], []]

        def client_loop(k: int) -> None:
            with httpx.Client(timeout=300) as own:
                for i in range(requests // 2):
                    seconds[k].append(ask(own, base, numbered(tasks[(i + k * len(tasks) // 2) % len(tasks)],
                                                            f"{k}.{i}"), max_tokens)[0])

        threads_ = [threading.Thread(target=client_loop, args=(k,)) for k in (0, 1)]
        started = time.monotonic()
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        wall = time.monotonic() - started
        time.sleep(0.5)
        counts = shadow_counts(client, base)
    if len(seconds[0]) + len(seconds[1]) != requests // 2 * 2:
        raise BenchError(f"{label}: a client failed; see {log}")
    values = sorted(seconds[0] + seconds[1])
    return {"shadow_rate": shadow_rate, "label": label, "requests": len(values), "wall_s": round(wall, 2),
            "p50_ms": percentile(values, 50) * 1000, "p95_ms": percentile(values, 95) * 1000,
            "shadow": {r: counts[r] - counts_before[r] for r in RESULTS_SEEN}, "seconds": values}


def latency(candidate: str, tasks: list[dict], requests: int, runs: int, threads: int, max_tokens: int) -> dict:
    """Shadow at 20% vs 0 on one store, alternating which goes first, `runs` runs each."""
    store = fresh_store(candidate, "latency")
    configs = {"shadow 20%": "20%", "no shadow": "0"}
    done: dict[str, list[dict]] = {name: [] for name in configs}
    for turn in range(runs):
        order = list(configs) if turn % 2 == 0 else list(reversed(configs))
        for name in order:
            result = latency_run(store, configs[name], tasks, requests, threads, max_tokens,
                                 f"{name.split()[0]}-{turn}")
            done[name].append(result)
            print(f"latency run {turn + 1}/{runs}, {name}: p50 {result['p50_ms']:.0f} ms, p95 "
                  f"{result['p95_ms']:.0f} ms, shadow {result['shadow']}")
    summary = {name: {"p50_ms": Spread.of([r["p50_ms"] for r in rs]).__dict__,
                      "p95_ms": Spread.of([r["p95_ms"] for r in rs]).__dict__} for name, rs in done.items()}
    pairs = [s["p95_ms"] / n["p95_ms"] for s, n in zip(done["shadow 20%"], done["no shadow"], strict=True)]
    return {"candidate": candidate, "requests_per_run": requests, "runs": done, "summary": summary,
            "p95_ratio_of_medians": summary["shadow 20%"]["p95_ms"]["median"] / summary["no shadow"]["p95_ms"][
                "median"],
            "p50_ratio_of_medians": summary["shadow 20%"]["p50_ms"]["median"] / summary["no shadow"]["p50_ms"][
                "median"],
            "p95_ratio_per_run": pairs}


def code_state() -> dict[str, object]:
    """The commit the servers ran, and whether runtime/ differed from it when this run started."""
    head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    changed = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "runtime", "packager"]).split("\n")
    return {"commit": head, "uncommitted": [line[3:] for line in changed if line.strip()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="cap on the requests of each verdict run")
    parser.add_argument("--minutes", type=float, default=8.0, help="cap on the minutes of each verdict run")
    parser.add_argument("--candidates", default="Q8_0,Q2_K,Q4_K_M-rebuilt:48",
                        help="candidates in turn, each LABEL[:REQUESTS] (its own cap on requests)")
    parser.add_argument("--latency-candidate", default="Q2_K")
    parser.add_argument("--runs", type=int, default=3, help="latency runs per configuration")
    parser.add_argument("--latency-requests", type=int, default=48, help="requests per latency run (2 clients)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96, help="per answer (96: as `edgepack eval --tasks`)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks()
    doc = {"settings": vars(args), "tasks": str(TASKS.relative_to(ROOT)), "tasks_count": len(tasks),
           "code": code_state()}
    verdicts = [trial(label, tasks, int(cap or args.requests), args.minutes, args.threads, args.max_tokens)
                for label, _, cap in (c.partition(":") for c in args.candidates.split(",") if c)]
    kind = "trial" if verdicts else "trial-latency"  # a latency-only run (--candidates "") keeps the verdicts' file
    if verdicts:
        write_results(kind, doc | {"verdicts": verdicts, "latency": None})  # kept if the latency part fails
    cost = latency(args.latency_candidate, tasks, args.latency_requests, args.runs, args.threads, args.max_tokens
                   ) if args.runs else None
    for v in verdicts:
        print(f"{v['candidate']}: {v['verdict']} after {v['compared']} compared ({v['disagreed']} disagreed, "
              f"Wilson 95% [{v['wilson_95'][0]:.2%}, {v['wilson_95'][1]:.2%}]), {v['requests']} requests, "
              f"{v['seconds']:.0f} s")
    if cost:
        for name, s in cost["summary"].items():
            print(f"{name}: live p50 {s['p50_ms']['median']:.0f} ms, p95 {s['p95_ms']['median']:.0f} ms (medians "
                  f"of {args.runs})")
        print(f"live p95 shadow/no shadow: {cost['p95_ratio_of_medians']:.2f} (per run "
              f"{', '.join(f'{r:.2f}' for r in cost['p95_ratio_per_run'])})")
    write_results(kind, doc | {"verdicts": verdicts, "latency": cost})


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        raise SystemExit(f"bench_trial: {exc}") from None
