"""Encoders in a recipe: built into the same bundle as the LLMs, and named by an agent's semantic cache, which then
embeds with the encoder instead of the model's own weights (docs/semantic-cache.md)."""

from __future__ import annotations

import re
import urllib.request

import pytest

from edgepack.packager import recipe as recipe_mod
from edgepack.packager.errors import PackagerError
from edgepack.runtime.store import Store, bundle_manifest
from tests.conftest import post_json, run_cli, serving
from tests.encoder_bundle import minilm_source

RECIPE = """
[models.base]
source = "{model}"
quant = "keep"

[encoders.minilm]
source = "{encoder}"

[agents.faq]
model = "base"
temperature = 0
max_tokens = 8
semantic_cache = {{ threshold = 0.9, embedder = "minilm" }}

[agents.plain]
model = "base"
temperature = 0
max_tokens = 8
"""


def write_recipe(folder, tiny_gguf, text=RECIPE):
    path = folder / "edgepack.toml"
    path.write_text(text.format(model=tiny_gguf, encoder=minilm_source()))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('embedder = "minilm"', 'embedder = "nope"'),
     "agents.faq.semantic_cache.embedder: expected one of the encoders (minilm), got 'nope'"),
    (lambda t: t.replace("[encoders.minilm]", "[encoders.base]"),
     "encoders: expected names different from the models' and agents', got 'base'"),
    (lambda t: t.replace('[encoders.minilm]\nsource = "{encoder}"', '[encoders.minilm]\nsource = "{model}"'),
     "encoders.minilm.source: expected a Hugging Face checkpoint directory"),
    (lambda t: t.replace('[encoders.minilm]\nsource = "{encoder}"',
                         '[encoders.minilm]\nsource = "{encoder}"\nquant = "int4"'),
     "encoders.minilm.quant: Invalid enum value 'int4'"),
    (lambda t: t.replace("threshold = 0.9", "threshold = 0.2"), "agents.faq.semantic_cache"),
])
def test_recipe_refuses_bad_encoder_entries(tmp_path, tiny_gguf, edit, message):
    path = write_recipe(tmp_path, tiny_gguf, edit(RECIPE))
    with pytest.raises(PackagerError) as caught:
        recipe_mod.load(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bare_threshold_still_means_the_models_own_embedding(tmp_path, tiny_gguf):
    recipe = recipe_mod.load(write_recipe(tmp_path, tiny_gguf, RECIPE.replace(
        'semantic_cache = {{ threshold = 0.9, embedder = "minilm" }}', "semantic_cache = 0.95")))
    faq = recipe.agents[0]
    assert (faq.semantic_threshold, faq.semantic_embedder) == (0.95, None)
    assert recipe.encoders[0].name == "minilm" and recipe.encoders[0].quant == "int8"


def test_a_tflite_encoder_without_the_converter_is_refused_before_any_work(tmp_path, tiny_gguf):
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the TFLite converter is installed here: nothing to refuse")
    entry = '[encoders.minilm]\nsource = "{encoder}"'
    path = write_recipe(tmp_path, tiny_gguf, RECIPE.replace(entry, entry + '\nruntime = "both"'))
    result = run_cli("build", "--recipe", str(path), "-o", str(tmp_path / "x.edgepack"), "--no-eval", "-q")
    assert result.returncode == 1 and "litert-torch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.edgepack").exists()


@pytest.fixture(scope="module")
def agents_store(tmp_path_factory, tiny_gguf):
    """The recipe built by the real `edgepack build` (a child process: torch stays out of this one), installed."""
    folder = tmp_path_factory.mktemp("recipe")
    bundle = folder / "agents.edgepack"
    result = run_cli("build", "--recipe", str(write_recipe(folder, tiny_gguf)), "-o", str(bundle), "--no-eval",
                     "--threads", "2", "-q", timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r"encoder minilm \(onnx\): int8, 384 dimensions, cosine to the source model 0\.99\d\d",
                     result.stdout)
    store = folder / "store"
    Store(store).install(bundle)
    return store, bundle


def test_the_bundle_carries_the_encoder_beside_the_model(agents_store):
    _, bundle = agents_store
    manifest = bundle_manifest(bundle)
    (encoder,) = manifest.encoders
    assert encoder.name == "minilm" and encoder.quant == "int8" and encoder.quality["tier"] == "general"
    assert {a.name: a.semantic_embedder for a in manifest.agents} == {"faq": "minilm", "plain": None}
    model_blobs = set(manifest.models[0].segments)
    assert model_blobs.isdisjoint({encoder.graph, encoder.tokenizer, *encoder.segments})


def semantic_hits(base):
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r'^edgepack_cache_requests_total\{result="semantic"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def ask(base, agent, question):
    status, doc = post_json(f"{base}/v1/chat/completions",
                            {"model": agent, "messages": [{"role": "user", "content": question}]})
    assert status == 200, doc
    return doc["choices"][0]["message"]["content"]


def test_the_agents_semantic_cache_embeds_with_the_named_encoder(agents_store):
    """MiniLM (fp32, sentence-transformers): the paraphrase scores 0.967, the near misses 0.776 and 0.663."""
    store, _ = agents_store
    with serving(store, "--threads", "2", "--no-cache") as base:
        first = ask(base, "faq", "How many legs does a spider have?")
        assert semantic_hits(base) == 0
        assert ask(base, "faq", "How many legs do spiders have?") == first
        assert semantic_hits(base) == 1
        ask(base, "faq", "How many legs does an ant have?")  # near misses: generated, no semantic hit
        ask(base, "faq", "What is the capital of Germany?")
        assert semantic_hits(base) == 1
        ask(base, "plain", "How many legs does a spider have?")
        ask(base, "plain", "How many legs do spiders have?")  # no semantic cache for this agent
        assert semantic_hits(base) == 1
        status, doc = post_json(f"{base}/v1/embeddings", {"model": "minilm", "input": "spiders"})
        assert status == 200 and len(doc["data"][0]["embedding"]) == 384
        status, by_agent = post_json(f"{base}/v1/embeddings", {"model": "faq", "input": "spiders"})
        assert status == 200 and by_agent["model"] == "minilm" and by_agent["data"] == doc["data"]
        status, doc = post_json(f"{base}/v1/embeddings", {"model": "plain", "input": "spiders"})
        assert status == 404 and "encoder 'plain' does not exist" in doc["error"]["message"]
