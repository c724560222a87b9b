"""Soak under faults (issue 13 §3): `edgepack serve` on Gemma 3 270M (two agents, caches on, a second model
swapped in and out under a tight --memory-budget) driven by 8 clients mixing good requests with broken ones
for --minutes; reports statuses per kind, 500s, incomplete answers, memory/fd/thread drift, latency per minute
and /health. Run: .venv/bin/python bench/soak.py [--minutes 10]   (bench/SOAK.md)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
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

WORK = OUT / "soak"
MIB = 2**20
CLIENTS = 8
AGENTS = ("planner", "writer")  # on the Gemma Q4_K_M model
SECOND = "backup"  # the agent of the second model (the same Gemma requantized to Q8_0)
# Each model fits this budget alone (about 465 and 480 MiB with the process and headroom); both together do not,
# even with the second one's context cut to 256 tokens (about 610 MiB; the 170 MiB token embedding is one shared
# segment, counted once): switching models must evict the idle one, and a request for one while the other is
# busy is a 503. (650 MiB let the second model in beside the first with its context cut to 1024.)
BUDGET = "560MiB"
# One llama.cpp thread: on this shared 2-core machine, two lock-step threads stall whenever another process
# takes a core.
SERVE_OPTIONS = ("--threads", 1, "--slots", 2, "--max-queue", 8, "--memory-budget", BUDGET,
                 "--header-timeout", 5, "--body-timeout", 10)
HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT = 5, 10, 5
SECOND_WINDOW = (35, 55)  # seconds of every minute in which model traffic goes to the second model
BURST = 40  # concurrent requests of one burst: beyond 2 slots + a queue of 8
MODEL_KINDS = ("chat", "chat_stream", "completion", "completion_stream")
# kind -> weight in each client's random choice
MIX = {"chat": 14, "chat_stream": 14, "completion": 10, "completion_stream": 10, "disconnect": 6, "malformed": 8,
       "oversized": 3, "unknown_model": 4, "slow_body": 3, "stalled": 1, "burst": 1}
# The statuses a kind may answer; anything else (a 500 above all) is a finding.
EXPECTED = {kind: {200, 429} for kind in (*MODEL_KINDS, "disconnect", "slow_body", "burst")}
EXPECTED |= {"second_model": {200, 429, 503}, "malformed": {400, 413}, "oversized": {413}, "unknown_model": {404},
             "stalled": {"closed"}}
QUESTIONS = ["What is the capital of France?", "Give me three tips for sleeping well.", "How do I boil an egg?",
             "Plan a day trip to the mountains.", "Write a haiku about the sea.", "What is 12 times 7?",
             "Name two uses of copper.", "How should I water a cactus?"]
PROMPTS = ["Once upon a time", "The weather today is", "A list of three fruits:", "The best way to learn is",
           "In a small village by the sea there lived", "def fibonacci(n):"]


def recipe(model: Path) -> str:
    return f"""# bench/soak.py: two agents on Gemma 3 270M, a third on it requantized (the model swapped in and out)
[models.gemma]
source = {json.dumps(str(model))}
quant = "keep"

[models.gemma-q8]
source = {json.dumps(str(model))}
quant = "Q8_0"

[agents.planner]
model = "gemma"
system_prompt = "You plan the steps of a task. Answer with a short numbered list."

[agents.writer]
model = "gemma"
system_prompt = "You write short, friendly replies."
semantic_cache = 0.9

[agents.{SECOND}]
model = "gemma-q8"
system_prompt = "You answer briefly."
"""


def bundle() -> Path:
    """The soak's bundle, built again only when the recipe changed (a build takes about a minute here)."""
    text = recipe(model_path())
    path, toml = WORK / "soak.edgepack", WORK / "soak.toml"
    if path.exists() and toml.exists() and toml.read_text() == text:
        return path
    toml.write_text(text)
    path.unlink(missing_ok=True)
    edgepack("build", "--recipe", toml, "-o", path, "--no-eval", "--calibration", "none", "--allow-requantize", "-q")
    return path


# ---- what the clients saw ----


@dataclass
class Record:
    kind: str
    status: int | str  # the HTTP status, or what happened instead ("closed", "conn_error:ReadTimeout", ...)
    at: float  # seconds into the soak (snapshots not counted)
    seconds: float
    complete: bool | None = None  # a 200 answer to a client that stayed: finish_reason present, stream ended [DONE]
    detail: str = ""


