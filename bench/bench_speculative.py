"""Speculative decoding (issue 16): edgepack's n-gram drafts against llama-server's own n-gram modes, plain
decoding on both, and both servers with no flags at all, on Gemma 3 270M.

    .venv/bin/python bench/bench_speculative.py [--rounds 5] [--clients 1 4] [--speculate 16] [--max-foreign 0.1]

Every server runs at once, idle but for the round being measured. The order rotates each round; a round
is run again (up to 3 times) while other processes took more than --max-foreign CPUs. Figures are medians
of the rounds of aggregate completion tokens per second (all tokens of the round / its wall time), and
ratios against llama-server in the same run:

- agent work whose answers copy from the prompt or from earlier requests:
  * `tool-calls`: a smart-home agent's conversation with earlier tool calls; it answers the next request
    with one JSON tool call (stop at the newline after it): names and keys repeat from the earlier turns
    and from the agent's earlier requests;
  * `retry`: the agent is asked to send a tool call from its prompt again (Gemma 3 270M echoes the
    prompt, which copies just the same);
- `free-text`: continuations of plain text, sampled (temperature 0.8, a seed per request).

Each request's prompt is new (an id and values that change), so no response cache answers it. Each server's
texts are compared per request with its own project's plain server (greedy and seeded: identical where
llama.cpp computes a row alike alone and batched, see docs/speculative.md); drafted and
accepted tokens come from edgepack's /metrics and llama-server's `timings`, and tokens per weight pass are
completion tokens / (completion tokens - accepted drafts): how many tokens each pass over the weights gave.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUT,
    BenchError,
    Spread,
    build_bundle,
    edgepack,
    free_port,
    llama_tool,
    local_url,
    model_path,
    run_clients,
    running,
    serve_command,
    wait_quiet,
    wait_ready,
    write_results,
)

WORK = OUT / "speculative"
THREADS = 2
SLOTS = 4
CTX_PER_SLOT = 2048
ATTEMPTS = 3
QUIET_WAIT_S = 10
WORKLOADS = ("tool-calls", "retry", "free-text")
AGENT_WORK = ("tool-calls", "retry")

# ---- prompts: a new one per request ----

ROOMS = ("kitchen", "bedroom", "office", "living room", "garage", "bathroom", "hallway", "attic", "cellar")
ARTISTS = ("Miles Davis", "Daft Punk", "Nina Simone", "Radiohead", "Bach", "Fela Kuti", "Björk", "Khruangbin")
LABELS = ("pasta", "tea", "laundry", "bread", "eggs", "call mum", "oven", "pizza", "rice")
TOOLS = ("You control a smart home. Reply with one JSON tool call and nothing else. Tools: set_light(room, state), "
         "play_music(artist, room), set_timer(minutes, label), set_thermostat(room, celsius).")
PROJECTS = ("EDGE-PLATFORM", "GATEWAY", "FLEET-OPS", "SENSOR-HUB", "RUNTIME")
TEXTS = ("The history of the printing press begins", "In the year 2050, cities", "Dear hiring manager,",
         "The mitochondria is", "My favourite recipe for bread", "The three primary colors are",
         "Once upon a time, in a village by the sea,", "The first thing to know about bees is")


def turn(role: str, text: str) -> str:
    return f"<start_of_turn>{role}\n{text}<end_of_turn>\n"


def call(name: str, **arguments: object) -> str:
    args = ", ".join(f'"{k}": ' + (f'"{v}"' if isinstance(v, str) else str(v)) for k, v in arguments.items())
    return f'{{"name": "{name}", "arguments": {{{args}}}}}'


def tool_calls_prompt(k: int) -> str:
    """Two earlier turns (tools that vary with k), then a new request."""
    room, other, artist, played = ROOMS[k % 9], ROOMS[(k + 4) % 9], ARTISTS[k % 8], ARTISTS[(k + 3) % 8]
    history = [
        (f"Turn on the lights in the {other}.", call("set_light", room=other, state="on")),
        (f"Play some {played} in the {room}.", call("play_music", artist=played, room=room)),
        (f"Set the {other} to {18 + k % 6} degrees.", call("set_thermostat", room=other, celsius=18 + k % 6)),
    ]
    asks = (f"Turn off the lights in the {room}.", f"Set a timer for {3 + k % 40} minutes for the {LABELS[k % 9]}.",
            f"Play {artist} in the {other}.", f"Make the {room} {17 + k % 8} degrees.")
    first, second = history[k % 3], history[(k + 1) % 3]
    text = turn("user", f"{TOOLS}\n\n{first[0]}") + turn("model", first[1])
    text += turn("user", second[0]) + turn("model", second[1])
    return text + turn("user", f"(request {k}) {asks[k % 4]}") + "<start_of_turn>model\n"


def retry_prompt(k: int) -> str:
    earlier = call("create_ticket", project=PROJECTS[k % 5], title=f"Sensor gateway {k} drops MQTT packets after "
                   f"firmware 2.{k % 7}.{k % 3}", priority=("high", "low", "medium")[k % 3],
                   assignee=("maria.kowalski", "li.wei", "sam.okafor")[k % 3], labels=["mqtt", "firmware"])
    return (turn("user", "You are a support agent. You answer only with a tool call in JSON.\n\n"
                 f"Earlier you made this tool call:\n{earlier}\nThe server timed out. Send exactly the same tool "
                 "call again, nothing else.") + "<start_of_turn>model\n")


def request(workload: str, k: int) -> dict:
    """The body of request k of a workload (the `model` field is added per server)."""
    if workload == "tool-calls":
        return {"prompt": tool_calls_prompt(k), "max_tokens": 64, "temperature": 0, "stop": ["\n"]}
    if workload == "retry":
        return {"prompt": retry_prompt(k), "max_tokens": 96, "temperature": 0}
    return {"prompt": f"{TEXTS[k % 8]} (part {k})", "max_tokens": 96, "temperature": 0.8, "seed": 1000 + k}


# ---- servers ----


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    port: int
    edgepack: bool

    @property
    def base(self) -> str:
        return local_url(self.port)


def servers(model: Path, stores: list[Path], speculate: int) -> list[Server]:
    llama_server = str(llama_tool("llama-server", "native/build-llama-server.sh"))
    ports = iter([free_port() for _ in range(7)])
    own_stores = iter(stores)

    def ours(name: str, *options: object) -> Server:
        port = next(ports)
        return Server(name, serve_command(next(own_stores), port, *options), port, True)

    def theirs(name: str, *options: object) -> Server:
        port = next(ports)
        return Server(name, [llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             *(str(o) for o in options)], port, False)

    tuned = ("--threads", THREADS, "--slots", SLOTS, "--ctx", CTX_PER_SLOT, "--no-cache")
    theirs_tuned = ("-t", THREADS, "-tb", THREADS, "-np", SLOTS, "-c", SLOTS * CTX_PER_SLOT)
    return [
        ours("edgepack plain", *tuned, "--speculate", 0),
        ours(f"edgepack speculate {speculate}", *tuned, "--speculate", speculate),
        ours("edgepack defaults"),
        theirs("llama-server plain", *theirs_tuned),
        theirs("llama-server ngram-simple", *theirs_tuned, "--spec-type", "ngram-simple"),
        theirs("llama-server ngram-mod", *theirs_tuned, "--spec-type", "ngram-mod"),
        theirs("llama-server defaults"),
    ]


# ---- a round ----


@dataclass(frozen=True)
class Reply:
    k: int
    text: str
    tokens: int
    drafted: int | None  # llama-server's timings (None: edgepack, whose counts come from /metrics)
    accepted: int | None


@dataclass
class Round:
    server: str
    workload: str
    clients: int
    index: int
    wall_s: float
    foreign_cpu_s: float
    replies: list[Reply] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def post(http: httpx.Client, server: Server, body: dict) -> dict:
    response = http.post(f"{server.base}/v1/completions", json=body)
    if response.status_code != 200:
        raise BenchError(f"{server.name}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def spec_counts(server: Server) -> tuple[int, int]:
    """edgepack's drafted and accepted tokens so far, summed over models and agents."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    sums = []
    for name in ("edgepack_spec_drafted_tokens_total", "edgepack_spec_accepted_tokens_total"):
        sums.append(int(sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))))
    return sums[0], sums[1]


