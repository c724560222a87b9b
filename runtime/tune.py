"""The sweep behind `edgepack tune`: measure threads x slots x batch size on the device and choose the best.

The command is runtime/tune_command.py; the choice is kept in the release's local.json (runtime/local_config.py).
docs/tuning.md has the measurement and the rule.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import hardware
from .bundle_format import Manifest
from .engine import Engine, Sampling
from .errors import EdgepackError
from .memory import HEADROOM, context_bytes, format_mib, process_memory
from .scheduler import BatchScheduler, Request, run_together
from .serve_config import latency_targets, repacked_models
from .stats import percentile
from .store import Store

DEFAULT_SLOTS = (1, 2, 4)
DEFAULT_BATCHES = (128, 512)
PROMPT_TOKENS = 96
_PROMPT_TEXT = (
    "You are the assistant of a small field robot. Read the sensor report below and decide what to do next. "
    "Battery at 41 percent, temperature 23 degrees, the left wheel reports a slip of four percent, the camera "
    "sees an open gate ahead and a person walking a dog on the path to the right. The task is to reach the "
    "charging station behind the barn before sunset while keeping a safe distance from people and animals."
)
_RUN_TIMEOUT_S = 600.0


@dataclass(frozen=True, order=True)
class Candidate:
    threads: int
    slots: int
    n_batch: int


@dataclass(frozen=True)
class Measurement:
    """One model under one candidate: medians over --runs runs of `slots` concurrent requests."""

    model: str
    candidate: Candidate
    tokens_per_second: float  # all slots together, median over runs
    spread: float  # half the range of tokens_per_second over runs
    ttft_ms: float  # median time to first token over every request (submit -> first token)
    tpot_ms: float  # median time per output token after the first
    tpot_p95_ms: float
    latency_p95_ms: float  # submit -> last token: one whole answer of --tokens tokens
    sla_ms: int | None  # the strictest latency_sla_ms of the model's agents

    @property
    def meets_sla(self) -> bool:
        return self.sla_ms is None or self.latency_p95_ms <= self.sla_ms

    def row(self) -> dict[str, Any]:
        return {"model": self.model, **asdict(self.candidate),
                **{k: round(v, 3) for k, v in asdict(self).items() if isinstance(v, float)},
                "sla_ms": self.sla_ms}


def default_thread_candidates() -> list[int]:
    """1, one per physical performance core, and every CPU this process may use."""
    return sorted({1, hardware.default_threads(), len(os.sched_getaffinity(0))})


def grid(threads: list[int], slots: list[int], batches: list[int]) -> list[Candidate]:
    return [Candidate(t, s, b) for t in threads for s in slots for b in batches]


def choose(measurements: list[Measurement]) -> tuple[Candidate, str]:
    """The best candidate and why: among candidates whose p95 answer latency meets every model's target,
    the highest throughput (each model's tok/s relative to its best, averaged over the models); when none
    meets the targets, the one that misses them by the least."""
    by_candidate: dict[Candidate, list[Measurement]] = {}
    for m in measurements:
        by_candidate.setdefault(m.candidate, []).append(m)
    best_rate = {m.model: max(x.tokens_per_second for x in measurements if x.model == m.model) for m in measurements}

    def throughput(c: Candidate) -> float:
        return statistics.fmean(m.tokens_per_second / best_rate[m.model] if best_rate[m.model] else 0.0
                                for m in by_candidate[c])

    if not any(m.sla_ms for m in measurements):
        return max(by_candidate, key=throughput), "highest throughput (no agent has a latency target)"
    eligible = [c for c, ms in by_candidate.items() if all(m.meets_sla for m in ms)]
    if eligible:
        return max(eligible, key=throughput), "highest throughput within the agents' latency targets (p95)"

    def overshoot(c: Candidate) -> float:
        return max(m.latency_p95_ms / m.sla_ms for m in by_candidate[c] if m.sla_ms)

    return min(by_candidate, key=overshoot), "no configuration meets the latency targets: the closest to them"


def prompt_threads(measurements: list[Measurement], best: Candidate) -> int:
    """The thread count whose prompt processing (time to first token, with best's slots and batch size) was the
    fastest: prompts are compute-bound and may prefer another count than generation."""
    ttft: dict[int, list[float]] = {}
    for m in measurements:
        if (m.candidate.slots, m.candidate.n_batch) == (best.slots, best.n_batch):
            ttft.setdefault(m.candidate.threads, []).append(m.ttft_ms)
    return min(ttft, key=lambda threads: (statistics.fmean(ttft[threads]), threads != best.threads))


def benchmark_prompt(engine: Engine) -> list[int]:
    """A fixed prompt of exactly PROMPT_TOKENS tokens (the text repeated or cut), the same for every run."""
    tokens = engine.tokenize(_PROMPT_TEXT)
    body = engine.tokenize(_PROMPT_TEXT, add_special=False) or tokens
    while len(tokens) < PROMPT_TOKENS:
        tokens += body
    return tokens[:PROMPT_TOKENS]


@dataclass(frozen=True)
class _Run:
    tokens_per_second: float
    ttft: list[float]
    tpot: list[float]
    latency: list[float]


def run_concurrent(scheduler: BatchScheduler, prompt: list[int], requests: int, tokens: int) -> _Run:
    """Submit `requests` greedy generations of `tokens` tokens at once and wait for all of them."""
    sampling = Sampling(tokens, temperature=0, ignore_eos=True)
    started = time.monotonic()
    submitted = [Request(list(prompt), sampling, lambda item: None) for _ in range(requests)]
    try:
        run_together(scheduler, submitted, _RUN_TIMEOUT_S)
    except EdgepackError as exc:
        raise EdgepackError(f"tune: {exc}") from None
    results = [r.result for r in submitted]
    wall = max(g.finished_at for g in results) - started
    return _Run(
        tokens_per_second=sum(g.completion_tokens for g in results) / wall,
        ttft=[g.first_token_at - g.started_at for g in results],
        tpot=[(g.finished_at - g.first_token_at) / (g.completion_tokens - 1) for g in results
              if g.completion_tokens > 1],
        latency=[g.finished_at - g.started_at for g in results],
    )


def measure(engine: Engine, prompt: list[int], tokens: int, runs: int) -> list[_Run]:
    """One warm-up run (page faults, buffer allocation), then `runs` measured runs with every slot busy."""
    run_cold(engine, prompt, min(tokens, 4))
    return [run_cold(engine, prompt, tokens) for _ in range(runs)]


def run_cold(engine: Engine, prompt: list[int], tokens: int) -> _Run:
    """One run on a fresh scheduler: its prefix cache is empty, so every prompt is processed in full."""
    scheduler = BatchScheduler(engine, max_queue=engine.slots)
    try:
        return run_concurrent(scheduler, prompt, engine.slots, tokens)
    finally:
        scheduler.stop()


def summarize(model: str, candidate: Candidate, runs: list[_Run], sla_ms: int | None) -> Measurement:
    rates = [r.tokens_per_second for r in runs]
    tpot = [x for r in runs for x in r.tpot] or [0.0]
    return Measurement(
        model=model, candidate=candidate,
        tokens_per_second=statistics.median(rates),
        spread=(max(rates) - min(rates)) / 2,
        ttft_ms=1000 * statistics.median(x for r in runs for x in r.ttft),
        tpot_ms=1000 * statistics.median(tpot),
        tpot_p95_ms=1000 * percentile(tpot, 95),
        latency_p95_ms=1000 * percentile((x for r in runs for x in r.latency), 95),
        sla_ms=sla_ms,
    )


def sweep(store: Store, manifest: Manifest, models: list[str], candidates: list[Candidate], *, tokens: int,
          runs: int, n_ctx: int, progress: Callable[[Measurement], None] = lambda m: None,
          budget: int | None = None, skipped: Callable[[str], None] = lambda message: None) -> list[Measurement]:
    """Measure every model under every candidate, one engine per (model, candidate). With a memory budget
    (bytes), a candidate whose context would not fit it is skipped, as `serve` would not allocate it."""

    repack = repacked_models(manifest, "auto")  # as `serve` loads them
    targets = latency_targets(manifest.agent_list())
    base = process_memory()[0]
    results = []
    for name in models:
        info = manifest.model(name)
        paths = store.segment_paths(manifest, name)
        weights = sum(manifest.blobs[d].size for d in info.segments)
        for candidate in candidates:
            fit = _fit_within(budget, base + weights, name, candidate, n_ctx)
            try:
                engine = Engine(paths, name=name, n_ctx=n_ctx, n_batch=candidate.n_batch, threads=candidate.threads,
                                chat_template=info.chat_template, repack=name in repack, slots=candidate.slots,
                                fit=fit)
            except _DoesNotFit as exc:
                skipped(str(exc))
                continue
            try:
                prompt = benchmark_prompt(engine)
                engine.check_fits(len(prompt), tokens)
                result = summarize(name, candidate, measure(engine, prompt, tokens, runs), targets.get(name))
            finally:
                engine.close()
            progress(result)
            results.append(result)
    return results


class _DoesNotFit(EdgepackError):
    """A candidate whose context would not fit the memory budget."""


def _fit_within(budget: int | None, used: int, name: str, candidate: Candidate, n_ctx: int) -> Callable:
    """Engine's `fit`: the context as asked, or _DoesNotFit when it and `used` (process + weights) exceed budget."""
    def fit(shape) -> int:  # noqa: ANN001 - a memory.ModelShape
        need = used + HEADROOM + context_bytes(shape, n_ctx, candidate.slots, "f16", min(candidate.n_batch, 512))
        if budget is not None and need > budget:
            raise _DoesNotFit(f"{name}: {candidate.slots} slots x {n_ctx} tokens need about {format_mib(need)}, "
                              f"over the memory budget of {format_mib(budget)}: skipped")
        return n_ctx

    return fit
