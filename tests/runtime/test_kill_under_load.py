"""kill -9 of serve under load, then a restart as systemd's Restart= would do it: the in-flight clients get a closed
connection (no hang), the L2 response cache (SQLite, WAL) and the warm states come through intact or set aside, and
the server is healthy again with what it had cached."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx
from conftest import start_server, stop_server, wait_ready
from test_cache import _cache_metrics

from edgepack.runtime.store import Store

CACHED = {"model": "tiny", "messages": [{"role": "user", "content": "the way"}], "max_tokens": 6, "temperature": 0,
          "ignore_eos": True}


def stream_until_cut(base: str, started: threading.Event, outcome: dict, index: int) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"story {index}"}], "max_tokens": 380,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                elif line and not line.startswith("data: "):
                    outcome[f"line {index}"] = line
        outcome[index] = "finished"  # the stream ended normally: the kill came too late for this client
    except (httpx.HTTPError, OSError) as exc:
        outcome[index] = type(exc).__name__


def test_a_server_killed_under_load_comes_back_healthy_with_its_cache(tiny_bundle, tmp_path):
    store = tmp_path / "store"
    Store(store).install(tiny_bundle)
    process, base = start_server(store, "--threads", "1", "--slots", "4")
    try:
        wait_ready(base, process)
        first = httpx.post(f"{base}/v1/chat/completions", json=CACHED, timeout=30).json()
        started, outcome = threading.Event(), {}
        clients = [threading.Thread(target=stream_until_cut, args=(base, started, outcome, i)) for i in range(4)]
        for client in clients:
            client.start()
        assert started.wait(30), f"no stream started: {outcome}"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        cut_at = time.monotonic()
        for client in clients:
            client.join(15)
        assert not any(c.is_alive() for c in clients), "a client hangs on a dead server"
        assert time.monotonic() - cut_at < 15
        assert sum(1 for v in outcome.values() if v != "finished") >= 1, outcome
    finally:
        stop_server(process)

    database = store / "cache" / "responses.sqlite"
    with sqlite3.connect(database) as db:  # an independent reader: SQLite's own check
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    restarted = time.monotonic()
    process, base = start_server(store, "--threads", "1", "--slots", "4")
    try:
        wait_ready(base, process)
        back = time.monotonic() - restarted
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        again = httpx.post(f"{base}/v1/chat/completions", json=CACHED, timeout=30).json()
        assert again["choices"] == first["choices"]
        assert _cache_metrics(base) == {"l2": 1.0}, "the cached answer came through the kill"
        print(f"back to healthy {back:.2f}s after the restart")
    finally:
        stop_server(process)