def run_round(server: Server, pid: int, workload: str, clients: int, requests: int, index: int) -> Round:
    """`clients` clients released together, each sending `requests` requests back to back."""
    model = "gemma3-270m" if server.edgepack else "gemma"

    def send(http: httpx.Client, i: int, j: int) -> Reply:
        k = index * 10_000 + clients * 1000 + i * 100 + j  # new in every round
        doc = post(http, server, {"model": model, **request(workload, k)})
        timings = doc.get("timings", {})
        return Reply(k, doc["choices"][0]["text"], doc["usage"]["completion_tokens"], timings.get("draft_n"),
                     timings.get("draft_n_accepted"))

    before = spec_counts(server) if server.edgepack else (0, 0)
    run = run_clients(clients, requests, send, pid, f"{server.name}, {workload}, {clients} clients")
    r = Round(server.name, workload, clients, index, run.wall_s, run.foreign_cpu_s, run.replies)
    if server.edgepack:
        after = spec_counts(server)
        r.drafted, r.accepted = after[0] - before[0], after[1] - before[1]
    else:
        r.drafted = sum(x.drafted or 0 for x in r.replies)
        r.accepted = sum(x.accepted or 0 for x in r.replies)
    return r


def clean_round(server: Server, pid: int, workload: str, clients: int, requests: int, index: int,
                max_foreign: float) -> Round:
    """A round during which other processes took at most `max_foreign` CPUs (else the last attempt)."""
    for attempt in range(1, ATTEMPTS + 1):
        if not wait_quiet(max_foreign / (os.cpu_count() or 1), QUIET_WAIT_S):
            print(f"  the machine was not quiet for {QUIET_WAIT_S}s; measuring anyway", flush=True)
        r = run_round(server, pid, workload, clients, requests, index)
        if r.foreign_cpu_s <= max_foreign * r.wall_s or attempt == ATTEMPTS:
            return r
        print(f"  {server.name} {workload} {clients}c: others took {r.foreign_cpu_s:.2f} CPU-s; again", flush=True)
    raise AssertionError("unreachable")


