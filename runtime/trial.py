"""A candidate release on trial beside the current one (docs/shadow.md).

The store's DIR/candidate is served by the same process and pool as the current release: its models join the pool
under `candidate.<name>` (segments both releases share are one blob, mapped once and counted once in the budget), its
agents answer under the live agents' names. Two ways traffic reaches it:

- shadow: a sampled share of live requests is answered again by the candidate after the live answer has gone out,
  one at a time and only while the live model has nothing queued, and the two decisions are compared
  (runtime/decisions.py); disagreements go to the decision log;
- A/B: a share of conversations (sticky by X-Session-Id, else the request's `user`) is answered by the candidate.

After every comparison the rule of runtime/verdict.py judges each agent: a rejection drops the candidate (recorded in
the store with the evidence); when every compared agent passes, the candidate is promoted (with auto-promotion: it
becomes current in the store and in this process) or reported ready. A promoted release is watched: errors or p99
beyond the SLA roll the store and the process back to the previous release.
"""

from __future__ import annotations

import collections
import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from . import decision_log, verdict
from .bundle_format import AgentInfo, Manifest, ModelInfo
from .decisions import Answer, Comparison
from .errors import EdgepackError
from .stats import percentile
from .store import Store

PREFIX = "candidate."  # the candidate's models and adapters in the pool
LATENCY_WINDOW = 1000  # latencies kept per arm for the percentiles
MAX_SEEN = 50_000  # greedy requests remembered per agent, so a repeat is not counted as new evidence

RUNNING = ("shadow", "ab", "shadow+ab")  # modes in which the candidate takes traffic


def combine(current: Manifest, candidate: Manifest) -> tuple[Manifest, dict[str, AgentInfo]]:
    """One manifest for the pool (the current release's models and agents plus the candidate's models and adapters,
    renamed `candidate.<name>`) and the candidate's agent for each live agent name they share."""
    models = {m.name for m in current.models} | {a.name for a in current.adapters}
    renamed: list[ModelInfo] = []
    for model in candidate.models:
        name = _renamed(model.name)
        if name in models:
            raise EdgepackError(f"candidate model {model.name!r}: the current release already has a model {name!r}")
        renamed.append(msgspec.structs.replace(model, name=name))
    adapters = [msgspec.structs.replace(a, name=_renamed(a.name), base=_renamed(a.base)) for a in candidate.adapters]
    merged = msgspec.structs.replace(
        current, models=(*current.models, *renamed), adapters=(*current.adapters, *adapters),
        agents=current.agent_list(), blobs={**candidate.blobs, **current.blobs})
    live = {a.name for a in current.agent_list()}
    agents = {a.name: msgspec.structs.replace(a, model=_renamed(a.model),
                                              adapter=_renamed(a.adapter) if a.adapter else None)
              for a in candidate.agent_list() if a.name in live}
    if not agents:
        raise EdgepackError("the candidate shares no agent name with the current release: nothing to compare")
    return merged, agents


def _renamed(name: str) -> str:
    renamed = PREFIX + name
    if len(renamed) > 64:
        raise EdgepackError(f"candidate model or adapter name {name!r} is too long to serve beside the current one")
    return renamed


@dataclass
class _Arm:
    """Latencies (seconds) and outcomes of one arm's answers to live traffic."""

    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    requests: int = 0
    errors: int = 0

    def add(self, seconds: float | None, failed: bool) -> None:
        self.requests += 1
        self.errors += failed
        if seconds is not None and not failed:
            self.latencies.append(seconds)

    def percentiles(self) -> dict[str, float | None]:
        values = sorted(self.latencies)
        return {f"p{q}": percentile(values, q) if values else None for q in (50, 95, 99)}


@dataclass
class _Agreement:
    compared: int = 0
    disagreed: int = 0
    first_token_agreed: int = 0
    first_token_compared: int = 0


