"""Alert states over a sliding window, exported as edgepack_alert{alert="..."} gauges.

- latency_p99_over_sla: an agent's p99 request latency above 150% of its latency_sla_ms
- error_rate: more than 1% of requests answered 5xx or 429
- cpu_high / memory_high: system CPU or memory above 90% in every sample of the window
- cache_hit_rate_low: under 60% of deterministic requests served from a cache (with 20 or more of them)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from .stats import percentile

WINDOW_SECONDS = 300.0
SUSTAINED_SECONDS = 60.0
ALERTS = ("latency_p99_over_sla", "error_rate", "cpu_high", "memory_high", "cache_hit_rate_low")


@dataclass
class AlertWindow:
    slas_ms: dict[str, int]  # agent -> latency SLA
    clock: Callable[[], float] = time.monotonic
    latencies: dict[str, collections.deque] = field(default_factory=dict)
    outcomes: collections.deque = field(default_factory=collections.deque)  # (time, failed)
    cache: collections.deque = field(default_factory=collections.deque)  # (time, hit)
    load: collections.deque = field(default_factory=collections.deque)  # (time, cpu %, memory %)

    def outcome(self, status: int) -> None:
        self.outcomes.append((self.clock(), status >= 500 or status == 429))

    def latency(self, agent: str, seconds: float) -> None:
        self.latencies.setdefault(agent, collections.deque()).append((self.clock(), seconds))

    def cache_lookup(self, hit: bool) -> None:
        self.cache.append((self.clock(), hit))

    def sample_load(self) -> None:
        self.load.append((self.clock(), psutil.cpu_percent(interval=None), psutil.virtual_memory().percent))

    def evaluate(self) -> dict[str, bool]:
        now = self.clock()
        for series in (self.outcomes, self.cache, *self.latencies.values()):
            _trim(series, now - WINDOW_SECONDS)
        _trim(self.load, now - SUSTAINED_SECONDS)
        over_sla = any(
            len(values) >= 5 and percentile((v for _, v in values), 99) > 1.5 * self.slas_ms[agent] / 1000
            for agent, values in self.latencies.items() if agent in self.slas_ms
        )
        failed = [f for _, f in self.outcomes]
        hits = [h for _, h in self.cache]
        sustained = len(self.load) >= 3 and self.load[0][0] <= now - SUSTAINED_SECONDS * 0.8
        return {
            "latency_p99_over_sla": bool(over_sla),
            "error_rate": len(failed) >= 20 and sum(failed) / len(failed) > 0.01,
            "cpu_high": sustained and all(cpu > 90 for _, cpu, _ in self.load),
            "memory_high": sustained and all(mem > 90 for _, _, mem in self.load),
            "cache_hit_rate_low": len(hits) >= 20 and sum(hits) / len(hits) < 0.6,
        }


def _trim(series: collections.deque, oldest: float) -> None:
    while series and series[0][0] < oldest:
        series.popleft()
