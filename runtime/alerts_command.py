"""`edgepack alerts --prometheus-rules [FILE|-]`: the alert rules as a Prometheus rules file (prometheus_rules.py),
with the agents' latency SLAs from the store's current release, or from a flag."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import verdict
from .cli_common import format_table
from .prometheus_rules import Thresholds, rules, rules_yaml
from .store import Store


@click.command("alerts")
@click.option("--prometheus-rules", "rules_path", is_flag=False, flag_value="-", required=True, metavar="[FILE|-]",
              help="Write the rules here (- or no value: standard output).")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Take each agent's latency_sla_ms from this store's current release.")
@click.option("--latency-sla-ms", type=click.IntRange(1),
              help="The SLA without --store, or for the agents whose manifest sets none.")
@click.option("--error-rate", default=verdict.MAX_ERROR_RATE, show_default=True, type=float,
              help="Alert above this share of failed generations (5xx or 429).")
@click.option("--resource-percent", default=90.0, show_default=True, type=float,
              help="Alert when system CPU or memory stays above this.")
@click.option("--cache-hit-rate", default=0.6, show_default=True, type=float, help="Alert under this hit rate.")
@click.option("--window", default="5m", show_default=True, help="Range of the rates and of the p99.")
@click.option("--sustained", default="5m", show_default=True,
              help="How long CPU or memory must stay above the limit (every sample of this range).")
@click.option("--min-shadow-decisions", default=verdict.MIN_DECISIONS, show_default=True, type=click.IntRange(1),
              help="Compared decisions of an agent before its shadow agreement can alert.")
def alerts_command(rules_path: str, store_dir: Path | None, latency_sla_ms: int | None, error_rate: float,
                   resource_percent: float, cache_hit_rate: float, window: str, sustained: str,
                   min_shadow_decisions: int) -> None:
    """Write Prometheus alerting rules for edgepack's metrics: p99 latency over 150% of the SLA, error rate over 1%,
    CPU or memory over 90% sustained, cache hit rate under 60%, shadow agreement under the agent's tier."""
    sla_ms, sla_agent = _strictest_sla(store_dir, latency_sla_ms)
    thresholds = Thresholds(sla_ms, sla_agent, error_rate=error_rate, resource_percent=resource_percent,
                            cache_hit_rate=cache_hit_rate, window=window, sustained=sustained,
                            min_shadow_decisions=min_shadow_decisions)
    text = rules_yaml(thresholds)
    if rules_path == "-":
        sys.stdout.write(text)
    else:
        Path(rules_path).write_text(text)
    written = rules(thresholds)["groups"][0]["rules"]
    where = "standard output" if rules_path == "-" else rules_path
    click.echo(f"wrote {len(written)} alerting rules to {where}", err=True)
    click.echo(format_table([("ALERT", "SEVERITY")] + [(r["alert"], r["labels"]["severity"]) for r in written]),
               err=True)
    if sla_ms is None:
        click.echo("no latency rule: no agent has a latency_sla_ms (pass --latency-sla-ms or --store)", err=True)


def _strictest_sla(store_dir: Path | None, default_ms: int | None) -> tuple[int | None, str | None]:
    """The smallest latency SLA and its agent: each agent's from the store's manifest, else the flag's; without a
    store, the flag's (and no agent)."""
    if store_dir is None:
        return default_ms, None
    slas = [(agent.latency_sla_ms or default_ms, agent.name) for agent in Store(store_dir).manifest().agent_list()]
    return min(((ms, name) for ms, name in slas if ms), default=(None, None))
