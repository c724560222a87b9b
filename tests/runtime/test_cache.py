"""Response caches: L1 (memory, LRU + TTL), L2 (SQLite, survives restarts), keys, and over HTTP."""

from __future__ import annotations

import json

import httpx
from conftest import Clock, start_server, stop_server, wait_ready

from edgepack.runtime.response_cache import CachedAnswer, ResponseCache, cache_key

ANSWER = CachedAnswer("Paris.", "stop", 7, 2)


def test_l1_hits_expires_and_evicts_least_recently_used():
    clock = Clock()
    cache = ResponseCache(None, l1_entries=2, l1_ttl=60, clock=clock)
    cache.put("a", ANSWER)
    assert cache.get("a") == ("l1", ANSWER)
    cache.put("b", ANSWER)
    cache.get("a")  # a is now the most recent
    cache.put("c", ANSWER)
    assert cache.get("b") == (None, None) and cache.get("a")[0] == "l1"
    clock.now += 61
    assert cache.get("a") == (None, None)


def test_l2_survives_a_restart_and_expires(tmp_path):
    clock = Clock()
    path = tmp_path / "cache" / "responses.sqlite"
    first = ResponseCache(path, l1_ttl=60, l2_ttl=3600, clock=clock)
    first.put("k", ANSWER)
    first.close()
    second = ResponseCache(path, l1_ttl=60, l2_ttl=3600, clock=clock)
    assert second.get("k") == ("l2", ANSWER)
    assert second.get("k") == ("l1", ANSWER)  # promoted
    clock.now += 3601
    third = ResponseCache(path, l1_ttl=60, l2_ttl=3600, clock=clock)
    assert third.get("k") == (None, None)


def test_keys_depend_on_model_digest_agent_prompt_and_sampling():
    base = cache_key("d1", "agent", "chat", "hi", {"temperature": 0, "max_tokens": 8})
    assert base == cache_key("d1", "agent", "chat", "hi", {"max_tokens": 8, "temperature": 0})
    others = [
        cache_key("d2", "agent", "chat", "hi", {"temperature": 0, "max_tokens": 8}),
        cache_key("d1", "other", "chat", "hi", {"temperature": 0, "max_tokens": 8}),
        cache_key("d1", "agent", "text", "hi", {"temperature": 0, "max_tokens": 8}),
        cache_key("d1", "agent", "chat", "hi!", {"temperature": 0, "max_tokens": 8}),
        cache_key("d1", "agent", "chat", "hi", {"temperature": 0, "max_tokens": 9}),
    ]
    assert len({base, *others}) == 6


def _cache_metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("edgepack_cache_requests_total{"):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def test_http_deterministic_requests_hit_l1_then_l2_after_restart(tiny_bundle, tmp_path):
    from edgepack.runtime.store import Store

    store = tmp_path / "store"
    Store(store).install(tiny_bundle)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "the way"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    process, base = start_server(store, "--threads", "1")
    try:
        wait_ready(base, process)
        first = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).json()
        again = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).json()
        assert again["choices"] == first["choices"] and again["usage"] == first["usage"]
        streamed = httpx.post(base + "/v1/chat/completions", json={**body, "stream": True}, timeout=30).text
        events = [json.loads(line[6:]) for line in streamed.splitlines()
                  if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert text == first["choices"][0]["message"]["content"]
        sampled = {**body, "temperature": 0.7, "seed": 1}
        httpx.post(base + "/v1/chat/completions", json=sampled, timeout=30)
        assert _cache_metrics(base) == {"miss": 1.0, "l1": 2.0}  # temperature 0.7: not cached at all
    finally:
        stop_server(process)
    process, base = start_server(store, "--threads", "1")
    try:
        wait_ready(base, process)
        after = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).json()
        assert after["choices"] == first["choices"]
        assert _cache_metrics(base) == {"l2": 1.0}
    finally:
        stop_server(process)
    assert (store / "cache" / "responses.sqlite").is_file()


def test_semantic_cache_over_http(served_store):
    """Exact caches off: an identical user message is a semantic hit; another system prompt (an exact part of
    the key) or a sampled request is not."""
    process, base = start_server(served_store, "--threads", "1", "--no-cache", "--semantic-cache", "0.99")
    try:
        wait_ready(base, process)

        def ask(system: str, **extra) -> str:
            body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": "the time"}],
                    **extra}
            response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        def outcomes() -> dict[str, float]:
            found = {}
            for line in httpx.get(base + "/metrics").text.splitlines():
                if line.startswith("edgepack_cache_requests_total{"):
                    found[line.split('"')[1]] = float(line.split()[-1])
            return found

        first = ask("be brief")
        assert outcomes() == {"miss": 1.0}
        assert ask("be brief") == first
        assert outcomes() == {"miss": 1.0, "semantic": 1.0}
        ask("be verbose")
        assert outcomes() == {"miss": 2.0, "semantic": 1.0}
        ask("be brief", temperature=0.7)  # sampled: not looked up at all
        assert outcomes() == {"miss": 2.0, "semantic": 1.0}
        assert "edgepack_semantic_cache_entries 2.0" in httpx.get(base + "/metrics").text
    finally:
        stop_server(process)


def test_a_damaged_l2_file_or_row_is_set_aside_not_fatal(tmp_path, served_store):
    import sqlite3

    path = tmp_path / "cache" / "responses.sqlite"
    path.parent.mkdir()
    path.write_bytes(b"this is not a database" * 100)
    cache = ResponseCache(path, l1_ttl=0, l2_ttl=3600)
    assert "was unreadable" in cache.warning and len(list(path.parent.glob("responses.sqlite.damaged-*"))) == 1
    cache.put("k", ANSWER)
    assert cache.get("k") == ("l2", ANSWER)
    cache.close()
    with sqlite3.connect(path) as db:  # a row whose answer is garbage: a miss, and the row goes
        db.execute("UPDATE answers SET answer = 'nonsense{' WHERE key = 'k'")
    cache = ResponseCache(path, l1_ttl=0, l2_ttl=3600)
    assert cache.warning is None and cache.get("k") == (None, None)
    cache.put("k", ANSWER)
    cache.close()
    with sqlite3.connect(path) as db:  # valid JSON of the wrong shape: a miss too, never a wrong answer
        db.execute("""UPDATE answers SET answer = '{"text": 5, "finish_reason": "stop", "prompt_tokens": 1,
                      "completion_tokens": 1}' WHERE key = 'k'""")
    cache = ResponseCache(path, l1_ttl=0, l2_ttl=3600)
    assert cache.get("k") == (None, None)
    cache.close()

    store_cache = served_store / "cache" / "responses.sqlite"  # the server starts anyway, and says why
    store_cache.parent.mkdir(exist_ok=True)
    store_cache.write_bytes(b"\x00garbage" * 500)
    process, base = start_server(served_store, "--threads", "1")
    try:
        wait_ready(base, process)
        body = {"model": "tiny", "prompt": "the", "max_tokens": 3, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        stop_server(process)
    assert "warning: response cache" in process.stderr.read()
