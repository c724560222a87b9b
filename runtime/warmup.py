"""Warm-up of a freshly loaded model, in stages, and the agents' warm states (saved system-prompt KV).

Stage 1, singles: a few one-at-a-time generations (the first is the cold one: it touches the weights
and builds llama.cpp's buffers). Stage 2, agent prefixes: the KV state of each agent's system prompt is
loaded from the release's warm/ folder when a matching snapshot exists, else computed and saved there,
one agent per slot, so the first real request of an agent does not process its system prompt again.
Stage 3 (after the scheduler starts, see `concurrent_stage`): the agents' prompts as one concurrent batch.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bundle_format import AgentInfo, Manifest
from .engine import Engine, Generation, Sampling
from .errors import EdgepackError
from .scheduler import BatchScheduler, Prefix, Request, SlotCache, run_together

SINGLE_RUNS = 3
WARMUP_STAGES = frozenset({"singles", "batch"})  # the agents' prefixes are the warm state (--no-warm-state)
_PROBES = ("a", "Z9")  # two user messages: the agent's prefix is what their renderings share


@dataclass
class WarmupReport:
    model: str
    singles: list[float] = field(default_factory=list)  # seconds per generation; [0] is the cold one
    prefixes: dict[str, tuple[int, str, float]] = field(default_factory=dict)  # agent -> tokens, how, seconds
    concurrent: list[float] = field(default_factory=list)  # time to first token in the concurrent batch

    @property
    def cold(self) -> float | None:
        return self.singles[0] if self.singles else None

    @property
    def warm(self) -> float | None:
        return statistics.median(self.singles[1:]) if len(self.singles) > 1 else None

    def summary(self) -> str:
        parts = [f"{self.model}: cold {_ms(self.cold)}, warm {_ms(self.warm)}"]
        for agent, (tokens, how, seconds) in self.prefixes.items():
            parts.append(f"{agent} prefix {tokens} tokens {how} in {_ms(seconds)}")
        if self.concurrent:
            parts.append(f"{len(self.concurrent)} concurrent: TTFT median {_ms(statistics.median(self.concurrent))}")
        return "; ".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def singles_stage(engine: Engine, report: WarmupReport, runs: int = SINGLE_RUNS) -> None:
    prompt = engine.tokenize("Hello")
    for _ in range(runs):
        started = time.perf_counter()
        for _piece in engine.generate(prompt, Sampling(max_tokens=2, temperature=0, ignore_eos=True), Generation()):
            pass
        report.singles.append(time.perf_counter() - started)


def agent_prefix(engine: Engine, agent: AgentInfo) -> list[int]:
    """The tokens every chat request of the agent starts with (its system prompt, rendered)."""
    if not agent.system_prompt or engine.chat_template is None:
        return []
    renders = [engine.tokenize(engine.format_chat([("system", agent.system_prompt), ("user", probe)]))
               for probe in _PROBES]
    common = 0
    for a, b in zip(*renders, strict=False):
        if a != b:
            break
        common += 1
    return renders[0][:common]


def snapshot_path(folder: Path, manifest: Manifest, agent: AgentInfo, kv_type: str, tokens: list[int]) -> Path:
    """Named by everything the state depends on, so a stale snapshot is never picked up."""
    parts = [str(d) for d in manifest.model(agent.model).segments]
    if agent.adapter:
        adapter = manifest.adapter(agent.adapter)
        parts += [str(adapter.digest), repr(adapter.scale)]
    parts += [kv_type, ",".join(map(str, tokens))]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    return folder / f"{agent.name}-{digest}.state"


def prefix_stage(engine: Engine, manifest: Manifest, agents: list[AgentInfo], folder: Path | None,
                 kv_type: str, scales: dict[str, float], report: WarmupReport) -> tuple[SlotCache, list[Prefix]]:
    """Put each agent's system-prompt KV into a slot of its own while there are slots (the last slot takes
    the rest in turn), and keep a copy of each to restore into any slot later (also because a sliding-window
    model forgets a slot's prefix once a request has gone past the window)."""
    cache: SlotCache = {}
    prefixes: list[Prefix] = []
    seen: set[tuple] = set()
    for agent in agents:
        tokens = agent_prefix(engine, agent)
        lora = (agent.adapter, scales.get(agent.adapter, 1.0)) if agent.adapter else None
        if len(tokens) < 2 or (lora, tuple(tokens)) in seen:
            continue
        seen.add((lora, tuple(tokens)))
        seq_id = min(len(prefixes), engine.slots - 1)
        started = time.perf_counter()
        path = snapshot_path(folder, manifest, agent, kv_type, tokens) if folder is not None else None
        loaded = engine.load_slot(seq_id, path, len(tokens)) if path is not None and path.is_file() else None
        if loaded == tokens:
            how = "loaded"
        else:
            engine.clear_slot(seq_id)
            engine.set_adapter(lora)
            engine.prefill(seq_id, tokens)
            how = "computed"
            if path is not None:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    engine.save_slot(seq_id, path, tokens)
                    how = "computed and saved"
                except (OSError, EdgepackError):
                    how = "computed (not saved: the store is read-only)"
        cache[seq_id] = (lora, tokens)
        prefixes.append(Prefix(lora, tokens, engine.slot_state(seq_id)))
        report.prefixes[agent.name] = (len(tokens), how, time.perf_counter() - started)
    engine.set_adapter(None)
    return cache, prefixes


def concurrent_stage(scheduler: BatchScheduler, agents: list[AgentInfo], scales: dict[str, float],
                     report: WarmupReport, timeout: float = 120.0) -> None:
    """One request per slot at once (the agents' prompts, else a plain one), through the scheduler."""
    engine = scheduler.engine
    chosen = (agents or [AgentInfo(name=engine.name, model=engine.name)])[: engine.slots]
    requests = []
    for agent in chosen:
        messages = ([("system", agent.system_prompt)] if agent.system_prompt else []) + [("user", "Hello")]
        text = engine.format_chat(messages) if engine.chat_template else "Hello"
        lora = (agent.adapter, scales.get(agent.adapter, 1.0)) if agent.adapter else None
        requests.append(Request(engine.tokenize(text), Sampling(max_tokens=2, temperature=0, ignore_eos=True),
                                lambda item: None, lora, warmup=True))
    started = time.monotonic()
    try:
        run_together(scheduler, requests, timeout)
    except EdgepackError as exc:
        raise EdgepackError(f"warm-up of {engine.name!r}: the concurrent batch failed: {exc}") from None
    report.concurrent = [r.result.first_token_at - started for r in requests if r.result.first_token_at]