class Trial:
    """The candidate's state and the policy around it; thread-safe (the server records from its event loop and its
    worker threads)."""

    def __init__(self, store: Store, current: Manifest, candidate: Manifest, *, shadow_rate: float, ab_rate: float,
                 auto_promote: bool, log: decision_log.DecisionLog | None,
                 min_decisions: int = verdict.MIN_DECISIONS, tiers: dict[str, str | None] | None = None,
                 slas_ms: dict[str, int | None] | None = None, on_event: Callable[[str], None] = lambda line: None,
                 agent_rates: dict[str, float] | None = None, rng: random.Random | None = None) -> None:
        """`shadow_rate` for every agent but those in `agent_rates` (the candidate recipe's own shares)."""
        if not (0 <= shadow_rate <= 1 and 0 <= ab_rate <= 1):
            raise EdgepackError(f"shadow and A/B rates must be between 0% and 100%, got {shadow_rate:.0%} and "
                                f"{ab_rate:.0%}")
        self.store, self.current, self.candidate = store, current, candidate
        self.release = store.release_id("candidate")
        self.live_release = store.release_id("current")
        self.manifest, self.agents = combine(current, candidate)
        self.shadow_rate, self.ab_rate, self.auto_promote = shadow_rate, ab_rate, auto_promote
        self.rates = {name: (agent_rates or {}).get(name, shadow_rate) for name in self.agents}
        self.log, self.min_decisions = log, min_decisions
        self.tiers = tiers or {}
        self.slas_ms = slas_ms or {}
        self.mode = "+".join(m for m, rate in (("shadow", max(self.rates.values(), default=0)), ("ab", ab_rate))
                             if rate) or "idle"
        self.reason = ""
        self.agreement: dict[str, _Agreement] = {name: _Agreement() for name in self.agents}
        self.verdicts: dict[str, verdict.ShadowVerdict] = {}
        self.arms = {"live": _Arm(), "candidate": _Arm(), "shadow": _Arm()}  # shadow: the candidate's replays
        self.promoted_arm = _Arm()  # after promotion: the new release's live answers, for the rollback rule
        self.shadow_results: collections.Counter = collections.Counter()  # (agent, result)
        self._on_event = on_event
        self._on_switch: Callable[[bool], None] = lambda candidate_live: None
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._shadow_busy = False
        self._seen: dict[str, set[str]] = {name: set() for name in self.agents}

    def set_switch(self, on_switch: Callable[[bool], None]) -> None:
        """`on_switch(True)` is called when the candidate is promoted (its agents answer live from then on),
        `on_switch(False)` when a promoted release is rolled back."""
        self._on_switch = on_switch

    # ---- routing ----

    @property
    def running(self) -> bool:
        return self.mode in RUNNING

    def ab_candidate(self, agent: str, session: str | None) -> bool:
        """Whether this A/B conversation goes to the candidate: a stable hash of the session key, so a conversation
        stays on one arm; requests without a key are assigned at random."""
        if not self.running or not self.ab_rate or agent not in self.agents:
            return False
        if session is None:
            return self._rng.random() < self.ab_rate
        bucket = int.from_bytes(hashlib.sha256(session.encode()).digest()[:8], "big") / 2 ** 64
        return bucket < self.ab_rate

    def begin_shadow(self, agent: str, live_busy: bool, repeat_key: str | None = None) -> str:
        """Whether to replay this live request on the candidate now: "run" (the caller must call end_shadow()
        after), "skipped" (sampled, but another replay runs or the live model has requests waiting: the live side
        comes first), "repeat" (a greedy request identical to one already compared, `repeat_key` saying which: both
        releases would answer it as before, so it is no new evidence) or "" (not sampled: the shadow rate)."""
        rate = self.rates.get(agent, 0)
        if not self.running or not rate:
            return ""
        if self._rng.random() >= rate:
            return ""
        with self._lock:
            seen = self._seen[agent]
            if repeat_key is not None and repeat_key in seen:
                self.shadow_results[agent, "repeat"] += 1
                return "repeat"
            if self._shadow_busy or live_busy:
                self.shadow_results[agent, "skipped"] += 1
                return "skipped"
            if repeat_key is not None and len(seen) < MAX_SEEN:
                seen.add(repeat_key)
            self._shadow_busy = True
            return "run"

    def end_shadow(self) -> None:
        with self._lock:
            self._shadow_busy = False

    # ---- evidence ----

    def arm_answered(self, arm: str, seconds: float | None, failed: bool) -> None:
        with self._lock:
            self.arms[arm].add(seconds, failed)
            if arm == "live" and self.mode == "promoted":
                self.promoted_arm.add(seconds, failed)
        if arm == "live" and self.mode == "promoted":
            self._watch_promoted()

    def shadow_failed(self, agent: str, message: str, fatal: bool) -> None:
        """A replay that did not produce an answer; `fatal` (the candidate cannot load at all) ends the trial."""
        with self._lock:
            self.shadow_results[agent, "error"] += 1
        if fatal:
            self._finish("failed", f"the candidate cannot run here: {message}", reject=False)

    def compared(self, agent: str, request_id: str, live: Answer, candidate: Answer,
                 comparison: Comparison) -> None:
        with self._lock:
            counts = self.agreement[agent]
            counts.compared += 1
            counts.disagreed += not comparison.agrees
            if comparison.first_token is not None:
                counts.first_token_compared += 1
                counts.first_token_agreed += comparison.first_token
            self.shadow_results[agent, "agree" if comparison.agrees else "disagree"] += 1
            judged = verdict.shadow_verdict(counts.compared, counts.disagreed, self.tiers.get(agent),
                                            min_decisions=self.min_decisions)
            self.verdicts[agent] = judged
        if not comparison.agrees and self.log is not None:
            self.log.append(decision_log.record(agent, request_id, live, candidate, comparison,
                                                live_release=self.live_release, candidate_release=self.release))
        self._decide()

    def agreement_ratio(self, agent: str) -> float | None:
        counts = self.agreement.get(agent)
        if not counts or not counts.compared:
            return None
        return 1 - counts.disagreed / counts.compared

    # ---- verdicts ----

    def _decide(self) -> None:
        with self._lock:
            if not self.running:
                return
            judged = dict(self.verdicts)
        rejected = {a: v for a, v in judged.items() if v.decision == "reject"}
        if rejected:
            agent, why = next(iter(rejected.items()))
            self._finish("rejected", f"agent {agent}: {why.reason}", reject=True)
            return
        compared = [a for a, c in self.agreement.items() if c.compared]
        if compared and all(judged.get(a) and judged[a].decision == "promote" for a in compared):
            reason = "; ".join(f"agent {a}: {judged[a].reason}" for a in compared)
            if self.auto_promote:
                self._finish("promoted", reason, reject=False, promote=True)
            else:
                self._finish("ready", reason, reject=False)

    def _finish(self, mode: str, reason: str, *, reject: bool, promote: bool = False) -> None:
        with self._lock:
            if not self.running:
                return
            self.mode, self.reason = mode, reason
        evidence = self.evidence()
        try:
            if reject:
                self.store.reject(evidence)
            elif promote:
                self.store.promote(evidence)
        except EdgepackError as exc:  # the store is busy or gone: the decision stands in this process
            self._on_event(f"candidate {self.release}: could not record the verdict in the store: {exc}")
        if promote:
            self._on_switch(True)
        self._on_event(f"candidate {self.release} {mode}: {reason}")

    def _watch_promoted(self) -> None:
        with self._lock:
            arm = self.promoted_arm
            p99 = arm.percentiles()["p99"]
            slas = [s for s in self.slas_ms.values() if s]
            judged = verdict.trial_verdict(arm.requests, arm.errors, p99 * 1000 if p99 is not None else None,
                                           min(slas) if slas else None)
            if judged.decision == "undecided":
                return
            self.mode = "rolled back" if judged.decision == "rollback" else "promoted, healthy"
            self.reason = judged.reason
        if judged.decision == "rollback":
            self._on_switch(False)
            try:
                self.store.rollback()
            except EdgepackError as exc:
                self._on_event(f"release {self.release}: could not roll the store back: {exc}")
        self._on_event(f"release {self.release} {self.mode}: {judged.reason}")

    def evidence(self) -> dict:
        """What the verdict rests on, as recorded in the store and shown by /status."""
        with self._lock:
            return {
                "mode": self.mode, "reason": self.reason, "shadow_rates": self.rates, "ab_rate": self.ab_rate,
                "agents": {a: {"compared": c.compared, "disagreed": c.disagreed,
                               "first_token_agreement": (c.first_token_agreed / c.first_token_compared
                                                         if c.first_token_compared else None),
                               "tier": self.tiers.get(a) or verdict.DEFAULT_TIER,
                               "decision": self.verdicts[a].decision if a in self.verdicts else "undecided",
                               "interval": [self.verdicts[a].low, self.verdicts[a].high] if a in self.verdicts
                               else None}
                           for a, c in self.agreement.items()},
                "arms": {name: {"requests": arm.requests, "errors": arm.errors, **arm.percentiles()}
                         for name, arm in self.arms.items()},
                "shadow": {f"{a}/{r}": n for (a, r), n in sorted(self.shadow_results.items())},
            }
