"""Alert conditions over their window, and `edgepack status` against a live server."""

from __future__ import annotations

import re

from conftest import Clock, post_json, run_cli

from edgepack.runtime.alerts import WINDOW_SECONDS, AlertWindow


def test_latency_over_sla_error_rate_and_cache_hit_rate():
    clock = Clock()
    window = AlertWindow({"planner": 800}, clock=clock)
    for seconds in (0.5, 0.6, 0.7, 0.5, 0.6):
        window.latency("planner", seconds)
    assert not window.evaluate()["latency_p99_over_sla"]
    window.latency("planner", 1.3)  # > 1.5 x 0.8 s
    assert window.evaluate()["latency_p99_over_sla"]
    for status in [200] * 98 + [500, 429]:
        window.outcome(status)
    assert window.evaluate()["error_rate"]  # 2% > 1%
    for hit in [True] * 10 + [False] * 10:
        window.cache_lookup(hit)
    assert window.evaluate()["cache_hit_rate_low"]
    clock.now += WINDOW_SECONDS + 1  # everything ages out of the window
    assert not any(window.evaluate().values())


def test_cpu_and_memory_alerts_need_a_sustained_minute():
    """docs/operations.md: above 90% "in every sample of the last minute" (the server samples every 5 s)."""
    clock = Clock()
    window = AlertWindow({}, clock=clock)

    def sample(cpu: float, memory: float, seconds: float) -> None:
        for _ in range(int(seconds // 5)):
            clock.now += 5
            window.load.append((clock.now, cpu, memory))

    window.load.append((clock.now, 95.0, 40.0))
    sample(95.0, 40.0, 30)
    assert not window.evaluate()["cpu_high"]  # a 30 s burst is not an alert
    sample(95.0, 40.0, 30)
    assert window.evaluate()["cpu_high"] and not window.evaluate()["memory_high"]  # a whole minute is
    sample(50.0, 40.0, 5)
    assert not window.evaluate()["cpu_high"]  # one sample under 90% within the minute clears it
    sample(95.0, 40.0, 55)
    assert not window.evaluate()["cpu_high"]  # ... until it is older than a minute
    sample(95.0, 40.0, 10)
    assert window.evaluate()["cpu_high"]
    window.load.clear()
    sample(20.0, 96.0, 65)
    assert window.evaluate()["memory_high"] and not window.evaluate()["cpu_high"]


def test_status_reads_a_live_server(server):
    post_json(server + "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3, "temperature": 0})
    result = run_cli("status", "--url", server)
    assert result.returncode == 0, result.stderr
    width = result.stdout.splitlines()[0].index("ok")  # the value column
    lines = {line[:width].strip(): line[width:].strip() for line in result.stdout.splitlines()}
    assert lines["status"] == "ok" and lines["alerts"] == "none"
    assert lines["latency p50/p95/p99"].endswith("ms")
    assert "MiB (PSS " in lines["resident memory"] and "budget" in lines["resident memory"]
    assert lines["system CPU / memory"].endswith("%")
    assert re.fullmatch(r"tiny \([24] slots\)", lines["models loaded"]) and "/s since start" in lines["requests"]
    down = run_cli("status", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "no edgepack server answers" in down.stderr
