"""Aggregate decode throughput under concurrent clients: `edgepack serve --slots 4` (continuous batching)
against llama.cpp's `llama-server -np 4` and llama-cpp-python's own server, same model, same threads.

All three servers stay up, but only one is under load at a time; each (round, client count) point
visits the servers in a rotating order, so slow drift on a shared machine hits all of them alike.
Run: .venv/bin/python bench/bench_concurrency.py [--clients 1,2,4,8] [--requests 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import llama_cpp
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
    run_clients,
    running,
    serve_command,
    stream_completion,
    wait_quiet,
    wait_ready,
    write_results,
)

from edgepack.runtime.cli_common import format_table

WORK = OUT / "concurrency"
SLOTS = 4
CTX_PER_SLOT = 4096
GOAL = 0.95
GOAL_CLIENTS = (1, 4)
# This VM is shared: a round during which other processes took more than MAX_FOREIGN CPUs on average
# is run again (up to ATTEMPTS times), and each round waits until the machine has been quiet for a
# second (which also lets the last server's spinning worker threads go idle).
MAX_FOREIGN = 0.1
ATTEMPTS = 5
QUIET_WAIT_S = 900
EDGEPACK, LLAMA, LCPP = "edgepack serve", "llama-server", "llama_cpp.server"
# Different short prompts; client i's request j uses PROMPTS[(i + j) % 8], so no two clients of a
# round start on the same prompt.
PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "In the year 2050, cities",
    "My favourite recipe for bread",
    "The mitochondria is",
    "Dear hiring manager,",
)


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    body: dict  # fields this server needs to generate exactly max_tokens greedy tokens
    port: int
    ready_route: str = "/health"  # answers 200 once the model is loaded

    @property
    def base(self) -> str:
        return local_url(self.port)


@dataclass(frozen=True)
class Reply:
    prompt: int  # index into PROMPTS
    text: str
    tokens: int  # usage.completion_tokens; llama_cpp.server sends no usage, see completion_tokens()
    usage: bool  # whether the server reported usage
    ttft_s: float  # request sent -> first text chunk
    total_s: float  # request sent -> end of stream


@dataclass
class Round:
    server: str
    clients: int
    index: int
    wall_s: float  # first request sent -> last stream ended
    foreign_cpu_s: float  # CPU time other processes (or the hypervisor: steal) took meanwhile
    attempts: int = 1  # rounds run to get this one (the others had too much foreign CPU)
    replies: list[Reply] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


# ---- servers ----


def install_bundle(model: Path) -> Path:
    """Build the bundle and install it into a fresh store; returns the store."""
    WORK.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(model, WORK / "gemma.edgepack")
    store = Path(tempfile.mkdtemp(prefix="store-", dir=WORK))
    edgepack("install", bundle, "--store", store)
    return store


def eog_tokens(model: Path) -> list[int]:
    """End-of-generation token ids, read from the model's vocabulary alone."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    if not handle:
        raise BenchError(f"llama.cpp could not read the vocabulary of {model}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(handle)
        return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama_cpp.llama_model_free(handle)


def servers(model: Path, store: Path, threads: int) -> list[Server]:
    llama_server = llama_tool("llama-server", "native/build-llama-server.sh")
    ports = [free_port() for _ in range(3)]
    # llama_cpp.server has no ignore_eos: a large negative bias on every EOG token does the same.
    no_eog = {str(t): -1e9 for t in eog_tokens(model)}
    return [
        Server(EDGEPACK, serve_command(store, ports[0], "--threads", threads, "--ctx", CTX_PER_SLOT, "--slots", SLOTS,
                                       "--no-cache", "--preload"),  # the response cache would answer repeated prompts
               {"ignore_eos": True, "cache_prompt": False}, ports[0]),
        # -c is the whole KV pool, split over -np slots; without -kvu each slot gets its own KV stream,
        # as edgepack's slots do. cache_prompt=false (both): evaluate every prompt, no prefix reuse.
        Server(LLAMA, [str(llama_server), "-m", str(model), "-t", str(threads), "-tb", str(threads),
                       "-c", str(SLOTS * CTX_PER_SLOT), "-np", str(SLOTS), "--host", "127.0.0.1",
                       "--port", str(ports[1])],
               {"ignore_eos": True, "cache_prompt": False}, ports[1]),
        # One sequence at a time. Its default interrupt_requests=true would end a streaming reply early
        # as soon as another request waits; off, requests queue instead.
        Server(LCPP, [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                      "--n_threads_batch", str(threads), "--n_ctx", str(CTX_PER_SLOT), "--host", "127.0.0.1",
                      "--port", str(ports[2]), "--interrupt_requests", "false"],
               {"logit_bias": no_eog}, ports[2], ready_route="/v1/models"),  # it has no /health
    ]


# ---- one request, one round ----


def request_body(server: Server, prompt: str, tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **server.body}


def completion_tokens(usage: dict | None, finish_reason: str | None, max_tokens: int, chunks: int) -> int:
    """Tokens generated: the server's usage where it reports one; else max_tokens when it stopped for
    length (llama_cpp.server streams no usage), else the number of text chunks."""
    if usage is not None:
        return usage["completion_tokens"]
    return max_tokens if finish_reason == "length" else chunks


def stream_one(http: httpx.Client, server: Server, prompt: int, tokens: int) -> Reply:
    c = stream_completion(http, server.base, request_body(server, PROMPTS[prompt], tokens), server.name)
    if not c.stamps:
        raise BenchError(f"{server.name}: no text for prompt {PROMPTS[prompt]!r}")
    count = completion_tokens(c.usage, c.finish_reason, tokens, len(c.stamps))
    return Reply(prompt, c.text, count, c.usage is not None, c.stamps[0] - c.sent, c.ended - c.sent)


def run_round(server: Server, pid: int, clients: int, requests: int, tokens: int, index: int) -> Round:
    """`clients` clients, released together, each sending `requests` requests back to back."""
    run = run_clients(clients, requests, lambda http, i, j: stream_one(http, server, (i + j) % len(PROMPTS), tokens),
                      pid, f"{server.name}, {clients} clients")
    return Round(server.name, clients, index, run.wall_s, run.foreign_cpu_s, replies=run.replies)


def clean_round(server: Server, pid: int, clients: int, requests: int, tokens: int, index: int) -> Round:
    """A round during which other processes stayed under MAX_FOREIGN CPUs (else the last attempt)."""
    for attempt in range(1, ATTEMPTS + 1):
        # every process counts here, servers included, so the last one's spinning threads have gone idle
        if not wait_quiet(MAX_FOREIGN / (os.cpu_count() or 1), QUIET_WAIT_S):
            print(f"  the machine was not quiet for {QUIET_WAIT_S}s; measuring anyway", flush=True)
        r = run_round(server, pid, clients, requests, tokens, index)
        r.attempts = attempt
        if r.foreign_cpu_s <= MAX_FOREIGN * r.wall_s:
            break
        print(f"  round {index + 1} {clients} clients {server.name}: other processes took "
              f"{r.foreign_cpu_s:.2f} CPU-s in {r.wall_s:.2f}s; running it again", flush=True)
    return r


# ---- the whole measurement ----


def reference_texts(server: Server, tokens: int) -> dict[int, Reply]:
    """After one uncounted warm-up, every prompt once, one at a time: the 1-client greedy text each
    later reply must equal."""
    with new_client() as http:
        stream_one(http, server, len(PROMPTS) - 1, tokens)
        return {i: stream_one(http, server, i, tokens) for i in range(len(PROMPTS))}


def measure(procs: dict[str, tuple[Server, int]], args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    names = list(procs)
    for index in range(args.rounds):
        for k, clients in enumerate(args.clients):
            shift = (index * len(args.clients) + k) % len(names)
            for name in names[shift:] + names[:shift]:
                server, pid = procs[name]
                r = clean_round(server, pid, clients, args.requests, args.tokens, index)
                rounds.append(r)
                print(f"  round {index + 1}/{args.rounds} {clients} clients {name:<16} "
                      f"{r.tokens_per_s:6.1f} tok/s  ({r.tokens} tokens in {r.wall_s:5.2f}s, "
                      f"TTFT median {statistics.median(x.ttft_s for x in r.replies) * 1e3:6.1f} ms, "
                      f"other processes {r.foreign_cpu_s:4.2f} CPU-s)", flush=True)
    return rounds


def checks(rounds: list[Round], refs: dict[str, dict[int, Reply]], tokens: int) -> dict[str, dict[int, dict]]:
    """Per server and client count: replies with a wrong token count, and replies whose greedy text differs
    from the same server's 1-client text for that prompt (with the first such prompt)."""
    out: dict[str, dict[int, dict]] = {}
    for r in rounds:
        c = out.setdefault(r.server, {}).setdefault(r.clients, {"replies": 0, "wrong_tokens": 0, "no_usage": 0,
                                                                 "text_mismatch": 0, "first_mismatch": None})
        for reply in r.replies:
            c["replies"] += 1
            c["wrong_tokens"] += reply.tokens != tokens
            c["no_usage"] += not reply.usage
            if reply.text != refs[r.server][reply.prompt].text:
                c["text_mismatch"] += 1
                c["first_mismatch"] = c["first_mismatch"] or {
                    "prompt": PROMPTS[reply.prompt], "expected": refs[r.server][reply.prompt].text,
                    "got": reply.text}
    return out


def summary(rounds: list[Round]) -> dict[str, dict[int, dict[str, Spread]]]:
    """Aggregate tok/s over the rounds (median, min, max), TTFT over every reply of those rounds, and the
    CPU time other processes took during the rounds."""
    out: dict[str, dict[int, dict[str, Spread]]] = {}
    for r in rounds:
        out.setdefault(r.server, {}).setdefault(r.clients, {})
    for name, by_clients in out.items():
        for clients in by_clients:
            mine = [r for r in rounds if r.server == name and r.clients == clients]
            by_clients[clients] = {
                "tokens_per_s": Spread.of([r.tokens_per_s for r in mine]),
                "ttft_ms": Spread.of([x.ttft_s * 1e3 for r in mine for x in r.replies]),
                "foreign_cpu_s": Spread.of([r.foreign_cpu_s for r in mine]),
            }
    return out


def agreement(refs: dict[str, dict[int, Reply]]) -> dict[str, int]:
    """Per other server: how many of its 1-client greedy texts equal edgepack's."""
    return {name: sum(r.text == refs[EDGEPACK][i].text for i, r in rs.items())
            for name, rs in refs.items() if name != EDGEPACK}


def ratios(stats: dict[str, dict[int, dict[str, Spread]]]) -> dict[int, float]:
    """edgepack / llama-server, medians of aggregate tok/s, per client count."""
    return {c: stats[EDGEPACK][c]["tokens_per_s"].median / stats[LLAMA][c]["tokens_per_s"].median
            for c in stats[EDGEPACK]}


# ---- report ----


def report_table(stats: dict, found: dict, agree: dict[str, int], ratio: dict[int, float], tokens: int) -> str:
    rows = [("SERVER", "CLIENTS", "AGG TOK/S (MEDIAN)", "MIN-MAX", "TTFT MS (MEDIAN)", "MIN-MAX",
             f"{tokens} TOKENS", "TEXT = 1-CLIENT", "OTHER CPU-S (MAX)")]
    for name, by_clients in stats.items():
        for clients, st in by_clients.items():
            t, f, c = st["tokens_per_s"], st["ttft_ms"], found[name][clients]
            rows.append((name, str(clients), f"{t.median:.1f}", f"{t.low:.1f}-{t.high:.1f}", f"{f.median:.1f}",
                         f"{f.low:.1f}-{f.high:.1f}", f"{c['replies'] - c['wrong_tokens']}/{c['replies']}",
                         f"{c['replies'] - c['text_mismatch']}/{c['replies']}", f"{st['foreign_cpu_s'].high:.2f}"))
    lines = [format_table(rows), ""]
    for name, same in agree.items():
        lines.append(f"{name} 1-client texts equal to {EDGEPACK}'s: {same}/{len(PROMPTS)}")
    for clients, value in ratio.items():
        goal = f" ({'meets' if value >= GOAL else 'misses'} the {GOAL} goal)" if clients in GOAL_CLIENTS else ""
        lines.append(f"edgepack / llama-server, {clients} clients: {value:.3f}{goal}")
    for name, by_clients in found.items():
        for clients, c in by_clients.items():
            if c["first_mismatch"]:
                m = c["first_mismatch"]
                lines.append(f"{name}, {clients} clients: text differs from 1-client for {m['prompt']!r}: "
                             f"expected {m['expected'][:80]!r}..., got {m['got'][:80]!r}...")
    return "\n".join(lines)


def save_results(args: argparse.Namespace, fleet: list[Server], rounds: list[Round], refs: dict, stats: dict,
                 found: dict, agree: dict[str, int], ratio: dict[int, float]) -> None:
    write_results("concurrency", {
        "settings": {"clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
                     "tokens": args.tokens, "threads": args.threads, "prompts": PROMPTS,
                     "commands": {s.name: [Path(a).name if "/" in a else a for a in s.command] for s in fleet},
                     "request": {s.name: request_body(s, "<prompt>", args.tokens) for s in fleet}},
        "goal": {"ratio": GOAL, "clients": GOAL_CLIENTS},
        "max_foreign_cpus": MAX_FOREIGN,
        "ratio_edgepack_llama_server": {c: round(v, 4) for c, v in ratio.items()},
        "medians": {n: {c: {k: round(v.median, 2) for k, v in st.items()} for c, st in bc.items()}
                    for n, bc in stats.items()},
        "spread": {n: {c: {k: [round(v.low, 2), round(v.high, 2)] for k, v in st.items()} for c, st in bc.items()}
                   for n, bc in stats.items()},
        "checks": found,
        "one_client_texts_equal_to_edgepack": agree,
        "reference_texts": {n: {PROMPTS[i]: r.text for i, r in rs.items()} for n, rs in refs.items()},
        "raw": [{"server": r.server, "clients": r.clients, "round": r.index, "wall_s": round(r.wall_s, 4),
                 "tokens": r.tokens, "tokens_per_s": round(r.tokens_per_s, 2),
                 "foreign_cpu_s": round(r.foreign_cpu_s, 2), "attempts": r.attempts,
                 "replies": [{k: v for k, v in asdict(x).items() if k != "text"} for x in r.replies]}
                for r in rounds],
    })


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,2,4,8", help="concurrent client counts (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=3, help="requests each client sends per round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server and client count (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads for every server (default 2)")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients {args.clients!r}: expected comma-separated integers")
    if min(args.clients) < 1 or args.requests < 1 or args.rounds < 1 or args.tokens < 1 or args.threads < 1:
        p.error("--clients, --requests, --rounds, --tokens and --threads must be >= 1")
    return args


def bench(args: argparse.Namespace) -> None:
    model = model_path()
    store = install_bundle(model)
    try:
        fleet = servers(model, store, args.threads)
        with ExitStack() as stack:
            procs: dict[str, tuple[Server, int]] = {}
            for server in fleet:
                log = WORK / f"{server.name.replace(' ', '-')}.log"
                proc = stack.enter_context(running(server.command, log))
                wait_ready(server.base, proc, log, server.ready_route)
                procs[server.name] = (server, proc.pid)
            print(f"servers up; {args.rounds} rounds x clients {args.clients} x {args.requests} requests x "
                  f"{args.tokens} tokens, {args.threads} threads", flush=True)
            refs = {s.name: reference_texts(s, args.tokens) for s in fleet}
            rounds = measure(procs, args)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    stats, found, agree = summary(rounds), checks(rounds, refs, args.tokens), agreement(refs)
    ratio = ratios(stats)
    print()
    print(report_table(stats, found, agree, ratio, args.tokens))
    save_results(args, fleet, rounds, refs, stats, found, agree, ratio)


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_concurrency: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
