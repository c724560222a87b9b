"""Tolerance tiers: how much an agent's decisions may change before a build is refused.

Degradation is 1 - top-1 agreement with the reference on the evaluation text, and, when a task file
is given, 1 - the share of agent tasks answered exactly as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PackagerError
from .evaluate import TaskMetrics, TextMetrics

TIERS = {"critical": 0.005, "general": 0.02, "low-risk": 0.05}


@dataclass(frozen=True)
class Verdict:
    tier: str
    passed: bool
    degradation: float
    message: str


def tolerance(tier: str) -> float:
    if tier not in TIERS:
        raise PackagerError(f"unknown tolerance tier {tier!r}: choose {', '.join(TIERS)}")
    return TIERS[tier]


def judge(tier: str, text: TextMetrics, tasks: TaskMetrics | None = None) -> Verdict:
    limit = tolerance(tier)
    measures = {"top-1 disagreement": 1 - text.top1_agreement}
    if tasks is not None:
        measures["task answers changed"] = 1 - tasks.exact_match
    worst_name, worst = max(measures.items(), key=lambda item: item[1])
    passed = worst < limit
    verb = "passes" if passed else "exceeds"
    message = f"{verb} the {tier} tier (< {limit:.1%}): {worst_name} {worst:.2%}"
    if not passed:
        message += " — choose a larger type, a larger --target-size, less pruning, or a looser --tier"
    return Verdict(tier, passed, worst, message)
