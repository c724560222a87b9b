"""llama-server's API on `edgepack serve`, over a real socket: the OpenAI routes without /v1, native /completion
(whole and streamed, token-id prompts, n_probs, stop words, logit_bias, grammar), /tokenize, /detokenize,
/apply-template, /props, /slots, and 4xx answers naming the bad field."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import httpx
import pytest
from conftest import post_json, start_server, stop_server, wait_ready

GREEDY = {"temperature": 0, "ignore_eos": True}


def stream_events(url: str, doc: dict) -> list[dict]:
    """The `data:` events of a streamed answer (each must be JSON: llama-server's stream has no [DONE])."""
    request = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(block.startswith("data: ") for block in events), text
    return [json.loads(block.removeprefix("data: ")) for block in events]


def completion(server: str, **doc: object) -> dict:
    status, body = post_json(server + "/completion", {"prompt": "the way", **doc})
    assert status == 200, body
    return body


def test_routes_without_the_v1_prefix_are_llama_servers(server):
    assert httpx.get(server + "/models").json() == httpx.get(server + "/v1/models").json()
    chat = {"messages": [{"role": "user", "content": "the time"}], "max_tokens": 6, **GREEDY}
    _, with_prefix = post_json(server + "/v1/chat/completions", chat)
    status, without = post_json(server + "/chat/completions", chat)
    assert status == 200 and without["choices"][0]["message"] == with_prefix["choices"][0]["message"]
    # llama-server's /completions is its native completion, as /completion (OpenAI's is /v1/completions)
    text = {"prompt": "the word", "n_predict": 6, **GREEDY}
    _, openai_body = post_json(server + "/v1/completions", {**text, "max_tokens": 6})
    status, native = post_json(server + "/completions", text)
    assert status == 200 and native["content"] == openai_body["choices"][0]["text"] and native["stop"] is True


def test_native_completion_matches_the_openai_route_with_llama_server_fields(server):
    _, openai_body = post_json(server + "/v1/completions", {"prompt": "the way", "max_tokens": 8, **GREEDY})
    body = completion(server, n_predict=8, **GREEDY)
    assert body["content"] == openai_body["choices"][0]["text"]
    assert body["stop"] is True and body["stop_type"] == "limit" and body["truncated"] is False
    assert body["tokens_predicted"] == 8
    assert body["tokens_evaluated"] == openai_body["usage"]["prompt_tokens"]
    assert body["model"] == "tiny" and body["prompt"] == "the way"
    assert "completion_probabilities" not in body


def test_native_stream_is_llama_servers(server):
    seeded = {"n_predict": 10, "temperature": 0.7, "seed": 5, "ignore_eos": True}  # not answered from the cache
    whole = completion(server, **seeded)
    events = stream_events(server + "/completion", {"prompt": "the way", "stream": True, **seeded})
    *pieces, last = events
    assert pieces and all(e["stop"] is False for e in pieces)
    assert "".join(e["content"] for e in pieces) == whole["content"]
    assert last["stop"] is True and last["content"] == "" and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 10 and last["timings"]["predicted_n"] == 10
    assert last["tokens_evaluated"] == whole["tokens_evaluated"]


def test_timings_count_what_was_computed(server):
    sampled = {"n_predict": 12, "temperature": 0.7, "seed": 3, "ignore_eos": True}  # not answered from the cache
    first = completion(server, prompt="the hot word of the way", **sampled)
    timings = first["timings"]
    assert timings["predicted_n"] == 12 and timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0
    assert timings["prompt_n"] + timings["cache_n"] == first["tokens_evaluated"]
    again = completion(server, prompt="the hot word of the way", **sampled)
    assert again["content"] == first["content"]  # same seed
    assert again["tokens_cached"] == again["timings"]["cache_n"] > 0  # the slot kept the prompt
    fresh = completion(server, prompt="the hot word of the way", cache_prompt=False, **sampled)
    assert fresh["timings"]["cache_n"] == 0 and fresh["timings"]["prompt_n"] == fresh["tokens_evaluated"]
    # a deterministic request answered again from the response cache computed nothing
    greedy = {"prompt": "what is the word", "n_predict": 5, **GREEDY}
    computed, cached = completion(server, **greedy), completion(server, **greedy)
    assert cached["content"] == computed["content"] and cached["tokens_predicted"] == 5
    assert computed["timings"]["predicted_n"] == 5
    assert cached["timings"]["predicted_n"] == 0 and cached["timings"]["prompt_n"] == 0


def test_token_id_prompt_is_the_same_prompt(server):
    _, tokenized = post_json(server + "/tokenize", {"content": "the way", "add_special": True})
    by_text = completion(server, n_predict=8, **GREEDY)
    by_ids = completion(server, prompt=tokenized["tokens"], n_predict=8, **GREEDY)
    assert by_ids["content"] == by_text["content"]
    assert by_ids["tokens_evaluated"] == len(tokenized["tokens"]) == by_text["tokens_evaluated"]
    # without the BOS token it is another prompt; token prompts bypass the response cache, which keys prompts by
    # text (and both of these have the same text)
    _, bare = post_json(server + "/tokenize", {"content": "the way"})
    assert bare["tokens"] == tokenized["tokens"][1:]
    for _ in range(2):
        again = completion(server, prompt=bare["tokens"], n_predict=8, **GREEDY)
        assert again["tokens_evaluated"] == len(bare["tokens"]) and again["timings"]["predicted_n"] == 8


def test_n_probs_whole_and_streamed(server):
    body = completion(server, n_predict=6, n_probs=3, **GREEDY)
    probabilities = body["completion_probabilities"]
    assert len(probabilities) == 6
    assert b"".join(bytes(p["bytes"]) for p in probabilities).decode("utf-8", "replace") == body["content"]
    for p in probabilities:
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"} and p["logprob"] <= 0
        top = p["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert p["logprob"] <= top[0]["logprob"]
    events = stream_events(server + "/completion",
                           {"prompt": "the way", "n_predict": 6, "n_probs": 3, "stream": True, **GREEDY})
    streamed = [p for e in events[:-1] for p in e.get("completion_probabilities", [])]
    assert [p["id"] for p in streamed] == [p["id"] for p in probabilities]


def test_stop_word_eos_and_logit_bias(server):
    full = completion(server, n_predict=10, **GREEDY)["content"]
    stop = full[2:4]
    cut = completion(server, n_predict=10, stop=[stop], **GREEDY)
    assert cut["content"] == full[: full.index(stop)]
    assert cut["stop_type"] == "word" and cut["stopping_word"] == stop
    # </s> (id 2) pushed up by a bias: the answer ends at once, by end of stream
    # (with a stop word given that never came: the end of stream is still told apart from it)
    eos = completion(server, n_predict=10, temperature=0, logit_bias=[[2, 100]], stop=["never said"])
    assert eos["content"] == "" and eos["stop_type"] == "eos" and eos["tokens_predicted"] == 0
    assert eos["stopping_word"] == ""
    # the greedy first token banned (false): another answer
    first = completion(server, n_predict=4, n_probs=1, **GREEDY)["completion_probabilities"][0]["id"]
    banned = completion(server, n_predict=4, n_probs=1, logit_bias={str(first): False}, **GREEDY)
    assert banned["completion_probabilities"][0]["id"] != first


def test_grammar_constrains_the_answer(server):
    body = completion(server, n_predict=12, grammar='root ::= ("yes" | "no") (" " ("yes" | "no"))*', **GREEDY)
    assert re.fullmatch(r"(yes|no)( (yes|no))*( (y|ye|n)?)?", body["content"]), body["content"]


def test_tokenize_and_detokenize(server):
    _, plain = post_json(server + "/tokenize", {"content": "the hot way"})
    _, special = post_json(server + "/tokenize", {"content": "the hot way", "add_special": True})
    assert len(special["tokens"]) == len(plain["tokens"]) + 1 and special["tokens"][1:] == plain["tokens"]
    _, pieces = post_json(server + "/tokenize", {"content": "the hot way", "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    raw = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                   for p in pieces["tokens"])
    assert any(isinstance(p["piece"], list) for p in pieces["tokens"])  # this vocabulary's byte tokens
    _, text = post_json(server + "/detokenize", {"tokens": plain["tokens"]})
    assert text["content"].encode() == raw and text["content"].endswith("way")


def test_apply_template_is_the_chat_routes_prompt(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the word"}]
    status, templated = post_json(server + "/apply-template", {"messages": messages})
    assert status == 200 and "what is the word" in templated["prompt"]
    _, tokens = post_json(server + "/tokenize", {"content": templated["prompt"], "add_special": True})
    _, chat = post_json(server + "/chat/completions", {"messages": messages, "max_tokens": 1, **GREEDY})
    assert len(tokens["tokens"]) == chat["usage"]["prompt_tokens"]


def test_props_and_slots(server):
    props = httpx.get(server + "/props").json()
    settings = props["default_generation_settings"]
    assert props["model_alias"] == "tiny" and props["total_slots"] >= 1 and props["chat_template"]
    assert "edgepack" in props["build_info"] and "llama.cpp" in props["build_info"]
    assert settings["params"]["temperature"] >= 0 and settings["params"]["n_predict"] >= 1
    assert settings["params"]["mirostat"] == 0 and settings["params"]["repeat_last_n"] == 64
    # the context size is the one a prompt is measured against
    status, doc = post_json(server + "/completion", {"prompt": "the " * 5000})
    assert status == 400 and f"context size ({settings['n_ctx']})" in doc["error"]["message"]
    response = httpx.get(server + "/props?model=nope")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    response = httpx.get(server + "/slots")
    assert response.status_code == 501 and "/metrics" in response.json()["error"]["message"]


def test_cors_is_off_by_default(server):
    response = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers


def test_prompt_alone_over_the_context_names_both_sizes(server):
    for route, doc, param in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the " * 5000}]}, "messages"),
        ("/v1/completions", {"prompt": "the " * 5000}, "prompt"),
        ("/completion", {"prompt": "the " * 5000, "n_predict": 4}, "prompt"),
    ):
        status, body = post_json(server + route, doc)
        message = body["error"]["message"]
        assert status == 400 and body["error"]["param"] == param, body
        assert "max_tokens" not in message and re.search(r"prompt alone \(\d+ tokens\).*context size \(\d+\)", message)


BAD_COMPLETIONS = [
    (b"[1]", 400, None),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": ["the", 1]}, 400, "prompt[0]"),
    ({"prompt": [1, 99999]}, 400, "prompt[1]"),
    ({"prompt": "x", "n_predict": 0}, 400, "n_predict"),
    ({"prompt": "x", "n_predict": -2}, 400, "n_predict"),
    ({"prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"prompt": "x", "n_probs": 50}, 400, "n_probs"),
    ({"prompt": "x", "stop": "word"}, 400, "stop"),
    ({"prompt": "x", "mirostat": 2}, 400, "mirostat"),
    ({"prompt": "x", "repeat_last_n": 16}, 400, "repeat_last_n"),
    ({"prompt": "x", "return_tokens": True}, 400, "return_tokens"),
    ({"prompt": "x", "grammar": "root ::= ("}, 400, "grammar"),
    ({"prompt": "x", "grammar": 'root ::= "a"', "json_schema": {}}, 400, "json_schema"),
    ({"prompt": "x", "logit_bias": [[1, True]]}, 400, "logit_bias[0]"),
    ({"prompt": "x", "logit_bias": [[99999, 1.0]]}, 400, "logit_bias"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_COMPLETIONS)
def test_bad_native_completions_get_json_4xx_naming_the_field(server, body, status, param):
    got, doc = post_json(server + "/completion", body)
    assert got == status, doc
    assert doc["error"]["param"] == param and doc["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "x", "parse_special": False}, "parse_special"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/apply-template", {"messages": []}, "messages"),
    ("/apply-template", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
])
def test_bad_bodies_of_the_other_routes(server, route, body, param):
    status, doc = post_json(server + route, body)
    assert status == 400 and doc["error"]["param"] == param, doc


def test_every_route_lets_go_of_the_model(served_store):
    """The routes hold the model while they use it and release it after, however they end (answer, stream,
    client gone mid-stream, 400): with a 1 s keep-alive it is then evicted."""
    process, base = start_server(served_store, "--threads", "2", "--keep-alive", "1s")
    try:
        wait_ready(base, process)
        post_json(base + "/tokenize", {"content": "the way"})
        httpx.get(base + "/props")
        post_json(base + "/apply-template", {"messages": [{"role": "user", "content": "hi"}]})
        completion(base, n_predict=4)
        stream_events(base + "/completion", {"prompt": "the way", "n_predict": 4, "stream": True})
        assert post_json(base + "/completion", {"prompt": [1, 99999]})[0] == 400
        with httpx.stream("POST", base + "/completion", json={"prompt": "the", "n_predict": 400, "stream": True,
                                                             "ignore_eos": True}) as response:
            next(response.iter_lines())  # the first event, then the client goes away
        deadline = time.monotonic() + 20
        while loaded(base) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not loaded(base)
    finally:
        stop_server(process)


def loaded(base: str) -> bool:
    text = httpx.get(base + "/metrics").text
    return 'edgepack_model_loaded{model="tiny"} 1.0' in text