@dataclass
class Soak:
    base: str
    duration: float
    rng_seed: int
    records: list[Record] = field(default_factory=list)
    offset: float = 0.0  # the soak clock when the current leg started
    leg_start: float = 0.0
    leg_end: float = 0.0
    burst_lock: threading.Lock = field(default_factory=threading.Lock)
    last: threading.local = field(default_factory=threading.local)  # each client's last status, to back off on

    def now(self) -> float:
        return self.offset + time.perf_counter() - self.leg_start

    def running(self) -> bool:
        return time.perf_counter() < self.leg_end

    def second_window(self) -> bool:
        return SECOND_WINDOW[0] <= self.now() % 60 < SECOND_WINDOW[1]

    def add(self, kind: str, status: int | str, started: float, complete: bool | None = None, detail: str = "") -> None:
        took = round(self.now() - started, 4)
        self.records.append(Record(kind, status, round(started, 3), took, complete, detail[:300]))
        self.last.status = status


def client() -> httpx.Client:
    # Connection: close, so a request never meets a kept-alive connection the server is closing at that moment
    # (--idle-timeout): such a race would be the client's error, not the server's.
    return httpx.Client(timeout=httpx.Timeout(120.0), headers={"Connection": "close"})


def body_for(kind: str, agent: str, rng: random.Random) -> tuple[str, dict]:
    """The route and body of one chat or completion: half greedy from a small pool (cache hits), half sampled."""
    greedy = rng.random() < 0.5
    sampling = {"max_tokens": rng.choice((8, 16, 24, 32)), "temperature": 0 if greedy else 0.8}
    if not greedy:
        sampling["seed"] = rng.randrange(1 << 30)
    stream = kind.endswith("_stream") or kind == "disconnect"
    if kind.startswith("chat") or (kind == "disconnect" and rng.random() < 0.5):
        messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        return "/v1/chat/completions", {"model": agent, "messages": messages, "stream": stream, **sampling}
    return "/v1/completions", {"model": agent, "prompt": rng.choice(PROMPTS), "stream": stream, **sampling}


def problem(text: str) -> str:
    """An error answer as 'code: message' (the code first: details are cut to 300 characters)."""
    try:
        error = json.loads(text)["error"]
        return f"{error.get('code')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return text


def plain_complete(route: str, doc: dict) -> bool:
    choice = (doc.get("choices") or [{}])[0]
    text = choice.get("message", {}).get("content") if route.endswith("chat/completions") else choice.get("text")
    return isinstance(text, str) and bool(choice.get("finish_reason"))


def read_stream(resp: httpx.Response, stop_after: int | None = None) -> tuple[bool, str]:
    """(complete, problem): every event JSON without an error, a finish_reason, then [DONE]. With `stop_after`,
    return after that many events (the client walks away)."""
    events, finish, done = 0, None, False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        if done:
            return False, "data after [DONE]"
        doc = json.loads(line[6:])
        if "error" in doc:
            return False, f"error event: {doc['error']}"
        finish = (doc.get("choices") or [{}])[0].get("finish_reason") or finish
        events += 1
        if stop_after is not None and events >= stop_after:
            return True, ""
    if stop_after is not None:
        return True, ""  # the answer was shorter than the walk-away point
    if done and finish:
        return True, ""
    return False, f"ended without {'[DONE]' if not done else 'finish_reason'}"


def model_request(soak: Soak, http: httpx.Client, kind: str, agent: str, rng: random.Random, record_as: str) -> None:
    route, body = body_for(kind, agent, rng)
    started = soak.now()
    try:
        if not body["stream"]:
            resp = http.post(soak.base + route, json=body)
            ok = resp.status_code == 200 and plain_complete(route, resp.json())
            soak.add(record_as, resp.status_code, started, ok if resp.status_code == 200 else None,
                     "" if resp.status_code == 200 else problem(resp.text))
            return
        with http.stream("POST", soak.base + route, json=body) as resp:
            if resp.status_code != 200:
                soak.add(record_as, resp.status_code, started, detail=problem(resp.read().decode(errors="replace")))
                return
            walk_away = rng.randint(1, 4) if kind == "disconnect" else None
            complete, issue = read_stream(resp, walk_away)
        # a client that walked away has no complete answer to check
        soak.add(record_as, 200, started, None if walk_away else complete, issue)
    except httpx.HTTPError as exc:
        soak.add(record_as, f"conn_error:{type(exc).__name__}", started, detail=str(exc))


# ---- broken clients ----


MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b'{"model": "planner", "messages": [{"role": "user", "content": "Hi"'),  # cut short
    ("/v1/chat/completions", b"not json at all"),
    ("/v1/completions", b""),
    ("/v1/completions", b"[1, 2, 3]"),
    ("/v1/chat/completions", b'{"model": "planner", "messages": "hi"}'),
    ("/v1/chat/completions", b'{"model": "planner", "messages": [{"role": "user"}]}'),  # no content
    ("/v1/completions", b'{"model": "writer", "prompt": "\\ud800"}'),  # a lone surrogate
    ("/v1/completions", b'{"model": "writer", "prompt": "caf\xe9"}'),  # not UTF-8
    ("/v1/completions", b'{"model": "writer", "prompt": "x", "max_tokens": -5}'),
    ("/v1/completions", b'{"model": "writer", "prompt": "x", "temperature": "hot"}'),
    ("/v1/completions", b'{"model": "writer", "prompt": "x", "n": 1000}'),
    ("/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000),  # nested deeper than any parser's recursion
    ("/v1/chat/completions", b'{"model": "planner", "messages": [{"role": "wizard", "content": "Hi"}]}'),
    ("/completion", b'{"prompt": "x", "n_predict": 0}'),
]


def malformed(soak: Soak, http: httpx.Client, rng: random.Random) -> None:
    index = rng.randrange(len(MALFORMED))
    route, payload = MALFORMED[index]
    started = soak.now()
    try:
        resp = http.post(soak.base + route, content=payload, headers={"Content-Type": "application/json"})
        soak.add("malformed", resp.status_code, started, detail=f"#{index}: {problem(resp.text)}")
    except httpx.HTTPError as exc:
        soak.add("malformed", f"conn_error:{type(exc).__name__}", started, detail=f"#{index}: {exc}")


