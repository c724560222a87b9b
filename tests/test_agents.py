"""Many agents, one base: recipes, shared segments stored once, LoRA agents served, deltas, gc."""

from __future__ import annotations

import json
import tarfile

import pytest
from conftest import post_json, run_cli, start_server, stop_server, wait_ready
from tiny_model import write_tiny_llama, write_tiny_lora

from edgepack.packager import recipe as recipe_mod
from edgepack.packager.build import BuildOptions, build
from edgepack.packager.errors import PackagerError
from edgepack.runtime.boards import load_board
from edgepack.runtime.bundle_format import Manifest
from edgepack.runtime.store import Store

RECIPE = """
board = "rpi5"
[models.base]
source = "base.gguf"
quant = "Q8_0"
[models.tuned]
source = "tuned.gguf"
quant = "Q8_0"
[adapters.sql]
source = "sql-lora.gguf"
base = "base"
[agents.planner]
model = "base"
system_prompt = "You plan."
[agents.sql]
model = "base"
adapter = "sql"
system_prompt = "You write SQL."
temperature = 0
[agents.tuned]
model = "tuned"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    write_tiny_llama(root / "base.gguf", n_layer=8)
    # A fine-tune of the same base whose top quarter of blocks changed: the rest is byte-identical.
    write_tiny_llama(root / "tuned.gguf", n_layer=8, changed_blocks={6, 7})
    write_tiny_lora(root / "sql-lora.gguf", n_layer=8)
    (root / "edgepack.toml").write_text(RECIPE)
    return root


def manifest_of(bundle) -> Manifest:
    with tarfile.open(bundle) as archive:
        return Manifest.from_json(archive.extractfile("manifest.json").read())


def build_recipe(project, out, **kwargs):
    recipe = recipe_mod.load(project / "edgepack.toml")
    options = {"board": load_board(recipe.board), "quiet": True, "no_eval": True, "bundle_version": 1, **kwargs}
    return build(BuildOptions(output=out, recipe=recipe, **options))


@pytest.fixture(scope="module")
def agents_bundle(project):
    return build_recipe(project, project / "agents.edgepack")


def test_shared_segments_are_stored_once(agents_bundle):
    manifest = agents_bundle.manifest
    base, tuned = manifest.model("base"), manifest.model("tuned")
    shared = set(base.segments) & set(tuned.segments)
    # 8 blocks in segments of 4: blk.0-3 identical, blk.4-7 changed; metadata (same name), output, norm and
    # embeddings identical.
    assert len(shared) == 5 and base.segments[1] == tuned.segments[1] and base.segments[2] != tuned.segments[2]
    assert len(manifest.blobs) == len(set(base.segments) | set(tuned.segments)) + 1  # + the adapter
    with tarfile.open(agents_bundle.output) as archive:
        names = archive.getnames()
    assert len(names) == len(set(names)) == len(manifest.blobs) + 1
    assert agents_bundle.shared_bytes == sum(manifest.blobs[d].size for d in shared)
    assert [a.name for a in manifest.agents] == ["planner", "sql", "tuned"]
    assert manifest.adapters[0].base == "base" and manifest.board == "rpi5"


def test_agents_are_served_with_their_adapter_prompt_and_defaults(agents_bundle, tmp_path):
    store = tmp_path / "store"
    Store(store).install(agents_bundle.output)
    process, base = start_server(store, "--threads", "2")
    try:
        wait_ready(base, process)
        models = json.loads(__import__("urllib.request").request.urlopen(base + "/v1/models").read())
        assert [m["id"] for m in models["data"]] == ["planner", "sql", "tuned"]

        def ask(agent: str, **extra) -> str:
            status, body = post_json(base + "/v1/chat/completions", {
                "model": agent, "messages": [{"role": "user", "content": "the time"}], "max_tokens": 12,
                "ignore_eos": True, "temperature": 0, **extra})
            assert status == 200, body
            assert body["model"] == agent
            return body["choices"][0]["message"]["content"]

        planner, sql, tuned = ask("planner"), ask("sql"), ask("tuned")
        assert sql != planner  # the adapter changes the base's answers
        assert tuned != planner  # another model
        # The same base without the adapter but with the sql system prompt answers like neither.
        assert ask("planner", messages=[{"role": "system", "content": "You write SQL."},
                                        {"role": "user", "content": "the time"}]) != sql
        assert ask("planner") == planner  # and the base is untouched by the sql agent before it
        status, body = post_json(base + "/v1/chat/completions", {
            "model": "base", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and "planner" in body["error"]["message"]
    finally:
        stop_server(process)


def test_lora_scale_zero_gives_the_base(project):
    from edgepack.runtime.engine import Engine, Generation, Sampling

    engine = Engine([project / "base.gguf"], name="base", n_ctx=256, n_batch=64, threads=2)
    try:
        engine.load_adapter("sql", project / "sql-lora.gguf")

        def answer(lora):
            return "".join(engine.generate(engine.tokenize("the way"), Sampling(16, temperature=0, ignore_eos=True),
                                           Generation(), lora=lora))

        plain = answer(None)
        assert answer(("sql", 0.0)) == plain
        assert answer(("sql", 1.0)) != plain
        assert answer(None) == plain
    finally:
        engine.close()


def test_delta_update_ships_only_new_blobs(project, agents_bundle, tmp_path):
    write_tiny_llama(project / "tuned.gguf", n_layer=8, changed_blocks={6, 7}, changed_seed=7)  # retrained
    try:
        delta = build_recipe(project, tmp_path / "delta.edgepack", since=agents_bundle.output, bundle_version=2)
    finally:
        write_tiny_llama(project / "tuned.gguf", n_layer=8, changed_blocks={6, 7})
    manifest = delta.manifest
    old = agents_bundle.manifest
    new_blobs = set(manifest.blobs) - set(old.blobs)
    assert delta.blobs_shipped == len(new_blobs) == 1  # only tuned's blk.4-7 segment changed
    assert manifest.delta_since == "agents v1"
    assert delta.bundle_size < agents_bundle.bundle_size * 0.35

    # Without the base release in the store: refused, one line naming what is missing, store untouched.
    empty = tmp_path / "empty-store"
    result = run_cli("install", str(delta.output), "--store", str(empty))
    assert result.returncode == 1 and "neither in the bundle nor in the store" in result.stderr
    assert not empty.exists()
    # With it: installs, and the new release serves the updated model.
    store = Store(tmp_path / "store")
    store.install(agents_bundle.output)
    installed = store.install(delta.output)
    assert installed.blobs_written == 1 and store.manifest().delta_since == "agents v1"
    store.segment_paths(store.manifest(), "tuned")


def test_gc_keeps_what_current_and_previous_need(project, agents_bundle, tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    first_blobs = set(store.manifest().blobs)
    store.install(agents_bundle.output)
    store.rollback()  # current: tiny, previous: agents
    store.rollback()  # current: agents, previous: tiny
    single = tmp_path / "single.edgepack"
    build(BuildOptions(output=single, source=project / "base.gguf", board=load_board("host"), quant="Q4_0",
                       quiet=True, no_eval=True, bundle_version=3, name="single"))
    store.install(single)  # current: single, previous: agents; tiny's release is no longer kept
    result = run_cli("gc", "--store", str(store.root))
    assert result.returncode == 0, result.stderr
    needed = set(store.manifest("current").blobs) | set(store.manifest("previous").blobs)
    on_disk = {p.name for p in store.blobs.iterdir()}
    assert on_disk == {str(d) for d in needed}
    assert not {str(d) for d in first_blobs - needed} & on_disk
    assert len(list(store.releases.iterdir())) == 2
    assert "removed 1 release(s)" in result.stdout


RECIPE_ERRORS = [
    ("models = 3", "models: expected object, got int"),
    ("[models.base]\nquant = 'Q4_0'", "models.base: missing required field source"),
    ("[models.base]\nsource = 'missing.gguf'", "models.base.source: expected an existing file"),
    ("[models.base]\nsource = 'base.gguf'\ncolour = 'red'", "models.base: unknown field colour"),
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'nope'", "agents.a.model: expected one of the models"),
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\ntemperature = 'hot'",
     "agents.a.temperature: expected float"),
    ("[models.base]\nsource = 'base.gguf'\n[adapters.x]\nsource = 'sql-lora.gguf'\nbase = 'other'",
     "adapters.x.base: expected one of the models"),
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\ntier = 'yolo'", "agents.a.tier"),
    ("[models.'bad name!']\nsource = 'base.gguf'", "expected a name of letters"),
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\nsemantic_cache = 2",
     "agents.a.semantic_cache: expected float <= 1.0"),
    # A typo or a wrong type in an agent's sampling used to reach the manifest; every request then failed (500).
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\ntemprature = 0.2",
     "agents.a: unknown field temprature"),
    ("[models.base]\nsource = 'base.gguf'\n[agents.a]\nmodel = 'base'\ntop_k = 2.5", "agents.a.top_k: expected int"),
    ("[models.base\nsource=", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), RECIPE_ERRORS)
def test_recipe_errors_name_the_file_and_key(project, text, message, tmp_path):
    path = project / "bad.toml"
    path.write_text(text)
    with pytest.raises(PackagerError) as err:
        recipe_mod.load(path)
    assert str(path) in str(err.value) and message in str(err.value)
    result = run_cli("build", "--recipe", str(path), "-o", str(tmp_path / "x.edgepack"))
    assert result.returncode == 1 and message in result.stderr and not (tmp_path / "x.edgepack").exists()


def test_init_writes_a_recipe_that_parses(tmp_path):
    path = tmp_path / "edgepack.toml"
    assert run_cli("init", str(path)).returncode == 0
    write_tiny_llama(tmp_path / "base.gguf")
    recipe = recipe_mod.load(path)
    assert recipe.board == "rpi5" and recipe.agents[0].name == "planner"
    assert recipe.agents[0].sampling.given() == {"temperature": 0.2, "max_tokens": 256}
    again = run_cli("init", str(path))
    assert again.returncode == 1 and "--force" in again.stderr


def test_every_agent_prefix_is_kept_even_with_fewer_slots(agents_bundle, tmp_path):
    """Two agents with system prompts (one with an adapter) on one base, one slot: both prefixes are saved and
    kept for restoring, and each agent's request reuses its own, although the slot last held the other's."""
    import threading

    from edgepack.runtime.engine import Generation, Sampling
    from edgepack.runtime.memory import Budget
    from edgepack.runtime.pool import ModelPool
    from edgepack.runtime.scheduler import DONE, BatchScheduler, Request
    from edgepack.runtime.serve_config import resolve_config

    store = Store(tmp_path / "store")
    store.install(agents_bundle.output)
    manifest = store.manifest()
    pool = ModelPool(store, manifest, resolve_config(manifest, threads=1, n_ctx=256, slots=1), Budget(2**34, "t"),
                     make_scheduler=lambda e, c, p: BatchScheduler(e, cache=c, prefixes=p))

    def ask(scheduler: BatchScheduler, agent_name: str) -> Generation:
        """One chat request of the agent, as the server builds it: its system prompt, a user turn, its adapter."""
        agent = next(a for a in manifest.agent_list() if a.name == agent_name)
        engine = scheduler.engine
        prompt = engine.tokenize(engine.format_chat([("system", agent.system_prompt), ("user", "the time")]))
        lora = (agent.adapter, manifest.adapter(agent.adapter).scale) if agent.adapter else None
        done = threading.Event()
        request = Request(prompt, Sampling(4, temperature=0, ignore_eos=True),
                          lambda event: done.set() if event is DONE or isinstance(event, Exception) else None,
                          lora=lora)
        scheduler.submit(request)
        assert done.wait(60) and request.result.finish_reason == "length", request.result
        return request.result

    try:
        scheduler = pool.acquire("base")
        report = pool.loaded["base"].warmup
        assert set(report.prefixes) == {"planner", "sql"}
        assert {p.lora for p in scheduler.prefixes} == {None, ("sql", 1.0)}
        assert len(list(pool.warm_dir.glob("*.state"))) == 2
        for agent in ("planner", "sql", "planner", "sql"):  # the one slot alternates between the two agents
            result = ask(scheduler, agent)
            prefix = report.prefixes[agent][0]
            assert result.cached_tokens >= prefix > 5, (agent, result.cached_tokens, prefix)
            assert result.prompt_tokens > prefix
    finally:
        pool.close()
