"""The model pool: memory budget, lazy loading, eviction, context sized to fit, warm states; and over HTTP."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import httpx
import pytest
from conftest import Clock, build_bundle, post_json, start_server, stop_server, wait_ready
from tiny_model import write_tiny_llama

from edgepack.packager import recipe as recipe_mod
from edgepack.packager.build import BuildOptions, build
from edgepack.runtime import llama
from edgepack.runtime.boards import load_board
from edgepack.runtime.engine import Engine, Generation, Sampling
from edgepack.runtime.memory import HEADROOM, Budget, MiB, ModelShape, compute_bytes, context_bytes, kv_bytes
from edgepack.runtime.pool import DoesNotFit, ModelPool
from edgepack.runtime.scheduler import DONE, BatchScheduler, Request
from edgepack.runtime.serve_config import resolve_config
from edgepack.runtime.store import Store

RECIPE = """
[models.alpha]
source = "alpha.gguf"
quant = "Q8_0"
[models.beta]
source = "beta.gguf"
quant = "Q8_0"
[agents.helper]
model = "alpha"
system_prompt = "You are a careful helper. You answer in one short line, and you never make things up."
[agents.other]
model = "beta"
semantic_cache = 0.99
cache_sampled = true
"""


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    write_tiny_llama(root / "alpha.gguf", seed=1, chat_template="chatml")
    write_tiny_llama(root / "beta.gguf", seed=2, chat_template="chatml")
    (root / "edgepack.toml").write_text(RECIPE)
    recipe = recipe_mod.load(root / "edgepack.toml")
    build(BuildOptions(output=root / "two.edgepack", recipe=recipe, board=load_board("host"), quiet=True,
                       no_eval=True, bundle_version=1))
    return root / "two.edgepack"


@pytest.fixture
def store(two_models, tmp_path):
    store = Store(tmp_path / "store")
    store.install(two_models)
    return store


def make_pool(store: Store, budget: int | None = None, n_ctx: int = 512, **kwargs) -> ModelPool:
    manifest = store.manifest()
    config = resolve_config(manifest, threads=1, n_ctx=n_ctx, slots=2)
    pool = ModelPool(store, manifest, config, Budget(2**40, "test"),
                     make_scheduler=lambda engine, cache, prefixes: BatchScheduler(engine, cache=cache,
                                                                                prefixes=prefixes), **kwargs)
    if budget is not None:
        pool.budget = Budget(pool.base + HEADROOM + budget, "test")
    return pool


def need(pool: ModelPool, name: str, n_ctx: int) -> int:
    """What the pool will ask for the model alone: its weights and its context estimate."""
    probe = make_pool(pool.store)
    try:
        shape = probe.acquire(name).engine.shape()
    finally:
        probe.close()
    return sum(pool._segments(name).values()) + context_bytes(shape, n_ctx, 2, "f16", 512)


def generate(scheduler: BatchScheduler, text: str, tokens: int = 8) -> tuple[str, Generation]:
    engine = scheduler.engine
    pieces, done = [], threading.Event()

    def emit(event):
        if event is DONE or isinstance(event, Exception):
            done.set()
        else:
            pieces.append(event)

    request = Request(engine.tokenize(text), Sampling(tokens, temperature=0, ignore_eos=True), emit)
    scheduler.submit(request)
    assert done.wait(30)
    return "".join(pieces), request.result


def test_models_load_on_first_use_and_idle_ones_make_room(store):
    pool = make_pool(store)
    beta_need = need(pool, "beta", 512)
    try:
        assert pool.loaded == {}
        scheduler = pool.acquire("alpha")
        assert list(pool.loaded) == ["alpha"] and scheduler.engine.n_ctx == 512
        beta_context = beta_need - sum(pool._segments("beta").values())
        alpha = pool.loaded["alpha"]
        noise = alpha.context - alpha.engine.context_bytes  # growth measured beyond llama.cpp's figures at load
        # room for alpha or beta, not both (without the noise: other threads' allocations while alpha loaded
        # would otherwise leave room for both)
        pool.budget = Budget(pool.usage() - noise + HEADROOM + beta_context - 1, "test")
        generate(scheduler, "the way")
        pool.release("alpha")
        pool.acquire("beta")  # alpha is idle: evicted to make room
        assert list(pool.loaded) == ["beta"] and pool.evictions == 1
        assert pool.usage() <= pool.budget.bytes
        # beta is in use, so alpha cannot be loaded now: refused, and waiting may help
        with pytest.raises(DoesNotFit, match="busy; retry later") as refused:
            pool.acquire("alpha")
        assert refused.value.busy and list(pool.loaded) == ["beta"]
        pool.release("beta")
        assert pool.acquire("alpha").engine.name == "alpha"
    finally:
        pool.close()


def test_keep_alive_evicts_idle_models(store):
    clock = Clock()
    pool = make_pool(store, keep_alive=30, clock=clock)
    try:
        pool.acquire("alpha")
        clock.now += 60
        assert pool.evict_expired() == []  # in use: kept however long
        pool.release("alpha")  # idle from now on
        clock.now += 29
        assert pool.evict_expired() == [] and list(pool.loaded) == ["alpha"]
        clock.now += 2
        assert pool.evict_expired() == ["alpha"] and pool.loaded == {}
    finally:
        pool.close()


def test_context_is_cut_to_fit_and_refused_when_nothing_fits(store):
    probe = make_pool(store)
    weights = sum(probe._segments("alpha").values())
    pool = make_pool(store, budget=need(probe, "alpha", 1024) - 1, n_ctx=4096)
    try:
        engine = pool.acquire("alpha").engine
        assert engine.n_ctx == 512  # 4096, 2048 and 1024 per slot did not fit
        # what llama.cpp allocated for the cut context (its own figures) is within the budget
        assert pool.base + HEADROOM + weights + engine.context_bytes <= pool.budget.bytes
    finally:
        pool.close()
    tight = make_pool(store, budget=weights)  # the weights alone fill it: no context fits
    try:
        with pytest.raises(DoesNotFit, match="does not fit the memory budget .* at all") as refused:
            tight.acquire("alpha")
        assert not refused.value.busy and tight.loaded == {}
    finally:
        tight.close()


def test_agent_warm_state_is_saved_then_loaded_and_answers_the_same(store):
    pool = make_pool(store)
    try:
        scheduler = pool.acquire("alpha")
        report = pool.loaded["alpha"].warmup
        tokens, how, _ = report.prefixes["helper"]
        assert how == "computed and saved" and tokens > 10
        assert len(report.singles) == 3 and report.cold is not None and report.warm is not None
        snapshots = list(pool.warm_dir.glob("helper-*.state"))
        assert len(snapshots) == 1
        prompt = scheduler.engine.format_chat([("system", store.manifest().agents[0].system_prompt),
                                               ("user", "the time")])
        first, result = generate(scheduler, prompt)
        assert result.cached_tokens >= tokens - 2  # the system prompt was not processed again
    finally:
        pool.close()

    restarted = make_pool(store)
    try:
        scheduler = restarted.acquire("alpha")
        assert restarted.loaded["alpha"].warmup.prefixes["helper"][1] == "loaded"
        again, result = generate(scheduler, prompt)
        assert again == first and result.cached_tokens >= tokens - 2
    finally:
        restarted.close()

    snapshots[0].write_bytes(b"\x00garbage" * 100)  # a damaged snapshot is recomputed, never trusted
    damaged = make_pool(store)
    try:
        scheduler = damaged.acquire("alpha")
        assert damaged.loaded["alpha"].warmup.prefixes["helper"][1] == "computed and saved"
        assert generate(scheduler, prompt)[0] == first
    finally:
        damaged.close()


def test_server_loads_lazily_evicts_after_keep_alive_and_gives_503_when_nothing_fits(store):
    process, base = start_server(store.root, "--threads", "1", "--keep-alive", "1s", "--ctx", "512")
    try:
        wait_ready(base, process)
        metrics = httpx.get(base + "/metrics").text
        assert 'edgepack_model_loaded{model="alpha"} 0.0' in metrics  # nothing loaded before a request
        status, body = post_json(base + "/v1/chat/completions", {
            "model": "helper", "messages": [{"role": "user", "content": "the"}], "max_tokens": 4})
        assert status == 200, body
        # counters, not the loaded gauge: with a 1 s keep-alive, alpha may be gone again by the time we look
        metrics = httpx.get(base + "/metrics").text
        assert 'edgepack_model_loads_total{model="alpha"} 1.0' in metrics
        generated = body["usage"]["completion_tokens"]  # the warm-up's own requests are not counted
        assert f'edgepack_generated_tokens_total{{model="alpha"}} {generated:.1f}' in metrics
        deadline = time.monotonic() + 60  # how long a loaded machine may take; eviction itself is 1 s + a tick
        while 'edgepack_model_loaded{model="alpha"} 1.0' in httpx.get(base + "/metrics").text:
            assert time.monotonic() < deadline, "alpha was not evicted after keep-alive"
            time.sleep(0.2)
        metrics = httpx.get(base + "/metrics").text
        assert "edgepack_model_evictions 1.0" in metrics
        assert 'edgepack_warmup_latency_seconds{model="alpha",stage="cold"}' in metrics
        status, _ = post_json(base + "/v1/chat/completions", {
            "model": "helper", "messages": [{"role": "user", "content": "the"}], "max_tokens": 4})
        assert status == 200  # loaded again
        assert 'edgepack_model_loads_total{model="alpha"} 2.0' in httpx.get(base + "/metrics").text
    finally:
        stop_server(process)

    process, base = start_server(store.root, "--threads", "1", "--memory-budget", "1M")
    try:
        wait_ready(base, process)
        status, body = post_json(base + "/v1/completions", {"model": "other", "prompt": "the", "max_tokens": 4})
        assert status == 503 and body["error"]["code"] == "insufficient_memory"
        assert "does not fit the memory budget of 1 MiB (--memory-budget) at all" in body["error"]["message"]
        assert httpx.get(base + "/health").status_code == 200  # the server itself carries on
    finally:
        stop_server(process)

    process, base = start_server(store.root, "--threads", "1", "--memory-budget", "1M", "--preload")
    try:
        wait_ready(base, process)  # a model that cannot be preloaded does not stop the server
        status, body = post_json(base + "/v1/completions", {"model": "other", "prompt": "the", "max_tokens": 4})
        assert status == 503 and body["error"]["code"] == "insufficient_memory"
    finally:
        stop_server(process)
    assert "warning: not preloaded: model 'alpha'" in process.stderr.read()


def test_preload_loads_every_model_before_ready(store):
    process, base = start_server(store.root, "--threads", "1", "--preload", "--ctx", "512")
    try:
        wait_ready(base, process)
        metrics = httpx.get(base + "/metrics").text
        assert 'edgepack_model_loaded{model="alpha"} 1.0' in metrics
        assert 'edgepack_model_loaded{model="beta"} 1.0' in metrics
    finally:
        stop_server(process)


@pytest.mark.parametrize(("flag", "message"), [
    (["--memory-budget", "lots"], "size 'lots': expected bytes"),
    (["--memory-budget", "150%"], "a share must be between 0% and 100%"),
    (["--keep-alive", "soon"], "--keep-alive 'soon': expected a duration"),
    (["--threads-batch", "0"], "--threads-batch must be at least 1, got 0"),
    (["--warmup", "singles,sauna"], "--warmup 'singles,sauna': expected stages among batch, singles, or none"),
])
def test_bad_memory_flags_are_refused_in_one_line(store, flag, message):
    from conftest import run_cli

    result = run_cli("serve", "--store", str(store.root), *flag)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_budget_resolution():
    from edgepack.runtime.memory import resolve_budget

    gib = 2**30
    assert resolve_budget(None, available=10 * gib, used=gib, cgroup_max=None).bytes == 9 * gib
    assert resolve_budget("50%", available=10 * gib, used=gib, cgroup_max=None).bytes == 6 * gib
    assert resolve_budget("2G", available=10 * gib, used=gib, cgroup_max=None).bytes == 2 * gib
    board = resolve_budget(None, 4, available=10 * gib, used=gib, cgroup_max=None)
    assert board.bytes == int(0.8 * 4 * gib) and "board" in board.reason
    capped = resolve_budget("8G", available=10 * gib, used=gib, cgroup_max=4 * gib)
    assert capped.bytes == int(0.9 * 4 * gib) and "memory.max" in capped.reason


def test_cgroup_memory_max_takes_the_tightest_ancestor(tmp_path):
    from edgepack.runtime.memory import cgroup_memory_max

    root = tmp_path / "cgroup"
    (root / "system.slice" / "edgepack.service").mkdir(parents=True)
    (root / "system.slice" / "memory.max").write_text("1073741824\n")
    (root / "system.slice" / "edgepack.service" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("0::/system.slice/edgepack.service\n")
    assert cgroup_memory_max(root, proc) == 2**30
    proc.write_text("0::/\n")
    assert cgroup_memory_max(root, proc) is None


def test_built_bundle_with_board_budget(tiny_gguf, tmp_path):
    """A bundle built for a 4 GiB board is never budgeted above 80% of 4 GiB, whatever the host has."""
    bundle = build_bundle(tiny_gguf, tmp_path / "pi.edgepack", quant="Q8_0", name="pi", board=load_board("rpi4"))
    store = tmp_path / "store"
    Store(store).install(bundle)
    process, base = start_server(store, "--threads", "1")
    try:
        wait_ready(base, process)
        budget = [line for line in httpx.get(base + "/metrics").text.splitlines()
                  if line.startswith("edgepack_memory_budget_bytes ")]
        board_gib = load_board("rpi4").memory_gib
        assert float(budget[0].split()[1]) <= 0.8 * board_gib * 2**30
    finally:
        stop_server(process)


def test_agents_opt_in_to_the_semantic_cache_and_to_caching_sampled_answers(store):
    manifest = store.manifest()
    other = next(a for a in manifest.agents if a.name == "other")
    assert other.semantic_cache == 0.99 and other.cache_sampled
    process, base = start_server(store.root, "--threads", "1", "--no-cache", "--ctx", "512")
    try:
        wait_ready(base, process)

        def ask(agent: str, **extra) -> None:
            status, body = post_json(base + "/v1/chat/completions", {
                "model": agent, "messages": [{"role": "user", "content": "the time"}], "max_tokens": 4, **extra})
            assert status == 200, body

        def outcomes() -> dict[str, float]:
            return {line.split('"')[1]: float(line.split()[-1]) for line in httpx.get(base + "/metrics").text
                    .splitlines() if line.startswith("edgepack_cache_requests_total{")}

        ask("helper", temperature=0)
        ask("helper", temperature=0)
        assert outcomes() == {}  # not opted in, and the exact caches are off: not looked up at all
        ask("other", temperature=0.7, seed=3)  # sampled, but this agent caches those too
        ask("other", temperature=0.7, seed=3)
        assert outcomes() == {"miss": 1.0, "semantic": 1.0}
    finally:
        stop_server(process)


# ---- the estimate the budget is decided on, against what llama.cpp allocates --------------------------
#
# Before a model's context exists the pool decides on memory.context_bytes(); afterwards it charges llama.cpp's
# own figures. The estimate must therefore never be under what llama.cpp allocates (or a model that does not fit
# is loaded), and not far over it (or contexts are cut, and models refused, for nothing). Tolerance: the KV cache
# exactly (to the log's 0.01 MiB), the other buffers (compute and output) never under and at most 20 MiB over:
# the room the activation term keeps for models with a wider FFN than these two.
KV_TOLERANCE = MiB // 10
BUFFER_SLACK = 20 * MiB


def allocated(capsys, monkeypatch, path, n_ctx: int, slots: int, n_batch: int, kv_type: str,
              embedder: bool = False) -> tuple[ModelShape, int, int, int]:
    """(shape, KV bytes, compute + output bytes, embedder context bytes) as llama.cpp reports them in its log
    ("KV buffer size", "compute buffer size", "output buffer size") while creating the context."""
    monkeypatch.setenv("EDGEPACK_LLAMA_LOG", "1")
    capsys.readouterr()
    engine = Engine([path], name="m", n_ctx=n_ctx, n_batch=n_batch, threads=1, slots=slots, kv_type=kv_type)
    try:
        log = capsys.readouterr().err.splitlines()
        shape, total = engine.shape(), engine.context_bytes
        embedder_bytes = engine.embedder().context_bytes if embedder else 0
    finally:
        engine.close()
    kv = llama.buffer_bytes([line for line in log if "KV buffer size" in line])
    buffers = llama.buffer_bytes([line for line in log if "compute buffer size" in line or "output buffer" in line])
    assert kv > 0 and buffers > 0 and abs(kv + buffers - total) <= 2**20 // 100, log[-20:]
    return shape, kv, buffers, embedder_bytes


def assert_estimate_covers(shape: ModelShape, kv: int, buffers: int, n_ctx: int, slots: int, n_batch: int,
                           kv_type: str) -> None:
    n_ubatch = min(n_batch, 512)
    estimated_kv = kv_bytes(shape, n_ctx, slots, kv_type, n_ubatch)
    estimated_buffers = compute_bytes(shape, n_ctx, slots, n_ubatch)
    figures = f"KV {estimated_kv / MiB:.2f} vs {kv / MiB:.2f} MiB, buffers {estimated_buffers / MiB:.2f} vs " \
              f"{buffers / MiB:.2f} MiB (estimate vs llama.cpp)"
    assert abs(estimated_kv - kv) <= KV_TOLERANCE, figures
    assert buffers <= estimated_buffers <= buffers + BUFFER_SLACK, figures
    assert context_bytes(shape, n_ctx, slots, kv_type, n_ubatch) == estimated_kv + estimated_buffers


# (context per slot, slots, n_batch, KV type): the serving default, long contexts (the attention mask grows with
# them), small micro-batches with many slots, a context llama.cpp pads to 256 cells, a quantized KV cache
CONTEXTS = [(512, 2, 512, "f16"), (4096, 2, 512, "f16"), (32768, 1, 512, "f16"), (1024, 4, 64, "f16"),
            (300, 1, 512, "f16"), (2048, 2, 512, "q8_0")]


@pytest.mark.parametrize(("n_ctx", "slots", "n_batch", "kv_type"), CONTEXTS)
def test_the_estimate_covers_what_llama_cpp_allocates_for_a_tiny_model(tiny_gguf, capsys, monkeypatch, n_ctx,
                                                                        slots, n_batch, kv_type):
    shape, kv, buffers, _ = allocated(capsys, monkeypatch, tiny_gguf, n_ctx, slots, n_batch, kv_type)
    assert_estimate_covers(shape, kv, buffers, n_ctx, slots, n_batch, kv_type)


@pytest.mark.real_model
@pytest.mark.parametrize(("n_ctx", "slots", "n_batch", "kv_type"), CONTEXTS)
def test_the_estimate_covers_what_llama_cpp_allocates_for_gemma(gemma_gguf, capsys, monkeypatch, n_ctx, slots,
                                                                 n_batch, kv_type):
    shape, kv, buffers, _ = allocated(capsys, monkeypatch, gemma_gguf, n_ctx, slots, n_batch, kv_type)
    assert_estimate_covers(shape, kv, buffers, n_ctx, slots, n_batch, kv_type)


@pytest.mark.parametrize("model", ["tiny", pytest.param("gemma", marks=pytest.mark.real_model)])
def test_the_embedder_estimate_covers_its_context(request, capsys, monkeypatch, model):
    """The pool budgets a semantic-cache embedder as a 512-token, one-sequence context."""
    path = request.getfixturevalue("tiny_gguf" if model == "tiny" else "gemma_gguf")
    shape, _, _, embedder = allocated(capsys, monkeypatch, path, 256, 1, 64, "f16", embedder=True)
    estimate = context_bytes(shape, 512, 1, "f16", 512)
    assert embedder <= estimate <= embedder + BUFFER_SLACK, (estimate / MiB, embedder / MiB)


@pytest.mark.real_model
def test_gemma_kv_follows_the_sliding_window_layout(gemma_gguf, capsys, monkeypatch):
    """Gemma 3 270M keeps 3 of its 18 layers over the whole context and 15 over a window of 512 + a micro-batch:
    for 2 x 4096 tokens llama.cpp allocates about a third of what all layers in full would take."""
    shape, kv, _, _ = allocated(capsys, monkeypatch, gemma_gguf, 4096, 2, 512, "f16")
    assert shape.architecture == "gemma3" and shape.n_swa == 512 and shape.n_layer == 18
    assert abs(kv - kv_bytes(shape, 4096, 2, "f16", 512)) <= KV_TOLERANCE
    all_full = kv_bytes(replace(shape, architecture="newarch"), 4096, 2, "f16", 512)
    assert kv < all_full / 2  # an architecture not known to use windows is sized as if every layer were full
    small, small_kv, _, _ = allocated(capsys, monkeypatch, gemma_gguf, 512, 2, 512, "f16")
    assert abs(small_kv - kv_bytes(small, 512, 2, "f16", 512)) <= KV_TOLERANCE  # the window never exceeds n_ctx


def test_a_model_with_semantic_cache_gets_its_embedder_inside_the_budget(store):
    pool = make_pool(store, embedding_models=frozenset({"beta"}))
    try:
        engine = pool.acquire("beta").engine
        assert engine.embedder_bytes > 0 and pool.loaded["beta"].context >= engine.context_bytes + engine.embedder_bytes
        assert pool.acquire("alpha").engine.embedder_bytes == 0  # no agent of alpha uses it
    finally:
        pool.close()


def test_warmup_stages_are_configurable(store):
    pool = make_pool(store, warmup=frozenset())
    try:
        pool.acquire("alpha")
        report = pool.loaded["alpha"].warmup
        assert report.singles == [] and report.concurrent == [] and "helper" in report.prefixes
    finally:
        pool.close()


def test_requests_that_wait_for_one_load_count_one_load(tiny_bundle, tmp_path):
    """bench/soak.py's finding: every request that waited for a load was counted as a load of its own."""
    from edgepack.runtime.store import Store

    store = tmp_path / "store"
    Store(store).install(tiny_bundle)
    process, base = start_server(store, "--threads", "1", "--warmup", "none")
    try:
        wait_ready(base, process)
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
        threads = [threading.Thread(target=post_json, args=(f"{base}/v1/completions", body)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'edgepack_model_loads_total{model="tiny"} 1.0' in metrics, metrics
        assert 'edgepack_model_load_seconds_count{model="tiny"} 1.0' in metrics
    finally:
        stop_server(process)
