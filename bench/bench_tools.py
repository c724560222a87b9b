"""Tool calling as agents use it, measured: how often a required call parses (with the schema's types), the whole
agent loop (call -> tool result -> answer, also streamed) with the official openai client, and what the grammar
costs in decode speed (free text vs constrained JSON), on Gemma 3 270M and the tests' tiny model.

    .venv/bin/python bench/bench_tools.py [--requests 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import openai
from common import (
    OUT,
    ROOT,
    Spread,
    build_bundle,
    edgepack,
    free_port,
    local_url,
    model_path,
    new_client,
    running,
    serve_command,
    stream_completion,
    wait_ready,
    write_results,
)

sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import write_tiny_llama  # noqa: E402

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add_event", "description": "Put an event in the calendar",
     "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                                     "day": {"type": "integer"}, "all_day": {"type": "boolean"}},
                    "required": ["title", "day", "all_day"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80},
                                                     "limit": {"type": "integer"}}, "required": ["query"]}}},
]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Pune", "Quito", "Perth", "Cork", "Graz"]
ASKS = ["What is the weather in {city}?", "Add a meeting about {city} on day {n}.", "Search for news from {city}.",
        "Is it raining in {city} right now, in fahrenheit?", "Plan a trip to {city} on day {n}, all day."]
TYPES = {"string": str, "integer": int, "boolean": bool}


def valid(call, tools: list[dict]) -> bool:
    """The call names one of the tools and its arguments parse, with every required key and the schema's types."""
    schema = next((t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name), None)
    try:
        args = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return False
    if schema is None or not isinstance(args, dict) or not set(schema["required"]) <= set(args):
        return False
    for key, value in args.items():
        spec = schema["properties"].get(key)
        if spec is None or ("enum" in spec and value not in spec["enum"]) or \
                ("type" in spec and type(value) is not TYPES[spec["type"]]):
            return False
    return True


def parse_rate(api: openai.OpenAI, model: str, requests: int) -> dict:
    parsed = calls = 0
    failures = []
    for i in range(requests):
        ask = ASKS[i % len(ASKS)].format(city=CITIES[i % len(CITIES)], n=i % 28 + 1)
        tools = TOOLS[: 1 + i % 3]  # one, two or three tools offered
        answer = api.chat.completions.create(model=model, messages=[{"role": "user", "content": ask}], tools=tools,
                                             tool_choice="required", temperature=0.7, seed=i, max_tokens=400)
        choice = answer.choices[0]
        ok = choice.finish_reason == "tool_calls" and bool(choice.message.tool_calls) and \
            all(valid(c, tools) for c in choice.message.tool_calls)
        parsed += ok
        calls += len(choice.message.tool_calls or [])
        if not ok:
            failures.append({"ask": ask, "finish": choice.finish_reason, "content": choice.message.content})
    return {"requests": requests, "parsed": parsed, "share": parsed / requests, "calls": calls,
            "failures": failures[:5]}


def agent_loop(api: openai.OpenAI, model: str, stream: bool) -> dict:
    """One loop: a required call, the tool's result sent back, a final answer."""
    ask = [{"role": "user", "content": "What is the weather in Oslo? Answer in one sentence."}]
    request = dict(model=model, messages=ask, tools=TOOLS[:1], tool_choice="required", temperature=0, max_tokens=200)
    if stream:
        calls: dict[int, dict] = {}
        for chunk in api.chat.completions.create(**request, stream=True):
            for part in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": part.id, "name": part.function.name, "arguments": ""})
                call["arguments"] += part.function.arguments or ""
        call = calls[0]
    else:
        message = api.chat.completions.create(**request).choices[0].message
        call = {"id": message.tool_calls[0].id, "name": message.tool_calls[0].function.name,
                "arguments": message.tool_calls[0].function.arguments}
    json.loads(call["arguments"])
    history = ask + [
        {"role": "assistant", "tool_calls": [{"id": call["id"], "type": "function",
                                              "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": -3, "sky": "snow"}'},
    ]
    final = api.chat.completions.create(model=model, messages=history, tools=TOOLS[:1], tool_choice="none",
                                        temperature=0, max_tokens=60).choices[0].message.content or ""
    return {"call": call["name"], "arguments": call["arguments"], "final": final.strip()}


def grammar_cost(base: str, model: str, runs: int) -> dict:
    """Decode tokens/s of 64-token answers: free text vs JSON under a schema (medians of `runs`)."""
    prompt = "List the planets of the solar system with a short note on each:"
    schema = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 8}}, "required": ["notes"]}
    bodies = {"free": {"ignore_eos": True}, "json_schema": {"json_schema": schema}}
    rates: dict[str, list[float]] = {k: [] for k in bodies}
    tokens: dict[str, list[int]] = {k: [] for k in bodies}
    with new_client() as client:
        for _ in range(runs):
            for kind, extra in bodies.items():
                body = {"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "cache_prompt": False, **extra}
                done = stream_completion(client, base, body, kind)
                n = done.usage["completion_tokens"]
                rates[kind].append((n - 1) / (done.stamps[-1] - done.stamps[0]))
                tokens[kind].append(n)
    out = {kind: {"tok_s": vars(Spread.of(r)), "tokens": statistics.median(tokens[kind])} for kind, r in rates.items()}
    out["ratio"] = out["json_schema"]["tok_s"]["median"] / out["free"]["tok_s"]["median"]
    return out


def measure(name: str, bundle: Path, model: str, requests: int, runs: int) -> dict:
    store = OUT / f"tools-{name}-store"
    edgepack("install", bundle, "--store", store)
    port = free_port()
    base = local_url(port)
    log = OUT / f"tools-{name}.log"
    with running(serve_command(store, port, "--ctx", 4096, "--no-cache"), log) as proc:
        wait_ready(base, proc, log)
        api = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=300)
        result = {"parse_rate": parse_rate(api, model, requests),
                  "loop": agent_loop(api, model, stream=False), "loop_streamed": agent_loop(api, model, stream=True),
                  "grammar_cost": grammar_cost(base, model, runs)}
    print(f"{name}: {result['parse_rate']['parsed']}/{requests} required calls parse with the schema's types; "
          f"loop: {result['loop']['call']} -> {result['loop']['final'][:60]!r}; grammar: "
          f"{result['grammar_cost']['json_schema']['tok_s']['median']:.1f} vs "
          f"{result['grammar_cost']['free']['tok_s']['median']:.1f} tok/s free "
          f"({result['grammar_cost']['ratio']:.2f}x)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    gemma = build_bundle(model_path(), OUT / "tools-gemma.edgepack")
    tiny_gguf = OUT / "tools-tiny.gguf"
    write_tiny_llama(tiny_gguf)
    tiny = OUT / "tools-tiny.edgepack"
    tiny.unlink(missing_ok=True)
    edgepack("build", tiny_gguf, "-o", tiny, "--name", "tiny", "--quant", "Q8_0", "--no-eval", "-q")
    results = {name: measure(name, bundle, model, args.requests, args.runs)
               for name, bundle, model in (("gemma3-270m", gemma, "gemma3-270m"), ("tiny", tiny, "tiny"))}
    write_results("tools", {"requests": args.requests, "runs": args.runs, "results": results})


if __name__ == "__main__":
    main()