def oversized(soak: Soak, http: httpx.Client, rng: random.Random) -> None:
    """2 MiB with a Content-Length, or 1.5 MiB chunked (no length: the server must count)."""
    prompt = "word " * (2 * MIB // 5)
    payload = json.dumps({"model": "planner", "prompt": prompt, "max_tokens": 8}).encode()
    chunked = rng.random() < 0.5
    content: bytes | Iterator[bytes] = payload
    if chunked:
        content = (payload[i:i + 65536] for i in range(0, 3 * MIB // 2, 65536))
    started = soak.now()
    try:
        resp = http.post(soak.base + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
        soak.add("oversized", resp.status_code, started, detail="chunked" if chunked else "content-length")
    except httpx.HTTPError as exc:
        # the server may answer 413 and close before the client has sent everything
        soak.add("oversized", f"conn_error:{type(exc).__name__}", started, detail=str(exc))


def unknown_model(soak: Soak, http: httpx.Client, rng: random.Random) -> None:
    name = rng.choice(("gpt-4o", "planner2", "", "../../etc/passwd", "x" * 300, "GEMMA"))
    chat = rng.random() < 0.5
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": name, "max_tokens": 8, "stream": rng.random() < 0.5,
            **({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})}
    started = soak.now()
    try:
        resp = http.post(soak.base + route, json=body)
        soak.add("unknown_model", resp.status_code, started, detail=f"{name[:20]!r}: {problem(resp.text)}")
    except httpx.HTTPError as exc:
        soak.add("unknown_model", f"conn_error:{type(exc).__name__}", started, detail=str(exc))


def raw_connection(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=120)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def slow_body(soak: Soak, rng: random.Random, agent: str) -> None:
    """A valid completion whose body is dribbled in 8 pieces over about 3 s (within --body-timeout): a slow
    client that must still get its whole answer."""
    body = json.dumps({"model": agent, "prompt": rng.choice(PROMPTS), "max_tokens": 16, "temperature": 0.8,
                       "seed": rng.randrange(1000)}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    started = soak.now()
    try:
        with raw_connection(soak.base) as sock:
            sock.sendall(head)
            step = -(-len(body) // 8)
            for i in range(0, len(body), step):
                time.sleep(0.4)
                sock.sendall(body[i:i + step])
            reply = read_until_closed(sock)
    except OSError as exc:
        soak.add("slow_body", f"conn_error:{type(exc).__name__}", started, detail=str(exc))
        return
    status, payload = parse_reply(reply)
    complete = plain_complete("/v1/completions", payload) if status == 200 else None
    soak.add("slow_body", status, started, complete, "" if status == 200 else problem(json.dumps(payload)))


def parse_reply(reply: bytes) -> tuple[int | str, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    if not match:
        return "no_reply", {}
    try:
        return int(match.group(1)), json.loads(body)
    except ValueError:
        return int(match.group(1)), {}


def stalled(soak: Soak, rng: random.Random) -> None:
    """A client that stops half-way through its head (or its body) and waits: the server must close the
    connection after --header-timeout (--body-timeout), without an answer being required."""
    in_body = rng.random() < 0.5
    head = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
    data = head + b"Content-Length: 100\r\n\r\n" + b'{"model": "planner", ' if in_body else head + b"X-Slow: 1"
    limit = BODY_TIMEOUT if in_body else HEADER_TIMEOUT
    started = soak.now()
    try:
        with raw_connection(soak.base) as sock:
            sock.settimeout(limit + 15)
            sock.sendall(data)
            reply = read_until_closed(sock)
        status: int | str = "closed" if not reply else f"answered:{parse_reply(reply)[0]}"
    except TimeoutError:
        status = "not_closed"
    except OSError as exc:
        status = "closed" if isinstance(exc, ConnectionResetError) else f"conn_error:{type(exc).__name__}"
    soak.add("stalled", status, started, detail=f"{'body' if in_body else 'head'}, limit {limit}s")


def burst(soak: Soak, agent: str, seed: int) -> None:
    """BURST sampled completions at once: beyond the slots and the queue, so some must get 429 (never 500)."""
    if not soak.burst_lock.acquire(blocking=False):
        return  # one burst at a time

    def one(i: int) -> None:
        with client() as http:
            model_request(soak, http, "completion", agent, random.Random(seed + i), "burst")

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        soak.burst_lock.release()


def run_client(soak: Soak, index: int) -> None:
    rng = random.Random(soak.rng_seed * 100 + index)
    kinds, weights = list(MIX), list(MIX.values())
    with client() as http:
        while soak.running():
            kind = rng.choices(kinds, weights)[0]
            on_second = soak.second_window()
            agent = SECOND if on_second else rng.choice(AGENTS)
            model_kind = "second_model" if on_second else kind
            if kind in (*MODEL_KINDS, "disconnect"):
                model_request(soak, http, kind, agent, rng, model_kind if kind != "disconnect" else "disconnect")
            elif kind == "slow_body":
                slow_body(soak, rng, agent)
            elif kind == "burst":
                burst(soak, agent, rng.randrange(1 << 30))
            elif kind == "stalled":
                stalled(soak, rng)
            else:
                {"malformed": malformed, "oversized": oversized, "unknown_model": unknown_model}[kind](soak, http, rng)
            if getattr(soak.last, "status", None) in (429, 503):
                time.sleep(rng.uniform(0.2, 1.0))  # a well-behaved client backs off a little


# ---- watching the server ----


class HealthPoller(threading.Thread):
    """GET /health every second for the whole soak; every answer but 200 ok, or none within 5 s, is a failure."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.stop, self.polls, self.failures, self.slowest = base, threading.Event(), 0, [], 0.0

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    resp = http.get(self.base + "/health")
                    if resp.status_code != 200:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} HTTP {resp.status_code}: {resp.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                took = time.perf_counter() - started
                self.polls, self.slowest = self.polls + 1, max(self.slowest, took)
                self.stop.wait(max(0.0, 1.0 - took))


class MemorySampler(threading.Thread):
    """RSS of the server every 2 s (seconds since it was ready, snapshots included): the peak, and the series
    for the results file."""

    def __init__(self, process: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.process, self.stop, self.series, self.started = process, threading.Event(), [], time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                self.series.append((round(time.perf_counter() - self.started, 1), self.process.memory_info().rss))
            except psutil.Error:
                return


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(edgepack_[^ ]+) ([0-9.e+-]+)$", text, re.M)}


def metric_sum(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k == prefix or k.startswith(prefix + "{"))


def snapshot(base: str, process: psutil.Process) -> dict:
    """The server at rest with the first model loaded: memory, fds, threads, what /metrics says is in flight."""
    deadline = time.monotonic() + 60
    while metric_sum(metrics(base), "edgepack_requests_in_flight") > 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # (the /metrics request itself is in flight)
    with httpx.Client(timeout=120) as http:  # the first model back in, if the soak ended on the second
        while time.monotonic() < deadline:
            resp = http.post(base + "/v1/completions", json={"model": AGENTS[0], "prompt": "Hello", "max_tokens": 4,
                                                              "temperature": 0.8})
            if resp.status_code == 200:
                break
            time.sleep(1)
    time.sleep(IDLE_TIMEOUT + 2)  # kept-alive and half-closed connections gone
    values = metrics(base)
    mem = process.memory_full_info()
    return {"rss": mem.rss, "pss": mem.pss, "uss": mem.uss, "fds": process.num_fds(), "threads": process.num_threads(),
            "connections": len(process.net_connections(kind="tcp")),
            "in_flight": metric_sum(values, "edgepack_requests_in_flight") - 1,
            "queued": metric_sum(values, "edgepack_queue_depth"),
            "active_slots": metric_sum(values, "edgepack_active_slots"),
            "models_loaded": {k[len('edgepack_model_loaded{model="'):-2]: v for k, v in values.items()
                              if k.startswith("edgepack_model_loaded{")}}


def leg(soak: Soak, seconds: float) -> None:
    """All clients for `seconds` of soak time; the clock stops between legs."""
    soak.leg_start, soak.leg_end = time.perf_counter(), time.perf_counter() + seconds
    threads = [threading.Thread(target=run_client, args=(soak, i)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    soak.offset += time.perf_counter() - soak.leg_start


# ---- the report ----


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def by_status(records: list[Record]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        table[r.kind][str(r.status)] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(table.items())}


def per_minute(records: list[Record]) -> list[dict]:
    """p50/p99 of the answered (200) chats and completions of the first model, by minute of the soak."""
    minutes: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.kind in MODEL_KINDS and r.status == 200:
            minutes[int(r.at // 60)].append(r.seconds)
    return [{"minute": m + 1, "answers": len(v), "p50_s": round(statistics.median(v), 3),
             "p99_s": round(percentile(v, 0.99), 3)} for m, v in sorted(minutes.items())]


def expected(r: Record) -> bool:
    """Whether `r` is an answer its kind may get; any request for a model may meet the other model busy
    (503 insufficient_memory) around the switch."""
    return r.status in EXPECTED[r.kind] or (r.status == 503 and "insufficient_memory" in r.detail
                                            and r.kind in (*MODEL_KINDS, "disconnect", "slow_body", "burst"))


def unexpected(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records if not expected(r)]


def rss_by_minute(series: list[tuple[float, int]]) -> list[dict]:
    """Lowest and highest RSS sample of each minute since the server was ready: a leak raises the lows."""
    minutes: dict[int, list[int]] = defaultdict(list)
    for t, rss in series:
        minutes[int(t // 60)].append(rss)
    return [{"minute": m + 1, "low_mib": round(min(v) / MIB, 1), "high_mib": round(max(v) / MIB, 1)}
            for m, v in sorted(minutes.items())]


def loads_in_log(log: Path) -> dict[str, int]:
    """Model loads as the server's log tells them (one line each)."""
    return dict(Counter(re.findall(r"^edgepack: loaded (\S+) in ", log.read_text(), re.M)))


def drift(before: dict, after: dict, key: str) -> float:
    return (after[key] - before[key]) / before[key]


def report(doc: dict) -> str:
    kinds = doc["requests_by_status"]
    statuses = sorted({s for c in kinds.values() for s in c})
    rows = [("KIND", *statuses, "TOTAL", "INCOMPLETE")]
    incomplete = Counter(r["kind"] for r in doc["incomplete"])
    for kind, counts in kinds.items():
        cells = (str(counts.get(s, "")) for s in statuses)
        rows.append((kind, *cells, str(sum(counts.values())), str(incomplete[kind])))
    out = [format_table(rows), ""]
    out.append(format_table([("MINUTE", "ANSWERS", "P50 S", "P99 S")] + [
        (str(m["minute"]), str(m["answers"]), f"{m['p50_s']:.2f}", f"{m['p99_s']:.2f}")
        for m in doc["latency_per_minute"]]))
    a, b = doc["after_warmup"], doc["at_end"]
    out += ["", format_table([
        ("", "AFTER WARM-UP", "AT END", "DRIFT"),
        ("RSS", f"{a['rss'] / MIB:.1f} MiB", f"{b['rss'] / MIB:.1f} MiB", f"{doc['rss_drift']:+.1%}"),
        ("PSS", f"{a['pss'] / MIB:.1f} MiB", f"{b['pss'] / MIB:.1f} MiB", f"{doc['pss_drift']:+.1%}"),
        ("open fds", str(a["fds"]), str(b["fds"]), f"{b['fds'] - a['fds']:+d}"),
        ("threads", str(a["threads"]), str(b["threads"]), f"{b['threads'] - a['threads']:+d}"),
        ("tcp connections", str(a["connections"]), str(b["connections"]), f"{b['connections'] - a['connections']:+d}"),
    ])]
    h = doc["health"]
    out += ["", f"500s: {doc['status_500']}; unexpected answers: {len(doc['unexpected'])}; incomplete answers to "
            f"clients that stayed: {len(doc['incomplete'])} of {doc['complete_checked']}; /health: {h['failures']} "
            f"failures in {h['polls']} polls (slowest {h['slowest_s']:.2f} s); model loads {doc['model_loads_log']} "
            f"(edgepack_model_loads_total says {doc['model_loads_metric']}), "
            f"evictions {doc['evictions']:.0f}; peak RSS {doc['peak_rss'] / MIB:.0f} MiB; "
            f"server: {doc['server_exit']}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length, warm-up included")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of traffic before the first snapshot")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        store = WORK / "store"
        shutil.rmtree(store, ignore_errors=True)
        edgepack("install", bundle(), "--store", store)
        port = free_port()
        soak = Soak(local_url(port), args.minutes * 60, args.seed)
        log = WORK / "serve.log"
        with running(serve_command(store, port, *SERVE_OPTIONS), log) as proc:
            wait_ready(soak.base, proc, log)
            process = psutil.Process(proc.pid)
            at_start = {"fds": process.num_fds(), "threads": process.num_threads(), "rss": process.memory_info().rss}
            health, sampler = HealthPoller(soak.base), MemorySampler(process)
            health.start()
            sampler.start()
            print(f"soak: {args.minutes:g} min against {soak.base} (log {log}), warm-up {args.warmup:.0f} s",
                  flush=True)
            leg(soak, min(args.warmup, soak.duration))
            after_warmup = snapshot(soak.base, process)
            print(f"soak: warm-up done at {soak.offset:.0f} s, {len(soak.records)} requests", flush=True)
            leg(soak, soak.duration - soak.offset)
            at_end = snapshot(soak.base, process)
            health.stop.set()
            sampler.stop.set()
            final = metrics(soak.base)
            exit_code = proc.poll()
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    records = soak.records
    checked = [r for r in records if r.complete is not None]
    doc = {
        "model": model_path().name, "clients": CLIENTS, "minutes": args.minutes, "warmup_s": args.warmup,
        "seed": args.seed, "serve_options": [str(o) for o in SERVE_OPTIONS], "mix": MIX, "burst": BURST,
        "second_window_s": SECOND_WINDOW, "requests": len(records), "requests_by_status": by_status(records),
        "status_500": sum(r.status == 500 for r in records),
        "status_5xx_not_503": sum(isinstance(r.status, int) and r.status >= 500 and r.status != 503 for r in records),
        "unexpected": unexpected(records), "complete_checked": len(checked),
        "incomplete": [asdict(r) for r in checked if not r.complete],
        "latency_per_minute": per_minute(records), "at_start": at_start, "after_warmup": after_warmup,
        "at_end": at_end, "rss_drift": drift(after_warmup, at_end, "rss"),
        "pss_drift": drift(after_warmup, at_end, "pss"),
        "peak_rss": max((rss for _, rss in sampler.series), default=0), "rss_series": sampler.series,
        "health": {"polls": health.polls, "failures": len(health.failures), "failure_lines": health.failures[:50],
                   "slowest_s": round(health.slowest, 3)},
        "rss_by_minute": rss_by_minute(sampler.series), "model_loads_log": loads_in_log(log),
        "model_loads_metric": {k[len('edgepack_model_loads_total{model="'):-2]: v for k, v in final.items()
                        if k.startswith("edgepack_model_loads_total{")},
        "evictions": final.get("edgepack_model_evictions", 0.0),
        "cache": {k[len('edgepack_cache_requests_total{result="'):-2]: v for k, v in final.items()
                  if k.startswith("edgepack_cache_requests_total{")},
        "generations_cancelled": metric_sum(final, "edgepack_generations_cancelled_total"),
        "server_exit": "still running at the end" if exit_code is None else f"exited {exit_code}",
    }
    print(report(doc))
    write_results("soak", doc)
    return 0 if not doc["unexpected"] and not doc["incomplete"] else 1


if __name__ == "__main__":
    sys.exit(main())
