"""`edgepack tune`: measure threads x slots x batch size on the device itself and keep the best for `serve`.

The choice is written next to the release's manifest (DIR/releases/<id>/local.json), so it follows a
rollback and a new release starts from the defaults again. docs/tuning.md has the measurement and the rule.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import hardware
from .bundle_format import Manifest
from .errors import EdgepackError
from .files import replace_atomically
from .store import Store

if TYPE_CHECKING:  # imported where used: registering the command must not load llama.cpp
    from .engine import Engine
    from .scheduler import BatchScheduler

LOCAL_CONFIG = "local.json"
LOCAL_CONFIG_FORMAT = 1
MAX_LOCAL_CONFIG_BYTES = 1 << 20
# n_batch never below the most slots: the scheduler puts one token of every generating slot in a batch.
LIMITS = {"threads": (1, 1024), "slots": (1, 64), "n_batch": (64, 16384), "threads_batch": (1, 1024)}
_KNOWN_KEYS = {"format", "measured", *LIMITS}

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


# ---- the local config file -------------------------------------------------------------------------------

def local_config_path(store: Store, release_id: str | None = None) -> Path:
    """DIR/releases/<id>/local.json of the given release (default: the current one)."""
    release = release_id or store.release_id("current")
    if release is None:
        raise EdgepackError(f"store {store.root}: no current release (run `edgepack install` first)")
    release_dir = store.releases / release
    if not release_dir.is_dir():
        raise EdgepackError(f"store {store.root}: release {release} does not exist")
    return release_dir / LOCAL_CONFIG


def read_local_config(store: Store, release_id: str | None = None) -> dict[str, int]:
    """The tuned {"threads", "slots", "n_batch"} (any subset) of a release; {} when it has no local.json.

    Anything else in the file's place (a link, garbage, wrong types or ranges) is refused, never ignored."""
    path = local_config_path(store, release_id)
    data = _read_regular_file(path)
    return {} if data is None else parse_local_config(data, str(path))


def parse_local_config(data: bytes, where: str) -> dict[str, int]:
    hint = "delete it or re-run `edgepack tune`"
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EdgepackError(f"{where}: not valid JSON ({_one_line(exc)}); {hint}") from None
    if not isinstance(doc, dict):
        raise EdgepackError(f"{where}: expected a JSON object, got {type(doc).__name__}; {hint}")
    unknown = sorted(set(doc) - _KNOWN_KEYS)
    if unknown:
        raise EdgepackError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KNOWN_KEYS))}); {hint}")
    if doc.get("format", LOCAL_CONFIG_FORMAT) != LOCAL_CONFIG_FORMAT:
        raise EdgepackError(f"{where}: format {doc['format']!r} is not {LOCAL_CONFIG_FORMAT}; {hint}")
    if not isinstance(doc.get("measured", {}), dict):
        raise EdgepackError(f"{where}: 'measured' must be an object; {hint}")
    values = {}
    for key, (low, high) in LIMITS.items():
        if key not in doc:
            continue
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise EdgepackError(f"{where}: {key!r} must be an integer from {low} to {high}, got {value!r:.40}; {hint}")
        values[key] = value
    return values


