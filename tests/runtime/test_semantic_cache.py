"""Semantic cache: lookups by similarity within a partition, expiry, LRU; the embedder on a tiny model and on
the real Gemma 3 270M (paraphrases hit, unrelated requests do not)."""

from __future__ import annotations

import threading

import llama_cpp
import numpy as np
import pytest
from conftest import Clock

from edgepack.runtime import embedder as embedder_mod
from edgepack.runtime import llama
from edgepack.runtime.embedder import Embedder
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.response_cache import CachedAnswer
from edgepack.runtime.semantic_cache import DEFAULT_THRESHOLD, SemanticCache, partition_key

SAMPLING = {"max_tokens": 64, "temperature": 0.0, "top_p": 0.95}
PART = partition_key("sha256-" + "a" * 64, "helper", "chat", SAMPLING)


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, "stop", 5, 3)


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def at_angle(cosine: float) -> np.ndarray:
    """A unit vector whose cosine similarity with (1, 0, 0) is `cosine`."""
    return np.array([cosine, np.sqrt(1 - cosine**2), 0.0], dtype=np.float32)


# ---- the cache, with hand-made vectors ----


def test_a_similar_vector_hits_with_its_similarity():
    cache = SemanticCache(threshold=0.9)
    cache.put(PART, unit(1, 0, 0), answer("Paris"))
    hit = cache.lookup(PART, at_angle(0.95))
    assert hit is not None and hit[0].text == "Paris" and hit[1] == pytest.approx(0.95, abs=1e-6)


def test_a_vector_below_the_threshold_misses():
    cache = SemanticCache(threshold=0.9)
    cache.put(PART, unit(1, 0, 0), answer("Paris"))
    assert cache.lookup(PART, at_angle(0.89)) is None
    assert cache.lookup(PART, unit(0, 1, 0)) is None


def test_the_most_similar_entry_wins_and_vectors_need_not_be_normalised():
    cache = SemanticCache(threshold=0.5)
    cache.put(PART, 3 * unit(1, 0, 0), answer("x"))
    cache.put(PART, unit(1, 1, 0), answer("xy"))
    hit = cache.lookup(PART, np.array([10.0, 8.0, 0.0]))
    assert hit is not None and hit[0].text == "xy"


def test_entries_expire_after_the_ttl_and_a_hit_does_not_extend_it():
    clock = Clock()
    cache = SemanticCache(ttl=60, clock=clock)
    cache.put(PART, unit(1, 0, 0), answer("Paris"))
    clock.now += 59
    assert cache.lookup(PART, unit(1, 0, 0)) is not None
    clock.now += 1
    assert cache.lookup(PART, unit(1, 0, 0)) is None
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first():
    cache = SemanticCache(threshold=0.99, max_entries=2)
    cache.put(PART, unit(1, 0, 0), answer("a"))
    cache.put(PART, unit(0, 1, 0), answer("b"))
    assert cache.lookup(PART, unit(1, 0, 0)) is not None  # "a" is now the most recent
    cache.put(PART, unit(0, 0, 1), answer("c"))
    assert len(cache) == 2
    assert cache.lookup(PART, unit(0, 1, 0)) is None
    assert cache.lookup(PART, unit(1, 0, 0))[0].text == "a"
    assert cache.lookup(PART, unit(0, 0, 1))[0].text == "c"


def test_the_same_vector_replaces_its_entry():
    cache = SemanticCache()
    cache.put(PART, unit(1, 0, 0), answer("old"))
    cache.put(PART, unit(1, 0, 0), answer("new"))
    assert len(cache) == 1 and cache.lookup(PART, unit(1, 0, 0))[0].text == "new"


@pytest.mark.parametrize("other", [
    partition_key("sha256-" + "b" * 64, "helper", "chat", SAMPLING),  # another model (a new release)
    partition_key("sha256-" + "a" * 64, "other-agent", "chat", SAMPLING),
    partition_key("sha256-" + "a" * 64, "helper", "completion", SAMPLING),
    partition_key("sha256-" + "a" * 64, "helper", "chat", {**SAMPLING, "max_tokens": 65}),
    partition_key("sha256-" + "a" * 64, "helper", "chat", SAMPLING, context="earlier turns"),
])
def test_partitions_isolate(other):
    cache = SemanticCache()
    cache.put(PART, unit(1, 0, 0), answer("Paris"))
    assert other != PART
    assert cache.lookup(other, unit(1, 0, 0)) is None
    assert cache.lookup(PART, unit(1, 0, 0)) is not None


def test_partition_keys_do_not_depend_on_dict_order():
    reordered = dict(reversed(list(SAMPLING.items())))
    assert partition_key("sha256-" + "a" * 64, "helper", "chat", reordered) == PART


def test_bad_settings_and_vectors_are_refused():
    with pytest.raises(EdgepackError, match="threshold"):
        SemanticCache(threshold=1.5)
    with pytest.raises(EdgepackError, match="ttl"):
        SemanticCache(ttl=0)
    cache = SemanticCache()
    with pytest.raises(EdgepackError, match="non-zero"):
        cache.put(PART, np.zeros(3), answer("x"))
    cache.put(PART, unit(1, 0, 0), answer("x"))
    with pytest.raises(EdgepackError, match="dimension"):
        cache.lookup(PART, unit(1, 0, 0, 0))


# ---- the embedder on a tiny generated model ----


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    model = llama.load_model([tiny_gguf])
    yield model
    llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model):
    embedder = Embedder(tiny_model, threads=1, n_ctx=128)
    yield embedder
    embedder.close()


