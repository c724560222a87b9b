"""`edgepack tune`: a tiny sweep keeps its best configuration in the release's local.json; a damaged
local.json is refused with one line, never used; bad lists are refused."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner, Result

from edgepack.runtime.cli import cli
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.local_config import LOCAL_CONFIG, MAX_LOCAL_CONFIG_BYTES, read_local_config, write_local_config
from edgepack.runtime.store import Store
from edgepack.runtime.tune import Candidate, Measurement, choose

GRID = {(1, 1, 64), (1, 1, 128), (1, 2, 64), (1, 2, 128)}
SWEEP = ["--threads", "1", "--slots", "1,2", "--batch", "64,128", "--tokens", "4", "--runs", "1"]


@pytest.fixture
def store(tiny_bundle, tmp_path) -> Store:
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    return store


def tune(store: Store, *args: str) -> Result:
    return CliRunner().invoke(cli, ["tune", "--store", str(store.root), *args])


def local_config(store: Store):
    return store.releases / store.release_id() / LOCAL_CONFIG


def test_tune_keeps_the_best_of_the_grid_in_local_json(store):
    result = tune(store, *SWEEP, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = doc["results"]
    assert {(r["threads"], r["slots"], r["n_batch"]) for r in rows} == GRID and len(rows) == 4
    assert all(r["model"] == "tiny" and r["tokens_per_second"] > 0 and r["ttft_ms"] > 0 for r in rows)
    best = doc["best"]
    # no agent of the tiny bundle has a latency target: the rule is the highest throughput of the grid
    assert all(r["sla_ms"] is None for r in rows)
    rate = {(r["threads"], r["slots"], r["n_batch"]): r["tokens_per_second"] for r in rows}
    assert rate[best["threads"], best["slots"], best["n_batch"]] == max(rate.values())
    assert read_local_config(store) == best
    saved = json.loads(local_config(store).read_text())
    assert saved["measured"]["results"] == rows
    assert saved["measured"]["llama_cpp"].startswith("llama.cpp ") and saved["measured"]["cpus"] == os.cpu_count()
    assert sorted(p.name for p in local_config(store).parent.iterdir()) == [LOCAL_CONFIG, "manifest.json"]


def test_dry_run_prints_the_table_and_writes_nothing(store):
    result = tune(store, *SWEEP, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["MODEL", "THREADS", "SLOTS", "BATCH", "TOK/S"]
    assert len([line for line in lines if line.startswith("tiny ")]) == 4
    assert result.stdout.count("<- best") == 1 and "dry run: nothing written" in result.stdout
    assert not local_config(store).exists()


@pytest.mark.parametrize("content", [
    b"\x00\xffnot json", b"", b"[1, 2]", b'{"threads": "2"}', b'{"threads": -1}', b'{"slots": 0}',
    b'{"threads": 1000000}', b'{"n_batch": 1e9}', b'{"n_batch": 1.5}', b'{"threads": true}', b'{"threads": NaN}',
    b'{"thread": 2}', b'{"format": 2, "threads": 2}', b'{"measured": []}', b'{"n_batch": 8}',
    b'{"threads": 2, ' + b" " * MAX_LOCAL_CONFIG_BYTES + b"}",
], ids=lambda c: c[:24].decode("latin-1"))
def test_a_damaged_local_config_is_refused_in_one_line(store, content):
    local_config(store).write_bytes(content)
    with pytest.raises(EdgepackError) as error:
        read_local_config(store)
    assert LOCAL_CONFIG in str(error.value) and "\n" not in str(error.value)


def test_a_link_in_place_of_local_config_is_refused_and_tune_replaces_it(store, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"threads": 1}')
    local_config(store).symlink_to(elsewhere)
    with pytest.raises(EdgepackError, match="symbolic link"):
        read_local_config(store)
    result = tune(store, *SWEEP)
    assert result.exit_code == 0, result.output
    assert not local_config(store).is_symlink() and elsewhere.read_text() == '{"threads": 1}'
    assert read_local_config(store)["threads"] == 1


def test_a_directory_in_place_of_local_config_is_refused(store):
    local_config(store).mkdir()
    with pytest.raises(EdgepackError, match="not a regular file"):
        read_local_config(store)
    result = tune(store, *SWEEP)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "cannot write: is a directory" in result.stderr


@pytest.mark.parametrize(("option", "value"), [
    ("--threads", "0"), ("--threads", "-1"), ("--threads", "two"), ("--threads", "1,,2"), ("--threads", ""),
    ("--threads", "2.5"), ("--threads", "\u00b2"), ("--threads", "99999"),
    ("--threads", str(len(os.sched_getaffinity(0)) + 1)),
    ("--slots", "65"), ("--batch", "32"), ("--tokens", "1"),
])
def test_bad_values_are_refused(store, option, value):
    result = tune(store, option, value)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0]
    assert not local_config(store).exists()


def test_a_store_without_a_release_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["tune", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: store ") and "no current release" in result.stderr
    assert result.stderr.count("\n") == 1


def test_an_unknown_model_is_refused_in_one_line(store):
    result = tune(store, "--model", "nope", *SWEEP)
    assert result.exit_code == 1 and result.stderr == "Error: bundle 'tiny' has no model 'nope'\n"


def test_configurations_over_the_memory_budget_are_skipped(store):
    result = tune(store, *SWEEP, "--memory-budget", "1M")
    assert result.exit_code == 1 and not local_config(store).exists()
    assert result.stderr.splitlines()[-1].startswith("Error: no configuration fits the memory budget of 1 MiB")
    assert "tiny: 1 slots x 512 tokens need about" in result.stderr and ": skipped" in result.stderr


def test_local_config_round_trips(store):
    write_local_config(store, {"threads": 2, "slots": 4, "n_batch": 256}, [{"model": "tiny"}])
    assert read_local_config(store) == {"threads": 2, "slots": 4, "n_batch": 256}
    write_local_config(store, {"threads": 3}, [])
    assert read_local_config(store) == {"threads": 3}
    with pytest.raises(EdgepackError, match="local.json: slots: expected int >= 1; delete it or re-run"):
        write_local_config(store, {"threads": 2, "slots": 0}, [])
    assert read_local_config(store) == {"threads": 3}


def test_a_release_without_local_config_reads_empty(store):
    assert read_local_config(store) == {}


def measured(model: str, threads: int, rate: float, latency_ms: float, sla_ms: int | None = None) -> Measurement:
    return Measurement(model, Candidate(threads, 1, 128), rate, 0.0, 10.0, 5.0, 6.0, latency_ms, sla_ms)


def test_the_best_is_the_fastest_within_the_latency_target():
    plain = [measured("m", 1, 10, 100), measured("m", 2, 30, 900), measured("m", 4, 20, 300)]
    assert choose(plain)[0].threads == 2
    with_target = [measured("m", 1, 10, 100, 500), measured("m", 2, 30, 900, 500), measured("m", 4, 20, 300, 500)]
    assert choose(with_target)[0].threads == 4
    none_meet = [measured("m", 1, 10, 700, 200), measured("m", 2, 30, 900, 200)]
    best, rule = choose(none_meet)
    assert best.threads == 1 and "no configuration meets" in rule
    # two models: each one's throughput counts relative to its own best, so a big model is not drowned out
    two = [measured("small", 1, 100, 10), measured("big", 1, 5, 10), measured("small", 2, 90, 10),
           measured("big", 2, 10, 10)]
    assert choose(two)[0].threads == 2


def test_prompt_threads_are_kept_apart_only_when_prompts_ran_faster():
    from dataclasses import replace

    from edgepack.runtime.tune import prompt_threads

    rows = [replace(measured("m", 2, 30, 100), ttft_ms=40.0), replace(measured("m", 4, 20, 100), ttft_ms=25.0),
            replace(measured("m", 1, 10, 100), ttft_ms=90.0)]
    best = choose(rows)[0]
    assert best.threads == 2 and prompt_threads(rows, best) == 4
    tied = [replace(r, ttft_ms=40.0) for r in rows]
    assert prompt_threads(tied, best) == 2  # no faster count: the same as generation


def served_slot_limit(store: Store, *flags: str) -> tuple[str, str]:
    """The slot limit a server started with these flags reports after one request, and its stderr."""
    import httpx
    from conftest import start_server, stop_server, wait_ready

    process, base = start_server(store.root, *flags)
    try:
        wait_ready(base, process)
        assert httpx.post(base + "/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
        limit = next(line.split()[-1] for line in httpx.get(base + "/metrics").text.splitlines()
                     if line.startswith('edgepack_slot_limit{model="tiny"}'))
    finally:
        stop_server(process)
    return limit, process.stderr.read()


def test_serve_uses_the_tuned_settings_and_flags_win(store):
    write_local_config(store, {"threads": 1, "slots": 3, "n_batch": 64}, [])
    limit, log = served_slot_limit(store)
    assert limit == "3.0" and "1 threads (local.json, from `edgepack tune`)" in log
    assert served_slot_limit(store, "--slots", "2")[0] == "2.0"
