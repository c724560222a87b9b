"""The trial of a candidate release from the command line: serve's setup of it, and `edgepack promote` / `reject`
for a person who decides instead of the rule (docs/shadow.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from .bundle_format import Manifest
from .cli_common import store_option
from .decision_log import DecisionLog
from .errors import EdgepackError
from .store import Store
from .trial import Trial

DEFAULT_SHADOW_RATE = 0.2
DECISION_LOG = Path("decisions") / "log.jsonl"  # in the store


def parse_share(text: str, what: str) -> float:
    """'20%', '0.2' or '0' -> 0.2 / 0.2 / 0.0; one-line error otherwise."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise EdgepackError(f"{what}: expected a share such as 20% or 0.2, got {text!r}") from None
    if not 0 <= share <= 1:
        raise EdgepackError(f"{what}: expected a share between 0% and 100%, got {text!r}")
    return share


def start_trial(store: Store, current: Manifest, shadow_rate: str | None, ab_rate: str, auto_promote: bool,
                min_decisions: int, log: Callable[[str], None]) -> Trial | None:
    """The store's candidate on trial, or None when there is none (or neither shadow nor A/B is wanted)."""
    shadow = parse_share(shadow_rate, "--shadow-rate") if shadow_rate is not None else None
    ab = parse_share(ab_rate, "--ab")
    if store.release_id("candidate") is None:
        if shadow or ab:
            log("warning: --shadow-rate/--ab given, but the store has no candidate (install --candidate)")
        return None
    candidate = store.manifest("candidate")
    rates = {a.name: a.shadow_rate for a in candidate.agent_list() if a.shadow_rate is not None and shadow is None}
    shadow = DEFAULT_SHADOW_RATE if shadow is None else shadow  # the flag for all agents, else the recipe's, else 20%
    if not shadow and not ab and not any(rates.values()):
        log("candidate present, but shadow and A/B are both off: it takes no traffic")
        return None
    agents = {a.name: a for a in current.agent_list()}
    tiers = {a.name: a.tier or agents.get(a.name, a).tier for a in candidate.agent_list()}
    slas = {a.name: a.latency_sla_ms or agents.get(a.name, a).latency_sla_ms for a in candidate.agent_list()}
    return Trial(store, current, candidate, shadow_rate=shadow, ab_rate=ab,
                 auto_promote=auto_promote or candidate.auto_promote, agent_rates=rates,
                 log=DecisionLog(store.root / DECISION_LOG), min_decisions=min_decisions, tiers=tiers, slas_ms=slas,
                 on_event=log)


@click.command()
@store_option
@click.option("--reason", default="promoted by hand", show_default=True, help="Recorded with the verdict.")
def promote(store_dir: Path, reason: str) -> None:
    """Make the store's candidate the current release (the current one becomes previous); restart serve after."""
    current, previous = Store(store_dir).promote({"reason": reason, "by": "hand"})
    click.echo(f"current release is now {current} (previous: {previous}); restart serve to serve it")


@click.command()
@store_option
@click.option("--reason", default="rejected by hand", show_default=True, help="Recorded with the verdict.")
def reject(store_dir: Path, reason: str) -> None:
    """Drop the store's candidate, recording why; restart serve after."""
    release = Store(store_dir).reject({"reason": reason, "by": "hand"})
    click.echo(f"candidate {release} rejected; restart serve to stop its trial")