def test_embeddings_are_unit_float32_vectors_of_the_model_width(tiny_embedder):
    vector = tiny_embedder.embed("what is the time")
    assert tiny_embedder.method == "prompt, last token"
    assert vector.shape == (256,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_the_same_text_gives_the_same_vector_and_another_text_another(tiny_embedder):
    first = tiny_embedder.embed("what is the time")
    assert np.allclose(first, tiny_embedder.embed("what is the time"), atol=1e-6)
    assert float(first @ tiny_embedder.embed("write a word about the sea")) < 0.999


def test_a_long_text_keeps_its_end(tiny_embedder):
    """Texts that end alike for longer than the context are cut to the same tokens; a change at the end counts."""
    ending = " the end of it is what matters" * 20
    long_a, long_b = "a " * 200 + ending, "we can " * 150 + ending
    assert len(tiny_embedder.tokens(long_a)) == tiny_embedder.n_ctx
    assert tiny_embedder.tokens(long_a) == tiny_embedder.tokens(long_b)
    assert np.allclose(tiny_embedder.embed(long_a), tiny_embedder.embed(long_b), atol=1e-6)
    assert float(tiny_embedder.embed(long_a) @ tiny_embedder.embed(long_a + " hot")) < 0.999


def test_threads_share_one_embedder(tiny_embedder):
    texts = ["what is the time", "write a word", "how hot is it", "the sea"]
    expected = [tiny_embedder.embed(t) for t in texts]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = tiny_embedder.embed(texts[i % 4])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.allclose(results[i], expected[i % 4], atol=1e-6) for i in range(8))


def test_an_embedding_model_is_pooled_as_it_declares(tiny_model, monkeypatch):
    """A model whose GGUF declares a pooling type gets it, with no prompt around the text."""
    assert embedder_mod.declared_pooling(tiny_model) is None
    monkeypatch.setattr(embedder_mod, "declared_pooling", lambda model: llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    pooled = Embedder(tiny_model, threads=1, n_ctx=128)
    try:
        assert pooled.method == "mean pooling"
        assert pooled.tokens("what is the time")[1:] == embedder_mod._tokens(pooled._vocab, "what is the time")
        vector = pooled.embed("what is the time")
        assert vector.shape == (256,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    finally:
        pooled.close()


def test_empty_text_and_a_closed_embedder_are_refused(tiny_model):
    embedder = Embedder(tiny_model, threads=1, n_ctx=128)
    with pytest.raises(EdgepackError, match="empty"):
        embedder.embed("")
    embedder.close()
    embedder.close()
    with pytest.raises(EdgepackError, match="closed"):
        embedder.embed("the sea")
    with pytest.raises(EdgepackError, match="too small"):
        Embedder(tiny_model, threads=1, n_ctx=12)


# ---- the real model: Gemma 3 270M's own weights ----

# Measured on Gemma 3 270M Q4_K_M (docs/semantic-cache.md): paraphrases 0.82-0.97, unrelated 0.33-0.60 with the
# user's message embedded. The pairs here sit at least 0.04 from the default threshold, so kernel differences
# between CPUs (a few thousandths) cannot flip them.
PARAPHRASES = [
    ("How do I reverse a list in Python?", "python: how can I reverse a list"),
    ("Who wrote Romeo and Juliet?", "who is the author of Romeo and Juliet"),
    ("How many legs does a spider have?", "How many legs do spiders have?"),
    ("Explain what a neural network is.", "What is a neural network? Explain it."),
]
UNRELATED = [
    ("What is the capital of France?", "Write a haiku about the sea"),
    ("How do I reverse a list in Python?", "What is the boiling point of water?"),
    ("Give me a recipe for pancakes.", "Explain what a neural network is."),
    ("Turn off the living room lights.", "What's the weather tomorrow in Paris?"),
]
SYSTEM = "You are a helpful home assistant on a small device. Answer briefly, in one or two sentences."


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from edgepack.packager.demo import default_model

    model = llama.load_model([default_model(tmp_path_factory.mktemp("gemma"))])
    embedder = Embedder(model, threads=1)  # one thread: steady timing on a busy 2-core machine
    yield embedder
    embedder.close()
    llama_cpp.llama_model_free(model)


def similarities(embedder: Embedder, pairs: list[tuple[str, str]], form: str = "{}") -> list[float]:
    return [float(embedder.embed(form.format(a)) @ embedder.embed(form.format(b))) for a, b in pairs]


@pytest.mark.real_model
def test_gemma_paraphrases_hit_and_unrelated_requests_do_not(gemma):
    paraphrases, unrelated = similarities(gemma, PARAPHRASES), similarities(gemma, UNRELATED)
    print(f"paraphrases {paraphrases}\nunrelated {unrelated}")
    assert min(paraphrases) >= DEFAULT_THRESHOLD + 0.03
    assert max(unrelated) <= DEFAULT_THRESHOLD - 0.2


@pytest.mark.real_model
def test_gemma_the_users_message_separates_better_than_the_rendered_prompt(gemma):
    """Why the server embeds the user's last message: a rendered prompt's shared template and system prompt
    pull every request together."""
    rendered = f"<start_of_turn>user\n{SYSTEM}\n\n{{}}<end_of_turn>\n<start_of_turn>model\n"

    def gap(form: str) -> float:
        return min(similarities(gemma, PARAPHRASES, form)) - max(similarities(gemma, UNRELATED, form))

    assert gap("{}") > gap(rendered) + 0.1


@pytest.mark.real_model
def test_gemma_semantic_cache_round_trip(gemma):
    cache = SemanticCache()
    cache.put(PART, gemma.embed("How many legs does a spider have?"), answer("Eight."))
    hit = cache.lookup(PART, gemma.embed("How many legs do spiders have?"))
    assert hit is not None and hit[0].text == "Eight." and hit[1] >= DEFAULT_THRESHOLD
    assert cache.lookup(PART, gemma.embed("Write a haiku about the sea")) is None