# ---- the whole measurement ----


def warm_up(procs: dict[str, tuple[Server, int]], workloads: list[str]) -> None:
    """One uncounted request of each workload per server (ids no round uses)."""
    with httpx.Client(timeout=300) as http:
        for server, _ in procs.values():
            model = "gemma3-270m" if server.edgepack else "gemma"
            for workload in workloads:
                post(http, server, {"model": model, **request(workload, 999_999)})


def measure(procs: dict[str, tuple[Server, int]], args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    names = list(procs)
    for index in range(args.rounds):
        for w, workload in enumerate(args.workloads):
            for c, clients in enumerate(args.clients):
                shift = (index + w + c) % len(names)
                for name in names[shift:] + names[:shift]:
                    server, pid = procs[name]
                    requests = args.requests if clients == 1 else max(1, args.requests // 2)
                    r = clean_round(server, pid, workload, clients, requests, index, args.max_foreign)
                    rounds.append(r)
                    rate = f"{r.accepted}/{r.drafted}" if r.drafted else "-"
                    print(f"  {index + 1}/{args.rounds} {workload:<10} {clients}c {name:<28} "
                          f"{r.tokens_per_s:6.1f} tok/s ({r.tokens} tok, {r.wall_s:5.2f}s, drafts {rate}, "
                          f"others {r.foreign_cpu_s:.2f} CPU-s)", flush=True)
    return rounds


def plain_of(name: str) -> str:
    return "edgepack plain" if name.startswith("edgepack") else "llama-server plain"


def identity(rounds: list[Round], names: list[str]) -> dict[str, dict[str, int]]:
    """Per server, per workload: requests whose text differs from its own project's plain server's for the same
    prompt (edgepack's against edgepack plain, llama-server's against llama-server plain)."""
    texts: dict[tuple[str, str, int], str] = {}
    for r in rounds:
        for x in r.replies:
            texts[(r.server, r.workload, x.k)] = x.text
    out: dict[str, dict[str, int]] = {}
    for name in names:
        for workload in dict.fromkeys(r.workload for r in rounds):
            keys = [(s, w, k) for (s, w, k) in texts if s == plain_of(name) and w == workload]
            out.setdefault(name, {})[workload] = sum(texts.get((name, w, k)) != texts[(s, w, k)] for s, w, k in keys)
    return out


def summarise(rounds: list[Round], names: list[str], clients: list[int]) -> dict:
    stats: dict = {}
    for name in names:
        for workload in dict.fromkeys(r.workload for r in rounds):
            for n in clients:
                mine = [r for r in rounds if r.server == name and r.workload == workload and r.clients == n]
                tokens = sum(r.tokens for r in mine)
                accepted = sum(r.accepted for r in mine)
                drafted = sum(r.drafted for r in mine)
                stats.setdefault(name, {}).setdefault(workload, {})[n] = {
                    "tok_s": Spread.of([r.tokens_per_s for r in mine]).__dict__,
                    "tokens": tokens,
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None,
                    "tokens_per_pass": tokens / (tokens - accepted) if tokens > accepted else None,
                }
    return stats


def ratio(stats: dict, ours: str, theirs: str, workload: str, clients: int) -> float:
    return stats[ours][workload][clients]["tok_s"]["median"] / stats[theirs][workload][clients]["tok_s"]["median"]


def goals(stats: dict, spec: str, clients: list[int]) -> list[tuple[str, float, float]]:
    """(what, measured, goal) for each of the issue's goals."""
    best = ("llama-server ngram-simple", "llama-server ngram-mod")
    workloads = list(stats[spec])  # those measured
    out = []
    for n in clients:
        for workload in (w for w in AGENT_WORK if w in workloads):
            theirs = max(best, key=lambda b: stats[b][workload][n]["tok_s"]["median"])
            out.append((f"{workload}, {n} client(s): {spec} / {theirs} (their best)",
                        ratio(stats, spec, theirs, workload, n), 1.2))
        if "free-text" in workloads:
            out.append((f"free-text, {n} client(s): {spec} / llama-server plain",
                        ratio(stats, spec, "llama-server plain", "free-text", n), 0.97))
        for workload in workloads:
            out.append((f"{workload}, {n} client(s): edgepack defaults / llama-server defaults",
                        ratio(stats, "edgepack defaults", "llama-server defaults", workload, n), 0.95))
    return out


def report(stats: dict, names: list[str], clients: list[int], same: dict, spec: str) -> str:
    lines = ["| server | workload | clients | tok/s median (low-high) | acceptance | tokens per pass | "
             "texts differing from the same server's plain |", "|---|---|---:|---:|---:|---:|---:|"]
    for workload in stats[spec]:
        for n in clients:
            for name in names:
                s = stats[name][workload][n]
                t = s["tok_s"]
                acc = f"{s['accepted']}/{s['drafted']} ({s['acceptance']:.0%})" if s["drafted"] else "-"
                tpp = f"{s['tokens_per_pass']:.2f}" if s["tokens_per_pass"] else "-"
                lines.append(f"| {name} | {workload} | {n} | {t['median']:.1f} ({t['low']:.1f}-{t['high']:.1f}) | "
                             f"{acc} | {tpp} | {same[name][workload]} |")
    lines.append("")
    for what, value, goal in goals(stats, spec, clients):
        lines.append(f"- {what}: {value:.2f}x (goal >= {goal}: {'met' if value >= goal else 'NOT met'})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at 1 client (half at more)")
    parser.add_argument("--speculate", type=int, default=16, help="edgepack's --speculate for its tuned server")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="CPUs other processes may take during a round before it is run again")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    return parser.parse_args(argv)


def bench(args: argparse.Namespace) -> None:
    model = model_path()
    WORK.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(model, WORK / "gemma.edgepack")
    stores = []  # one per edgepack server: its response cache is a file in the store
    for _ in range(3):
        stores.append(Path(tempfile.mkdtemp(prefix="store-", dir=WORK)))
        edgepack("install", bundle, "--store", stores[-1])
    fleet = servers(model, stores, args.speculate)
    spec = fleet[1].name
    with running(fleet[0].command, WORK / "0.log") as p0, running(fleet[1].command, WORK / "1.log") as p1, \
            running(fleet[2].command, WORK / "2.log") as p2, running(fleet[3].command, WORK / "3.log") as p3, \
            running(fleet[4].command, WORK / "4.log") as p4, running(fleet[5].command, WORK / "5.log") as p5, \
            running(fleet[6].command, WORK / "6.log") as p6:
        pids = [p.pid for p in (p0, p1, p2, p3, p4, p5, p6)]
        for i, (server, pid) in enumerate(zip(fleet, (p0, p1, p2, p3, p4, p5, p6), strict=True)):
            wait_ready(server.base, pid, WORK / f"{i}.log")
        procs = {s.name: (s, pid) for s, pid in zip(fleet, pids, strict=True)}
        warm_up(procs, args.workloads)
        rounds = measure(procs, args)
    names = [s.name for s in fleet]
    stats = summarise(rounds, names, args.clients)
    same = identity(rounds, names)
    table = report(stats, names, args.clients, same, spec)
    print(table)
    write_results("speculative", {"args": vars(args), "servers": {s.name: s.command for s in fleet},
                                  "stats": stats, "differing_texts": same, "table": table,
                                  "rounds": [{**{k: v for k, v in r.__dict__.items() if k != "replies"},
                                              "tokens": r.tokens} for r in rounds]})


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_speculative: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
