"""The statistical rules that decide a candidate release's fate, and a freshly promoted release's (docs/shadow.md).

Pure functions over counts: the server keeps the counts, these say what they prove. A candidate is judged on the
share of compared decisions it changed, against its agent's tolerance tier; a promoted release on its live errors
and p99 latency, against the agent's SLA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import EdgepackError

# The largest share of decisions a compressed agent may change, per tolerance tier (bundle_format.Tier).
# The build's quality gate (packager/gates.py) holds a model to the same limits offline.
TIER_LIMITS = {"critical": 0.005, "general": 0.02, "low-risk": 0.05}
DEFAULT_TIER = "general"  # an agent that names no tier, as recipes default it

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal quantile 0.975: a two-sided 95% interval
MIN_DECISIONS = 200  # compared decisions per agent before any verdict
MIN_TRIAL_REQUESTS = 100  # live requests of a promoted release before any verdict
MAX_ERROR_RATE = 0.01
SLA_FACTOR = 1.5

ShadowDecision = Literal["promote", "reject", "undecided"]
TrialDecision = Literal["rollback", "healthy", "undecided"]


@dataclass(frozen=True)
class ShadowVerdict:
    decision: ShadowDecision
    compared: int
    disagreed: int
    low: float  # the Wilson interval on the disagreement rate
    high: float
    limit: float  # the tier's limit on the disagreement rate
    reason: str


@dataclass(frozen=True)
class TrialVerdict:
    decision: TrialDecision
    reason: str


def tier_limit(tier: str | None) -> float:
    """The tier's limit on the share of changed decisions; an agent without a tier is held to DEFAULT_TIER."""
    name = tier or DEFAULT_TIER
    if name not in TIER_LIMITS:
        raise EdgepackError(f"unknown tolerance tier {name!r}: choose {', '.join(TIER_LIMITS)}")
    return TIER_LIMITS[name]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion of `successes` in `n` trials (Wilson, 1927):

        centre ± half,  centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)

    with p = successes/n. Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a width of 0
    at p = 0 or 1, so it is usable from the first few trials. n = 0 proves nothing: (0, 1)."""
    if not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # the bounds are exact at the ends (0 successes: low = 0), whatever the rounding
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def shadow_verdict(compared: int, disagreed: int, tier: str | None, *, min_decisions: int = MIN_DECISIONS,
                   z: float = Z_95) -> ShadowVerdict:
    """A candidate's verdict from its agent's shadow counts: `disagreed` of `compared` decisions changed.

    With fewer than `min_decisions` compared: undecided. Else, with [low, high] the Wilson interval (95% by
    default) on the disagreement rate and L the tier's limit: high < L -> "promote" (the rate is below the limit
    with 95% confidence; the caller reports "ready" instead where auto-promotion is off); low > L -> "reject" (above
    it with 95% confidence); else undecided: more decisions are needed. The further the true rate is from L, the
    fewer decisions a verdict takes; a candidate right at L mostly stays undecided. The server asks again after
    every decision, so the chance of a wrong verdict over a whole run is above the 5% of one look: min_decisions
    keeps the early, noisy looks out (docs/shadow.md)."""
    if not 0 <= disagreed <= compared:
        raise ValueError(f"expected 0 <= disagreed <= compared, got {disagreed} of {compared}")
    limit = tier_limit(tier)
    low, high = wilson_interval(disagreed, compared, z)
    interval = f"{disagreed}/{compared} decisions changed, {_confidence(z)} interval [{low:.2%}, {high:.2%}]"
    if compared < min_decisions:
        decision: ShadowDecision = "undecided"
        reason = f"{interval}: fewer than {min_decisions} compared"
    elif high < limit:
        decision, reason = "promote", f"{interval} below the {tier or DEFAULT_TIER} tier's {limit:.1%}"
    elif low > limit:
        decision, reason = "reject", f"{interval} above the {tier or DEFAULT_TIER} tier's {limit:.1%}"
    else:
        decision, reason = "undecided", f"{interval} straddles the {tier or DEFAULT_TIER} tier's {limit:.1%}"
    return ShadowVerdict(decision, compared, disagreed, low, high, limit, reason)


def trial_verdict(requests: int, errors: int, p99_ms: float | None, sla_ms: float | None, *,
                  min_requests: int = MIN_TRIAL_REQUESTS, max_error_rate: float = MAX_ERROR_RATE,
                  sla_factor: float = SLA_FACTOR) -> TrialVerdict:
    """A freshly promoted release's verdict from its live figures since promotion.

    With fewer than `min_requests` answered: undecided. Else "rollback" when errors/requests > max_error_rate (1%)
    or, for an agent with a latency SLA, p99 > sla_factor (150%) x the SLA; else "healthy". These are the alert
    thresholds (runtime/alerts.py), applied to the point estimates: a fresh release that breaks them is not given
    the benefit of the doubt, the previous release is still there to go back to."""
    if not 0 <= errors <= requests:
        raise ValueError(f"expected 0 <= errors <= requests, got {errors} of {requests}")
    if requests < min_requests:
        return TrialVerdict("undecided", f"{requests} requests: fewer than {min_requests}")
    rate = errors / requests
    if rate > max_error_rate:
        return TrialVerdict("rollback", f"error rate {rate:.2%} ({errors}/{requests}) above {max_error_rate:.0%}")
    if sla_ms is not None and p99_ms is not None and p99_ms > sla_factor * sla_ms:
        return TrialVerdict("rollback", f"p99 {p99_ms:.0f} ms above {sla_factor:.0%} of the {sla_ms:.0f} ms SLA")
    reason = f"error rate {rate:.2%} over {requests} requests"
    if sla_ms is not None and p99_ms is not None:
        reason += f", p99 {p99_ms:.0f} ms within {sla_factor:.0%} of the {sla_ms:.0f} ms SLA"
    return TrialVerdict("healthy", reason)


def _confidence(z: float) -> str:
    """The two-sided confidence of a normal quantile z, for messages: 1.96 -> '95%'."""
    return f"{math.erf(z / math.sqrt(2)):.0%}"
