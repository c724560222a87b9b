"""Tool calling over HTTP with the official openai client: calls that parse, streamed as OpenAI streams them,
the tool's result sent back, and an agent's own tools from its recipe.

The tiny model is random, so a call it makes under tool_choice "required" is only as good as the grammar.
"""

from __future__ import annotations

import json

import openai
import pytest
from conftest import post_json, run_cli, serving
from tiny_model import write_tiny_llama

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer"}, "metric": {"type": "boolean"}},
                   "required": ["city", "days", "metric"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for two days?"}]


@pytest.fixture(scope="module")
def server(served_store):
    """The tiny model with room for the tools' descriptions (its byte-level vocabulary spends a token a character)."""
    with serving(served_store, "--threads", "2", "--ctx", "4096") as base:
        yield base


def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def check_weather(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "days", "metric"} and isinstance(args["city"], str)
    assert type(args["days"]) is int and type(args["metric"]) is bool
    return args


@pytest.mark.parametrize("seed", range(5))
def test_a_required_call_always_parses_with_the_schemas_types(server, seed):
    answer = client(server).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed,
        max_tokens=400)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
        else:
            assert call.function.name == "get_time"
            assert json.loads(call.function.arguments)["zone"] in ("utc", "local")


def test_a_named_function_and_no_parallel_calls(server):
    for seed in range(3):
        answer = client(server).chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=400,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
        calls = answer.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_time"


def test_a_streamed_call_arrives_as_openai_deltas_and_matches_the_whole_answer(server):
    request = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                   max_tokens=400, extra_body={"cache_prompt": False})
    whole = client(server).chat.completions.create(**request).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client(server).chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            if part.id:
                assert call["id"] is None and part.function.name  # id and name come once, first
                call["id"], call["name"] = part.id, part.function.name
            call["arguments"] += part.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    check_weather(calls[0]["arguments"])


def test_the_agent_loop_sends_the_result_back_and_gets_an_answer(server):
    api = client(server)
    first = api.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=400)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 24 C"}'}]
    final = api.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=8)
    assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].message.tool_calls
    status, shown = post_json(server + "/apply-template", {"model": "tiny", "messages": history, "tools": [WEATHER]})
    assert status == 200 and "sunny, 24 C" in shown["prompt"] and "get_weather" in shown["prompt"], shown


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "hi"}]}, "messages[0].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "user", "content": "and?"}]}, "messages[2]"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_a_bad_tool_request_is_a_400_naming_the_field(server, body, param):
    status, doc = post_json(server + "/v1/chat/completions", {"model": "tiny", "messages": ASK, **body})
    assert status == 400 and doc["error"]["param"] == param, doc


def test_an_agents_own_tools_and_choice_apply_when_the_request_has_none(tmp_path):
    write_tiny_llama(tmp_path / "base.gguf")
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    (tmp_path / "edgepack.toml").write_text(
        "[models.base]\nsource = 'base.gguf'\nquant = 'keep'\n"
        "[agents.forecaster]\nmodel = 'base'\ntools = 'tools.json'\ntool_choice = 'required'\nmax_tokens = 400\n")
    bundle = tmp_path / "a.edgepack"
    assert run_cli("build", "--recipe", str(tmp_path / "edgepack.toml"), "-o", str(bundle), "--no-eval",
                   "-q").returncode == 0
    assert run_cli("install", str(bundle), "--store", str(tmp_path / "store")).returncode == 0
    with serving(tmp_path / "store", "--threads", "1", "--ctx", "4096") as base:
        answer = client(base).chat.completions.create(model="forecaster", messages=ASK, temperature=0)
        assert answer.choices[0].finish_reason == "tool_calls"
        check_weather(answer.choices[0].message.tool_calls[0].function.arguments)
        plain = client(base).chat.completions.create(model="forecaster", messages=ASK, temperature=0,
                                                     tool_choice="none", max_tokens=5)
        assert not plain.choices[0].message.tool_calls  # the request's own choice wins