def write_local_config(store: Store, values: dict[str, int], results: list[dict[str, Any]], *,
                       release_id: str | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Atomically replace the release's local.json with `values`, recording what was measured and where."""
    path = local_config_path(store, release_id)
    doc: dict[str, Any] = {"format": LOCAL_CONFIG_FORMAT, **{k: values[k] for k in LIMITS if k in values}}
    doc["measured"] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "allowed_cpus": len(os.sched_getaffinity(0)),
        "llama_cpp": _llama_version(),
        **(settings or {}),
        "results": results,
    }
    data = (json.dumps(doc, indent=2) + "\n").encode()
    parse_local_config(data, str(path))  # never write what read_local_config would refuse
    try:
        replace_atomically(path, data)
    except OSError as exc:
        raise EdgepackError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def check_writable(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise EdgepackError(f"{path}: cannot write: is a directory (delete it)")
    if not os.access(path.parent, os.W_OK):
        raise EdgepackError(f"{path}: cannot write: {path.parent} is not writable")


def _read_regular_file(path: Path) -> bytes | None:
    """The bytes of a plain file (no link followed, size capped), or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EdgepackError(f"{path}: is a symbolic link, refused; delete it or re-run `edgepack tune`") from None
        raise EdgepackError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EdgepackError(f"{path}: not a regular file, refused; delete it or re-run `edgepack tune`")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_LOCAL_CONFIG_BYTES + 1)
    if len(data) > MAX_LOCAL_CONFIG_BYTES:
        raise EdgepackError(f"{path}: larger than {MAX_LOCAL_CONFIG_BYTES} bytes, refused; delete it or re-run"
                            " `edgepack tune`")
    return data


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _llama_version() -> str:
    from .llama import version

    return version()


# ---- the sweep ---------------------------------------------------------------------------------------------

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


def latency_targets(manifest: Manifest) -> dict[str, int]:
    """Model name -> the strictest latency_sla_ms among the agents that use it."""
    targets: dict[str, int] = {}
    for agent in manifest.agent_list():
        if agent.latency_sla_ms:
            targets[agent.model] = min(agent.latency_sla_ms, targets.get(agent.model, agent.latency_sla_ms))
    return targets


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
    from .engine import Sampling
    from .scheduler import DONE, Request

    sampling = Sampling(tokens, temperature=0, ignore_eos=True)
    finished = [threading.Event() for _ in range(requests)]
    errors: list[Exception] = []

    def emitter(event: threading.Event) -> Callable[[object], None]:
        def emit(item: object) -> None:
            if isinstance(item, Exception):
                errors.append(item)
            if item is DONE or isinstance(item, Exception):
                event.set()
        return emit

    started = time.monotonic()
    submitted = [Request(list(prompt), sampling, emitter(event)) for event in finished]
    for request in submitted:
        scheduler.submit(request)
    if not all(event.wait(_RUN_TIMEOUT_S) for event in finished):
        raise EdgepackError(f"tune: {requests} requests of {tokens} tokens did not finish in {_RUN_TIMEOUT_S:.0f}s")
    if errors:
        raise EdgepackError(f"tune: generation failed: {errors[0]}")
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
    from .scheduler import BatchScheduler

    scheduler = BatchScheduler(engine, max_queue=engine.slots)
    try:
        return run_concurrent(scheduler, prompt, engine.slots, tokens)
    finally:
        scheduler.stop()


def p95(values: list[float]) -> float:
    """95th percentile, interpolated between the closest ranks (numpy's default method)."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=20, method="inclusive")[-1]


def summarize(model: str, candidate: Candidate, runs: list[_Run], sla_ms: int | None) -> Measurement:
    rates = [r.tokens_per_second for r in runs]
    tpot = [x for r in runs for x in r.tpot] or [0.0]
    return Measurement(
        model=model, candidate=candidate,
        tokens_per_second=statistics.median(rates),
        spread=(max(rates) - min(rates)) / 2,
        ttft_ms=1000 * statistics.median(x for r in runs for x in r.ttft),
        tpot_ms=1000 * statistics.median(tpot),
        tpot_p95_ms=1000 * p95(tpot),
        latency_p95_ms=1000 * p95([x for r in runs for x in r.latency]),
        sla_ms=sla_ms,
    )


def sweep(store: Store, manifest: Manifest, models: list[str], candidates: list[Candidate], *, tokens: int,
          runs: int, n_ctx: int, progress: Callable[[Measurement], None] = lambda m: None,
          budget: int | None = None, skipped: Callable[[str], None] = lambda message: None) -> list[Measurement]:
    """Measure every model under every candidate, one engine per (model, candidate). With a memory budget
    (bytes), a candidate whose context would not fit it is skipped, as `serve` would not allocate it."""
    from .engine import Engine
    from .loader import repacked_models  # the loader reads local.json through this module: no cycle at import
    from .memory import process_memory

    repack = repacked_models(manifest, "auto")  # as `serve` loads them
    targets = latency_targets(manifest)
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
    from .memory import HEADROOM, context_bytes, format_mib

    def fit(shape) -> int:  # noqa: ANN001 - a memory.ModelShape
        need = used + HEADROOM + context_bytes(shape, n_ctx, candidate.slots, "f16", min(candidate.n_batch, 512))
        if budget is not None and need > budget:
            raise _DoesNotFit(f"{name}: {candidate.slots} slots x {n_ctx} tokens need about {format_mib(need)}, "
                              f"over the memory budget of {format_mib(budget)}: skipped")
        return n_ctx

    return fit


# ---- the command -------------------------------------------------------------------------------------------

class IntList(click.ParamType):
    """A comma-separated list of integers within [low, high], duplicates dropped: "1,2,4"."""

    name = "LIST"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        items = [x.strip() for x in str(value).split(",")]
        numbers: list[int] = []
        for item in items:
            if not (item.isascii() and item.isdigit()) or not self.low <= int(item) <= self.high:
                where = f" in {value!r}" if len(items) > 1 else ""
                self.fail(f"{item!r}{where} is not an integer from {self.low} to {self.high}", param, ctx)
            if int(item) not in numbers:
                numbers.append(int(item))
        return numbers


@click.command("tune")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The device's store directory.")
@click.option("--model", help="Tune only this model (default: every model of the current release).")
@click.option("--threads", "threads", type=IntList(*LIMITS["threads"]),
              help="Thread counts to try, e.g. 1,2,4 (default: 1, the physical performance cores, all allowed CPUs).")
@click.option("--slots", "slots", type=IntList(*LIMITS["slots"]), default=",".join(map(str, DEFAULT_SLOTS)),
              show_default=True, help="Concurrent requests (serve --slots) to try.")
@click.option("--batch", "batches", type=IntList(*LIMITS["n_batch"]), default=",".join(map(str, DEFAULT_BATCHES)),
              show_default=True, help="Batch sizes (tokens per llama_decode) to try.")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(2, 4096),
              help="Tokens generated per request; make it a typical answer when agents have a latency target.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 100), help="Measured runs (median).")
@click.option("--ctx", "n_ctx", type=click.IntRange(PROMPT_TOKENS + 2),
              help="Context per slot (default: the bundle's).")
@click.option("--memory-budget", help="Skip configurations that would not fit this budget, as `serve` reads it "
                                      "(default: serve's default budget).")
@click.option("--dry-run", is_flag=True, help="Measure and print, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tune_command(store_dir: Path, model: str | None, threads: list[int] | None, slots: list[int],
                 batches: list[int], tokens: int, runs: int, n_ctx: int | None, memory_budget: str | None,
                 dry_run: bool, as_json: bool) -> None:
    """Measure threads, slots and batch sizes on this device and keep the best for `serve`."""
    allowed = len(os.sched_getaffinity(0))
    if threads and max(threads) > allowed:
        raise click.BadParameter(f"{max(threads)} threads: this process may use {allowed} CPU(s)",
                                 param_hint="'--threads'")
    store = Store(store_dir)
    release = store.release_id("current")
    manifest = store.manifest()
    models = [manifest.model(model).name] if model else [m.name for m in manifest.models]
    if not dry_run:
        check_writable(local_config_path(store, release))  # fail before minutes of measuring, not after
    candidates = grid(threads or default_thread_candidates(), slots, batches)
    ctx = n_ctx or manifest.runtime.n_ctx
    if PROMPT_TOKENS + tokens > ctx:
        raise EdgepackError(f"--tokens {tokens} plus the {PROMPT_TOKENS}-token prompt exceed the context ({ctx})")
    click.echo(f"tune: {len(models)} model(s) x {len(candidates)} configuration(s), {runs} run(s) of {tokens} tokens",
               err=True)
    load = os.getloadavg()[0]
    if load > allowed / 2:
        click.echo(f"tune: warning: the machine is busy (load {load:.1f} on {os.cpu_count()} CPUs); other work skews"
                   " the figures, multi-threaded ones most", err=True)
    from .boards import board_memory_gib
    from .memory import resolve_budget

    budget = resolve_budget(memory_budget, board_memory_gib(manifest.board))
    measurements = sweep(store, manifest, models, candidates, tokens=tokens, runs=runs, n_ctx=ctx,
                         progress=lambda m: click.echo(f"tune: {_progress_line(m)}", err=True),
                         budget=budget.bytes, skipped=lambda line: click.echo(f"tune: {line}", err=True))
    if not measurements:
        raise EdgepackError(f"no configuration fits the memory budget of {budget.bytes / 2**20:.0f} MiB "
                            f"({budget.reason}); try fewer --slots or a smaller --ctx")
    best, rule = choose(measurements)
    chosen = asdict(best)
    if (threads_batch := prompt_threads(measurements, best)) != best.threads:
        chosen["threads_batch"] = threads_batch  # prompts ran faster with another count
    results = [m.row() for m in measurements]
    path = None
    if not dry_run:
        settings = {"models": models, "tokens": tokens, "runs": runs, "prompt_tokens": PROMPT_TOKENS, "n_ctx": ctx,
                    "load_average": round(load, 2), "rule": rule}
        path = write_local_config(store, chosen, results, release_id=release, settings=settings)
    if as_json:
        click.echo(json.dumps({"release": release, "best": chosen, "rule": rule, "results": results,
                               "local_config": str(path) if path else None}, indent=2))
        return
    click.echo(results_table(measurements, best))
    click.echo(f"best: threads={best.threads} slots={best.slots} n_batch={best.n_batch}"
               + (f" threads_batch={chosen['threads_batch']}" if "threads_batch" in chosen else "") + f": {rule}")
    click.echo(f"wrote {path}; `edgepack serve` uses it unless flags say otherwise" if path
               else "dry run: nothing written")


def _progress_line(m: Measurement) -> str:
    c = m.candidate
    return f"{m.model} threads={c.threads} slots={c.slots} batch={c.n_batch}: {m.tokens_per_second:.1f} tok/s"


def _sla_cell(m: Measurement) -> str:
    if m.sla_ms is None:
        return "-"
    return f"{'ok' if m.meets_sla else 'over'} ({m.sla_ms} ms)"


def results_table(measurements: list[Measurement], best: Candidate) -> str:
    from .cli import format_table  # lazily: cli registers this command

    with_sla = any(m.sla_ms for m in measurements)
    rows = [("MODEL", "THREADS", "SLOTS", "BATCH", "TOK/S", "TTFT p50", "TPOT p50", "TPOT p95", "ANSWER p95")
            + (("SLA",) if with_sla else ()) + ("",)]
    for m in measurements:
        c = m.candidate
        rows.append((m.model, str(c.threads), str(c.slots), str(c.n_batch),
                     f"{m.tokens_per_second:.1f} ±{m.spread:.1f}", f"{m.ttft_ms:.0f} ms", f"{m.tpot_ms:.1f} ms",
                     f"{m.tpot_p95_ms:.1f} ms", f"{m.latency_p95_ms:.0f} ms")
                    + ((_sla_cell(m),) if with_sla else ())
                    + ("<- best" if c == best else "",))
    return format_table(rows)
