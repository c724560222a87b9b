"""`edgepack tune`: the command around the sweep (runtime/tune.py); loaded only when it runs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .boards import board_memory_gib
from .cli_common import format_table, store_option
from .errors import EdgepackError
from .local_config import LIMITS, check_writable, local_config_path, write_local_config
from .memory import format_mib, resolve_budget
from .store import Store
from .tune import (
    DEFAULT_BATCHES,
    DEFAULT_SLOTS,
    PROMPT_TOKENS,
    Candidate,
    Measurement,
    choose,
    default_thread_candidates,
    grid,
    prompt_threads,
    sweep,
)


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
@store_option
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
    budget = resolve_budget(memory_budget, board_memory_gib(manifest.board))
    measurements = sweep(store, manifest, models, candidates, tokens=tokens, runs=runs, n_ctx=ctx,
                         progress=lambda m: click.echo(f"tune: {_progress_line(m)}", err=True),
                         budget=budget.bytes, skipped=lambda line: click.echo(f"tune: {line}", err=True))
    if not measurements:
        raise EdgepackError(f"no configuration fits the memory budget of {format_mib(budget.bytes)} "
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
