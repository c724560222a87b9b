"""`edgepack status`: what a running server reports, read from its /health and /metrics."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from .errors import EdgepackError
from .memory import format_mib


def fetch(url: str, key: str | None = None) -> tuple[dict, dict]:
    """(health document, {metric sample name: {labels tuple: value}}); `key`: an API key for /metrics."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers),
                                        timeout=5) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise
            raise EdgepackError(f"the server at {url} wants an API key for /metrics: give --api-key-file or "
                                "$EDGEPACK_API_KEYS" + (" (the key given was refused)" if key else "")) from None
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                health = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 503 while loading: still a document
            health = json.loads(exc.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EdgepackError(f"no edgepack server answers at {url} ({exc})") from None
    samples: dict[str, dict] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return health, samples


def quantile(samples: dict, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile over all label sets of a histogram (linear within the bucket)."""
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in samples.get(f"{name}_bucket", {}).items():
        buckets[float(dict(labels)["le"])] += value
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
        lower, below = bound, buckets[bound]
    return lower


def summary(url: str, key: str | None = None) -> list[tuple[str, str]]:
    health, samples = fetch(url, key)

    def total(name: str, **match: str) -> float:
        return sum(v for labels, v in samples.get(name, {}).items()
                   if all(dict(labels).get(k) == val for k, val in match.items()))

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value * 1000:.0f} ms"

    requests = total("edgepack_requests_total")
    errors = sum(v for labels, v in samples.get("edgepack_requests_total", {}).items()
                 if dict(labels)["status"].startswith("5") or dict(labels)["status"] == "429")
    cache = {dict(labels)["result"]: v for labels, v in samples.get("edgepack_cache_requests_total", {}).items()}
    lookups = sum(cache.values())
    rows = [
        ("status", health.get("status", "?") + (f" ({health['error']})" if health.get("error") else "")),
        ("requests", f"{requests:.0f} ({errors:.0f} errors/refusals){_rate(requests, samples)}"),
        ("models loaded", ", ".join(
            f"{dict(k)['model']} ({total('edgepack_slot_limit', model=dict(k)['model']):.0f} slots)"
            for k, v in samples.get("edgepack_model_loaded", {}).items() if v) or "none"),
        ("in flight / queued / active slots", f"{total('edgepack_requests_in_flight'):.0f} / "
         f"{total('edgepack_queue_depth'):.0f} / {total('edgepack_active_slots'):.0f}"),
        ("generated tokens", f"{total('edgepack_generated_tokens_total'):.0f}"),
        ("decode tokens/s (last)", ", ".join(f"{dict(k)['model']} {v:.1f}"
                                             for k, v in samples.get("edgepack_decode_tokens_per_second", {}).items())
         or "–"),
    ]
    for label, name in (("latency", "edgepack_request_duration_seconds"),
                        ("time to first token", "edgepack_time_to_first_token_seconds"),
                        ("time per output token", "edgepack_time_per_output_token_seconds")):
        rows.append((f"{label} p50/p95/p99", " / ".join(ms(quantile(samples, name, q)) for q in (0.5, 0.95, 0.99))))
    hits = lookups - cache.get("miss", 0)
    rows.append(("cache hits", f"{hits / lookups:.0%} of {lookups:.0f} (L1 {cache.get('l1', 0):.0f}, L2 "
                 f"{cache.get('l2', 0):.0f}, semantic {cache.get('semantic', 0):.0f})" if lookups else "–"))
    rows.append(("resident memory", f"{format_mib(total('edgepack_process_resident_memory_bytes'))} (PSS "
                 f"{format_mib(total('edgepack_process_proportional_memory_bytes'))}, budget "
                 f"{format_mib(total('edgepack_memory_budget_bytes'))})"))
    rows.append(("system CPU / memory", f"{total('edgepack_system_cpu_percent'):.0f}% / "
                 f"{total('edgepack_system_memory_percent'):.0f}%"))
    rows.extend(_candidate(samples))
    firing = [dict(k)["alert"] for k, v in samples.get("edgepack_alert", {}).items() if v]
    rows.append(("alerts", ", ".join(firing) if firing else "none"))
    return rows


def _candidate(samples: dict) -> list[tuple[str, str]]:
    """The candidate on trial (docs/shadow.md): its release and mode, and per agent its shadow figures."""
    info = [dict(k) for k, v in samples.get("edgepack_candidate_info", {}).items() if v]
    if not info:
        return []
    rows = [("candidate", f"{info[0]['release']} ({info[0]['mode']})")]
    results: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in samples.get("edgepack_shadow_requests_total", {}).items():
        results[dict(labels)["agent"]][dict(labels)["result"]] = value
    ratios = {dict(k)["agent"]: v for k, v in samples.get("edgepack_shadow_agreement_ratio", {}).items()}
    limits = {dict(k)["agent"]: v for k, v in samples.get("edgepack_shadow_tier_limit", {}).items()}
    for agent in sorted(set(results) | set(limits)):
        counts = results.get(agent, {})
        ratio = f"{ratios[agent]:.1%} agree" if agent in ratios else "nothing compared yet"
        rows.append((f"shadow {agent}", f"{ratio} of {counts.get('agree', 0) + counts.get('disagree', 0):.0f} "
                     f"(tier allows {limits.get(agent, 0):.1%} changed; {counts.get('skipped', 0):.0f} skipped, "
                     f"{counts.get('error', 0):.0f} errors)"))
    return rows


def _rate(requests: float, samples: dict) -> str:
    """Requests per second since the server started (its process start time, from the process collector)."""
    started = sum(samples.get("process_start_time_seconds", {}).values())
    elapsed = time.time() - started
    return f", {requests / elapsed:.2f}/s since start" if started and elapsed > 0 else ""
