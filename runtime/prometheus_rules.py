"""Prometheus alerting rules over the metrics edgepack exports, for a user's own Prometheus and Alertmanager.

The same conditions the server evaluates itself (runtime/alerts.py) and the shadow verdict (runtime/verdict.py),
written as PromQL, per scraped device (summed over edgepack's own labels only, so job, instance and any target
labels a user adds stay on the alert). The metrics they read:

    edgepack_request_duration_seconds_bucket/_count{endpoint}   histogram (runtime/metrics.py)
    edgepack_requests_total{endpoint,status}                    counter
    edgepack_system_cpu_percent, edgepack_system_memory_percent gauges
    edgepack_cache_requests_total{result}                       counter; result: l1, l2, semantic or miss
    edgepack_shadow_requests_total{agent,result}                counter; result: agree, disagree or error
    edgepack_shadow_agreement_ratio{agent}                      gauge; agreeing / compared decisions
    edgepack_shadow_tier_limit{agent}                           gauge; the tier's limit on changed decisions

The request latency histogram has no agent label, so the p99 rule holds every generation to the strictest SLA.
The YAML is written here (the runtime does not depend on a YAML library): same thresholds, same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import EdgepackError
from .verdict import MAX_ERROR_RATE, MIN_DECISIONS, SLA_FACTOR

# The routes that generate (runtime/server.py GENERATION_ROUTES, which the server's own error-rate alert counts).
GENERATION_ROUTES = ("/chat/completions", "/completion", "/completions", "/v1/chat/completions", "/v1/completions")
MIN_LATENCY_SAMPLES = 5  # as runtime/alerts.py
MIN_REQUESTS = 20
_PER_DEVICE = "sum without (endpoint, status)"  # per scraped device, keeping whatever target labels the user adds
_DURATION_RE = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")


@dataclass(frozen=True)
class Thresholds:
    latency_sla_ms: int | None = None  # the strictest agent's (there is no per-agent latency metric); None: no rule
    sla_agent: str | None = None  # whose SLA that is, for the alert's text
    error_rate: float = MAX_ERROR_RATE
    sla_factor: float = SLA_FACTOR
    resource_percent: float = 90.0
    cache_hit_rate: float = 0.6
    window: str = "5m"  # rates and quantiles over this range
    sustained: str = "5m"  # CPU and memory above the limit in every sample of this range
    min_shadow_decisions: int = MIN_DECISIONS

    def __post_init__(self) -> None:
        for name in ("window", "sustained"):
            if not _DURATION_RE.fullmatch(getattr(self, name)):
                raise EdgepackError(f"--{name}: expected a Prometheus duration such as 30s, 5m or 1h, "
                                    f"got {getattr(self, name)!r}")
        for name, value in (("error-rate", self.error_rate), ("cache-hit-rate", self.cache_hit_rate)):
            if not 0 < value < 1:
                raise EdgepackError(f"--{name}: expected a fraction between 0 and 1, got {value}")
        if not 0 < self.resource_percent < 100:
            raise EdgepackError(f"--resource-percent: expected a percentage between 0 and 100, got "
                                f"{self.resource_percent}")


def rules(thresholds: Thresholds) -> dict[str, Any]:
    """The rules file as a document: one group `edgepack`, one rule per alert."""
    t = thresholds
    w = t.window
    routes = 'endpoint=~"' + "|".join(re.escape(r) for r in GENERATION_ROUTES) + '"'
    out = []
    if t.latency_sla_ms:
        limit_s = t.sla_factor * t.latency_sla_ms / 1000
        whose = f" of agent {t.sla_agent}, the strictest" if t.sla_agent else ""
        out.append(_rule(
            "EdgepackLatencyP99OverSLA",
            f"histogram_quantile(0.99, sum without (endpoint) "
            f"(rate(edgepack_request_duration_seconds_bucket{{{routes}}}[{w}])))\n  > {_number(limit_s)}\n"
            f"and sum without (endpoint) (increase(edgepack_request_duration_seconds_count{{{routes}}}[{w}])) "
            f">= {MIN_LATENCY_SAMPLES}",
            "critical", f"p99 generation latency above {t.sla_factor:.0%} of the SLA",
            f"p99 over {w}: {{{{ $value | humanizeDuration }}}} on {{{{ $labels.instance }}}}, above "
            f"{t.sla_factor:.0%} of the {t.latency_sla_ms} ms SLA{whose}.",
        ))
    out.append(_rule(
        "EdgepackErrorRate",
        f'{_PER_DEVICE} (rate(edgepack_requests_total{{{routes}, status=~"5..|429"}}[{w}]))\n'
        f"  / {_PER_DEVICE} (rate(edgepack_requests_total{{{routes}}}[{w}]))\n  > {_number(t.error_rate)}\n"
        f"and {_PER_DEVICE} (increase(edgepack_requests_total{{{routes}}}[{w}])) >= {MIN_REQUESTS}",
        "critical", f"more than {t.error_rate:.0%} of generations failed (5xx or 429)",
        f"error rate over {w}: {{{{ $value | humanizePercentage }}}} on {{{{ $labels.instance }}}}.",
    ))
    for name, metric in (("CPU", "edgepack_system_cpu_percent"), ("Memory", "edgepack_system_memory_percent")):
        out.append(_rule(
            f"Edgepack{name}High", f"min_over_time({metric}[{t.sustained}]) > {_number(t.resource_percent)}",
            "warning", f"system {name.lower()} above {_number(t.resource_percent)}% for {t.sustained}",
            f"{name.lower()} in use on {{{{ $labels.instance }}}}: at least {{{{ $value }}}}% in every sample "
            f"of the last {t.sustained}.",
        ))
    # from the misses: a counter appears only once incremented, so a device without a single hit has no hit series
    out.append(_rule(
        "EdgepackCacheHitRateLow",
        f'sum without (result) (rate(edgepack_cache_requests_total{{result="miss"}}[{w}]))\n'
        f"  / sum without (result) (rate(edgepack_cache_requests_total[{w}]))\n  > {_number(1 - t.cache_hit_rate)}\n"
        f"and sum without (result) (increase(edgepack_cache_requests_total[{w}])) >= {MIN_REQUESTS}",
        "warning", f"cache hit rate under {t.cache_hit_rate:.0%}",
        f"{{{{ $value | humanizePercentage }}}} of deterministic requests missed every cache over {w} on "
        f"{{{{ $labels.instance }}}}.",
    ))
    out.append(_rule(
        "EdgepackShadowAgreementUnderTier",
        "edgepack_shadow_agreement_ratio < 1 - edgepack_shadow_tier_limit\n"
        f'and sum without (result) (edgepack_shadow_requests_total{{result=~"agree|disagree"}}) '
        f">= {t.min_shadow_decisions}",
        "warning", "a candidate changes more of an agent's decisions than its tier allows",
        "agent {{ $labels.agent }} on {{ $labels.instance }}: the candidate agrees on {{ $value | "
        "humanizePercentage }} of compared decisions, under its tier (see the decision log).",
    ))
    return {"groups": [{"name": "edgepack", "rules": out}]}


def rules_yaml(thresholds: Thresholds) -> str:
    return "# Prometheus alerting rules for edgepack (written by `edgepack alerts --prometheus-rules`).\n" + _yaml(
        rules(thresholds), 0)


def _rule(alert: str, expr: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {"alert": alert, "expr": expr, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def _number(value: float) -> str:
    """PromQL number literal: 0.01, 1.2, 90 (repr is the shortest that reads back the same)."""
    value = round(float(value), 9)  # 1 - 0.9 is 0.09999999999999998 in floats
    return str(int(value)) if value.is_integer() else repr(value)


def _yaml(value: Any, indent: int) -> str:
    """Block-style YAML of dicts, lists and scalars. Strings are JSON-quoted (a subset of YAML's double-quoted
    style), except several lines, which are literal blocks; dict order is kept, so the output is deterministic."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item, indent + 2)}")
    else:
        for item in value:
            nested = _yaml(item, indent + 2)
            lines.append(f"{pad}- {nested[indent + 2:]}" if isinstance(item, dict) else f"{pad}- {_scalar(item, 0)}")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _scalar(value: Any, indent: int) -> str:
    if isinstance(value, str) and "\n" in value and value == value.strip() and "\r" not in value:
        return "|-\n" + "".join(" " * indent + line + "\n" for line in value.split("\n"))
    return json.dumps(value, ensure_ascii=False)
