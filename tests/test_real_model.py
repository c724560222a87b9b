"""End to end on the real embedded model (Gemma 3 270M Q4_K_M): build, install, serve, ask, run."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import run_cli, start_server, stop_server, wait_ready

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma_store(tmp_path_factory):
    from edgepack.packager.demo import default_model

    work = tmp_path_factory.mktemp("gemma")
    source = default_model(work)
    bundle = work / "gemma.edgepack"
    built = run_cli("build", str(source), "-o", str(bundle), "--name", "gemma3-270m", "--board", "rpi5")
    assert built.returncode == 0, built.stderr
    assert "already quantized (Q4_K_M)" in built.stderr and "chat template: gemma" in built.stderr
    manifest = json.loads(run_cli("inspect", str(bundle), "--json").stdout)
    model = manifest["models"][0]
    assert model["architecture"] == "gemma3" and model["file_type"] == "Q4_K_M"
    assert model["chat_template"] == "gemma" and len(model["segments"]) == 8
    assert sum(b["zsize"] for b in manifest["blobs"].values()) < source.stat().st_size
    store = work / "store"
    installed = run_cli("install", str(bundle), "--store", str(store))
    assert installed.returncode == 0, installed.stderr
    return store, source


@pytest.fixture(scope="module")
def reference_completion(gemma_store):
    """llama-cpp-python's own high-level API on the original file: what greedy decoding must give."""
    from llama_cpp import Llama

    llm = Llama(str(gemma_store[1]), n_ctx=512, n_threads=2, verbose=False)
    try:
        return llm.create_completion(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()


PROMPT = "The capital of France is"


def test_gemma_answers_over_the_openai_api(gemma_store, reference_completion):
    process, base = start_server(gemma_store[0], "--threads", "2")
    try:
        wait_ready(base, process, timeout=120)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0,
        )
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0 and text.strip()
        stream = client.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0, stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        completion = client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=8, temperature=0)
        assert completion.choices[0].text == reference_completion
    finally:
        stop_server(process)


def test_gemma_one_shot_run(gemma_store, reference_completion):
    result = run_cli("run", "--store", str(gemma_store[0]), "--raw", "--max-tokens", "8", PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_completion + "\n"
    assert "tok/s" in result.stderr


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}


def test_gemma_calls_a_tool_gets_its_result_and_answers(gemma_store):
    process, base = start_server(gemma_store[0], "--threads", "2")
    try:
        wait_ready(base, process, timeout=120)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
        first = client.chat.completions.create(model="gemma3-270m", messages=ask, tools=[WEATHER],
                                               tool_choice="required", parallel_tool_calls=False, temperature=0,
                                               max_tokens=120)
        assert first.choices[0].finish_reason == "tool_calls"
        call = first.choices[0].message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and isinstance(args["city"], str)
        assert args["unit"] in ("celsius", "fahrenheit")
        history = ask + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "snow", "temperature": -3}'}]
        final = client.chat.completions.create(model="gemma3-270m", messages=history, tools=[WEATHER],
                                               tool_choice="none", temperature=0, max_tokens=40)
        assert final.choices[0].message.content.strip() and not final.choices[0].message.tool_calls
        shaped = client.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "Name a colour and a number."}],
            temperature=0, max_tokens=60, response_format={"type": "json_schema", "json_schema": {
                "name": "pick", "schema": {"type": "object", "properties": {
                    "colour": {"type": "string", "maxLength": 20}, "number": {"type": "integer"}},
                    "required": ["colour", "number"]}}})
        picked = json.loads(shaped.choices[0].message.content)
        assert isinstance(picked["colour"], str) and type(picked["number"]) is int
    finally:
        stop_server(process)
