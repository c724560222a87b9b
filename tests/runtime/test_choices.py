"""`n` choices in one request, through the official openai client: each its own sequence in the batcher, the
later ones starting from the first's prompt cells; indices, usage, seeds, streaming, tool calls and limits."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import openai
import pytest
from conftest import post_json, serving

ASK = [{"role": "user", "content": "tell me about the sea"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                                           "days": {"type": "integer"}},
                                          "required": ["city", "days"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(served_store):
    """Four slots, so three choices run at once (and eight queue); room for a tool's description."""
    with serving(served_store, "--threads", "2", "--ctx", "4096", "--slots", "4") as base:
        yield base


def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def cached_prompt_tokens(server: str) -> float:
    with urllib.request.urlopen(server + "/metrics") as response:
        page = response.read().decode()
    found = re.search(r'^edgepack_prompt_cached_tokens_total\{model="tiny"\} (\S+)$', page, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_three_choices_have_indices_and_usage_sums_their_tokens(server):
    answer = client(server).chat.completions.create(model="tiny", messages=ASK, n=3, max_tokens=6, temperature=0.9,
                                                    extra_body={"ignore_eos": True})
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in answer.choices)
    single = client(server).chat.completions.create(model="tiny", messages=ASK, max_tokens=6, temperature=0.9,
                                                    extra_body={"ignore_eos": True})
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert answer.usage.completion_tokens == 18
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 18


def test_greedy_choices_share_the_prompt_and_equal_the_single_answer(server):
    """The later choices start from a copy of the first's prompt cells: a broken copy would change their text."""
    api = client(server)
    request = dict(model="tiny", messages=ASK, max_tokens=16, temperature=0,
                   extra_body={"ignore_eos": True, "cache_prompt": False})
    single = api.chat.completions.create(**request).choices[0].message.content
    before = cached_prompt_tokens(server)
    answer = api.chat.completions.create(**request, n=2)
    assert [c.message.content for c in answer.choices] == [single, single]
    deadline = time.monotonic() + 5  # the counter is updated as each sequence ends, beside the response
    while cached_prompt_tokens(server) - before < answer.usage.prompt_tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cached_prompt_tokens(server) - before == answer.usage.prompt_tokens  # the second read no prompt
    many = api.completions.create(model="tiny", prompt="the sea is", max_tokens=8, temperature=0, n=8,
                                  extra_body={"ignore_eos": True})  # more choices than slots: some wait
    assert len({c.text for c in many.choices}) == 1 and [c.index for c in many.choices] == list(range(8))


def test_seeded_choices_differ_and_the_request_is_reproducible(server):
    def texts() -> list[str]:
        answer = client(server).completions.create(model="tiny", prompt="once upon a time", n=3, max_tokens=12,
                                                   temperature=1.0, seed=42, extra_body={"ignore_eos": True})
        return [c.text for c in answer.choices]

    first = texts()
    assert first == texts()
    assert len(set(first)) > 1


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_streamed_choices_reassemble_to_the_whole_answers(server, kind):
    api = client(server)
    common = dict(model="tiny", n=2, max_tokens=10, temperature=0.8, seed=3,
                  extra_body={"ignore_eos": True, "cache_prompt": False})
    if kind == "chat":
        whole = [c.message.content for c in api.chat.completions.create(messages=ASK, **common).choices]
        stream = api.chat.completions.create(messages=ASK, stream=True, stream_options={"include_usage": True},
                                             **common)
    else:
        whole = [c.text for c in api.completions.create(prompt="the sea is", **common).choices]
        stream = api.completions.create(prompt="the sea is", stream=True, stream_options={"include_usage": True},
                                        **common)
    texts, finishes = ["", ""], [[], []]
    chunks = list(stream)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += (choice.delta.content or "") if kind == "chat" else choice.text
        if choice.finish_reason:
            finishes[choice.index].append(choice.finish_reason)
    assert texts == whole
    assert finishes == [["length"], ["length"]]  # one finish chunk per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_each_choice_makes_its_own_tool_call(server):
    answer = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[WEATHER],
        tool_choice="required", n=2, temperature=1.0, seed=5, max_tokens=300)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and type(args["days"]) is int
    assert answer.choices[0].message.tool_calls[0].id != answer.choices[1].message.tool_calls[0].id


def test_logprobs_come_per_choice(server):
    answer = client(server).chat.completions.create(model="tiny", messages=ASK, n=2, max_tokens=4, temperature=0,
                                                    logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    for choice in answer.choices:
        assert len(choice.logprobs.content) == 4 and len(choice.logprobs.content[0].top_logprobs) == 2


@pytest.mark.parametrize("n", [0, 9])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/chat/completions"])
def test_n_out_of_range_is_a_400_naming_n(server, n, route):
    body = {"model": "tiny", "n": n, "max_tokens": 2}
    body.update({"prompt": "hi"} if route == "/v1/completions" else {"messages": ASK})
    status, doc = post_json(server + route, body)
    assert status == 400 and doc["error"]["param"] == "n" and "n" in doc["error"]["message"], doc
