"""Constrained answers (response_format, json_schema, grammar), log-probabilities and logit_bias, over HTTP.

The tiny model is random: whatever it writes under a grammar is only what the grammar allows, so these
checks would catch a grammar that is not applied.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from conftest import post_json

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer"},  # (llama-cpp-python's converter ignores minimum/maximum)
    },
    "required": ["ok", "colour", "count"],
    "additionalProperties": False,
}


def chat(server: str, **body) -> tuple[int, dict]:
    doc = {"model": "tiny", "messages": [{"role": "user", "content": "Describe the weather."}], "max_tokens": 60,
           **body}
    return post_json(server + "/v1/chat/completions", doc)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_response_is_valid_json_of_that_schema(server, seed):
    status, doc = chat(server, temperature=1.0, seed=seed,
                       response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert status == 200, doc
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(choice["message"]["content"])
    assert set(answer) == {"ok", "colour", "count"} and isinstance(answer["ok"], bool)
    assert answer["colour"] in ("red", "green", "blue") and type(answer["count"]) is int


def test_llama_server_grammar_and_json_schema_fields_on_completions(server):
    body = {"model": "tiny", "prompt": "Answer:", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    status, doc = post_json(server + "/v1/completions", {**body, "grammar": 'root ::= "yes" | "no"'})
    assert status == 200 and doc["choices"][0]["text"] in ("yes", "no"), doc
    status, doc = post_json(server + "/v1/completions", {**body, "max_tokens": 60, "json_schema": SCHEMA})
    assert status == 200 and set(json.loads(doc["choices"][0]["text"])) == {"ok", "colour", "count"}, doc


@pytest.mark.parametrize(("body", "param"), [
    ({"grammar": "root ::= nothing-defined"}, "grammar"),
    ({"grammar": "this is not gbnf"}, "grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "https://x.example/s"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "json_schema"),
    ({"logit_bias": {"999999999": -100}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_a_bad_constraint_or_sampling_control_is_a_400_naming_it(server, body, param):
    status, doc = chat(server, **body)
    assert status == 400 and doc["error"]["param"] == param, doc


def test_logprobs_are_the_models_and_greedy_picks_the_top_one(server):
    # the whole prompt processed each time (no prefix reuse), so both answers come from the same computation
    status, doc = chat(server, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, cache_prompt=False)
    assert status == 200, doc
    content = doc["choices"][0]["logprobs"]["content"]
    assert len(content) == doc["usage"]["completion_tokens"] == 6
    assert "".join(e["token"] for e in content) == doc["choices"][0]["message"]["content"]
    for entry in content:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and sum(math.exp(x) for x in top) <= 1 + 1e-6
        assert entry["logprob"] == pytest.approx(top[0]) and entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    status, plain = chat(server, temperature=0, max_tokens=6, cache_prompt=False)
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == doc["choices"][0]["message"]


def test_completion_logprobs_streamed_match_the_whole_answers(server):
    body = {"model": "tiny", "prompt": "the", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    status, whole = post_json(server + "/v1/completions", body)
    assert status == 200
    logprobs = whole["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == whole["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0 and all(len(t) == 2 for t in logprobs["top_logprobs"])
    streamed = []
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])["choices"][0]
                streamed += chunk["logprobs"]["token_logprobs"] if chunk["logprobs"] else []
    assert streamed == logprobs["token_logprobs"]


def test_logit_bias_forces_and_bans_tokens(server):
    body = {"model": "tiny", "prompt": "the", "max_tokens": 1, "temperature": 0, "logprobs": 0}

    def first_token(bias: dict[int, float]) -> str:
        biases = {str(k): v for k, v in bias.items()}
        status, doc = post_json(server + "/v1/completions", {**body, "logit_bias": biases})
        assert status == 200, doc
        return doc["choices"][0]["logprobs"]["tokens"][0]

    plain = first_token({})
    a, b = 300, 301  # two ordinary tokens of the tiny vocabulary
    forced = first_token({a: 100})
    assert forced != plain and first_token({b: 100}) not in (forced, plain)
    assert first_token({a: -100, b: 100}) == first_token({b: 100})  # -100 bans: a never wins
    assert first_token({a: 100, b: 99}) == forced
