"""The promotion and rollback rules: Wilson intervals checked against published values and the textbook formula."""

from __future__ import annotations

import math

import pytest

from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.verdict import (
    MIN_DECISIONS,
    TIER_LIMITS,
    shadow_verdict,
    tier_limit,
    trial_verdict,
    wilson_interval,
)

# Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven methods",
# Statistics in Medicine 17 (1998), Table II, method 3 (Wilson score interval without continuity correction).
NEWCOMBE_1998 = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611)),
                 ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize(("counts", "published"), NEWCOMBE_1998)
def test_wilson_interval_matches_published_values(counts, published):
    low, high = wilson_interval(*counts)
    assert round(low, 4) == published[0] and round(high, 4) == published[1]


def test_wilson_interval_is_the_root_pair_of_the_score_equation():
    """The bounds are the two p0 where |p - p0| = z sqrt(p0 (1 - p0) / n): solve that quadratic independently."""
    z = 1.959963984540054
    for k, n in [(3, 10), (7, 1000), (50, 60), (1, 2)]:
        p = k / n
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p  # (p - p0)^2 n = z^2 p0 (1 - p0)
        roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
        assert wilson_interval(k, n) == pytest.approx(tuple(roots), abs=1e-12)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing compared proves nothing
    low, high = wilson_interval(0, 1)
    assert low == 0.0 and high == pytest.approx(1.959963984540054**2 / (1 + 1.959963984540054**2))
    low, high = wilson_interval(5, 5)  # all disagree: the upper bound is 1, the lower well above 0
    assert high == 1.0 and low == pytest.approx(5 / (5 + 1.959963984540054**2))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_no_verdict_before_the_minimum_even_when_everything_disagrees():
    verdict = shadow_verdict(MIN_DECISIONS - 1, MIN_DECISIONS - 1, "general")
    assert verdict.decision == "undecided" and "fewer than 200" in verdict.reason
    assert shadow_verdict(0, 0, "critical").decision == "undecided"
    assert shadow_verdict(10, 10, "general", min_decisions=10).decision == "reject"  # all disagree


def test_promotion_needs_the_upper_bound_under_the_tier():
    # 0 of n: high = z^2 / (n + z^2) < L from n > z^2 (1/L - 1): 764.4 for critical, 188.2 for general
    assert shadow_verdict(764, 0, "critical").decision == "undecided"
    assert shadow_verdict(765, 0, "critical").decision == "promote"
    assert shadow_verdict(188, 0, "general", min_decisions=1).decision == "undecided"
    assert shadow_verdict(189, 0, "general", min_decisions=1).decision == "promote"
    verdict = shadow_verdict(1000, 2, "general")  # 0.2%: [0.05%, 0.73%] < 2%
    assert verdict.decision == "promote" and verdict.high < 0.02 and "below the general tier's 2.0%" in verdict.reason


def test_rejection_needs_the_lower_bound_over_the_tier():
    verdict = shadow_verdict(300, 30, "general")  # 10%: [7.1%, 13.9%] > 2%
    assert verdict.decision == "reject" and verdict.low > 0.02 and "above" in verdict.reason
    assert shadow_verdict(300, 30, "low-risk").decision == "reject"
    assert shadow_verdict(300, 6, "general").decision == "undecided"  # 2.0% exactly: [0.9%, 4.3%] straddles it


def test_an_agent_without_a_tier_is_held_to_general_and_unknown_tiers_are_refused():
    assert tier_limit(None) == TIER_LIMITS["general"] == 0.02
    assert shadow_verdict(1000, 2, None).limit == 0.02
    with pytest.raises(EdgepackError, match="unknown tolerance tier 'strict'"):
        tier_limit("strict")


def test_trial_rolls_back_on_errors_or_latency():
    assert trial_verdict(99, 50, None, None).decision == "undecided"
    assert trial_verdict(200, 2, 900, 1000).decision == "healthy"  # 1.0% is not above 1%
    rollback = trial_verdict(200, 3, 900, 1000)
    assert rollback.decision == "rollback" and "1.50%" in rollback.reason
    slow = trial_verdict(200, 0, 1501, 1000)
    assert slow.decision == "rollback" and "p99 1501 ms above 150% of the 1000 ms SLA" in slow.reason
    assert trial_verdict(200, 0, 1500, 1000).decision == "healthy"
    assert trial_verdict(200, 0, 99_999, None).decision == "healthy"  # no SLA: only errors count
