"""Tool calling, model side: prompts from the model authors' own templates (llama.cpp's copies, from the
llama-cpp-python sdist), answers read back into calls whole and streamed, and grammars run by llama.cpp's own
grammar sampler on the tiny model's vocabulary."""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import math
import random
import re
from datetime import datetime
from pathlib import Path

import llama_cpp
import pytest
from tiny_model import vocab as tiny_vocab

from edgepack.runtime.engine import Engine
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.tool_calls import CallDelta, ContentDelta, ToolCall, collect
from edgepack.runtime.tool_formats import FORMATS, detect

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "days": {"type": "integer", "description": "Days ahead"}},
                   "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
# The tools as the templates' `tojson` writes them: keys in their order, nothing escaped.
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", '
                '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": '
                '"City name"}, "days": {"type": "integer", "description": "Days ahead"}}, "required": ["city", '
                '"days"]}}}')
TIME_JSON = ('{"type": "function", "function": {"name": "get_time", "description": "The time in a zone", '
             '"parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, '
             '"required": ["zone"]}}}')

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris in 2 days, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "call_7", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 22}'},
    {"role": "tool", "tool_call_id": "call_7", "content": '"14:05"'},
]


@pytest.fixture(scope="session")
def templates() -> Path:
    """llama.cpp's copies of the model authors' chat templates: from native/out/ where build-llama-server.sh
    unpacked the sdist, else fetched with pip into the edgepack cache (as convert-lora fetches its converter)."""
    version = importlib.metadata.version("llama-cpp-python")
    unpacked = (Path(__file__).parents[2] / "native" / "out" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
                / "models" / "templates")
    if unpacked.is_dir():
        return unpacked
    from edgepack.packager.llama_source import llama_cpp_files

    folder = "models/templates"
    return llama_cpp_files((folder,), check=f"{folder}/Qwen-Qwen2.5-7B-Instruct.jinja", suffix="-templates") / folder


def template(templates: Path, name: str) -> str:
    return (templates / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    engine = Engine([tiny_gguf], name="tiny", n_ctx=64, n_batch=16, threads=1, chat_template="gemma")
    yield engine
    engine.close()


# ---- prompts ----


@pytest.mark.parametrize(("name", "expected"), [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes"),
    ("Qwen-Qwen3-0.6B", "hermes"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3"),
    ("meta-llama-Llama-3.3-70B-Instruct", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "generic"),  # [TOOL_CALLS]name[ARGS]{...}: not Nemo's format
    ("google-gemma-2-2b-it", "generic"),
])
def test_format_is_detected_from_the_template(templates, name, expected):
    assert detect(template(templates, name)).name == expected


@pytest.mark.parametrize("builtin", [None, "gemma", "chatml", "llama3"])
def test_models_without_a_jinja_template_use_the_generic_format(builtin):
    assert detect(builtin).name == "generic"


def test_qwen_prompt_lists_the_tools_and_shows_calls_and_results(templates):
    prompt = FORMATS["hermes"].render(template(templates, "Qwen-Qwen2.5-7B-Instruct"), HISTORY, TOOLS)
    assert prompt == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{WEATHER_JSON}\n{TIME_JSON}\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris in 2 days, and the time?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temperature": 22}\n</tool_response>\n<tool_response>\n"14:05"\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_hermes_prompt_describes_each_function_and_answers_in_tool_turns(templates):
    prompt = FORMATS["hermes"].render(template(templates, "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"), HISTORY,
                                      TOOLS, bos="<|begin_of_text|>")
    assert prompt.startswith("<|begin_of_text|><|im_start|>system\nYou are a function calling AI model.")
    assert ('<tools> {"type": "function", "function": {"name": "get_weather", "description": "get_weather(city: str, '
            'days: int) - The weather in a city\n\n    Args:\n        city(str): City name        days(int): Days '
            'ahead", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": '
            '"City name"}') in prompt
    assert prompt.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>tool\n<tool_response>\n{"temperature": 22}\n</tool_response>\n<tool_response>\n"14:05"\n'
        "</tool_response><|im_end|><|im_start|>assistant\n"
    )


def test_a_function_without_parameters_is_listed_as_taking_none(templates):
    """OpenAI's tools may leave out `parameters`; Hermes' template reads their properties all the same."""
    ping = {"type": "function", "function": {"name": "ping", "description": "Ping the server"}}
    prompt = FORMATS["hermes"].render(template(templates, "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"),
                                      [{"role": "user", "content": "hi"}], [ping])
    assert ('<tools> {"type": "function", "function": {"name": "ping", "description": "ping() - Ping the server\n\n", '
            '"parameters": {}} </tools>') in prompt


LLAMA_TOOLS_TURN = (
    "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
    "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
    '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n        "description": "The '
    'weather in a city",\n        "parameters": {\n            "type": "object",\n'
)
# The template takes one call per assistant message: the two calls become two messages.
LLAMA_HISTORY = (
    'Weather in Paris in 2 days, and the time?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eot_id|>'
    '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_time", "parameters": {"zone": "CET"}}<|eot_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temperature\\": 22}"<|eot_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n"\\"14:05\\""<|eot_id|>'
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_llama31_prompt_puts_the_tools_in_the_first_user_turn(templates):
    prompt = FORMATS["llama3"].render(template(templates, "meta-llama-Llama-3.1-8B-Instruct"), HISTORY, TOOLS,
                                      bos="<|begin_of_text|>")
    assert prompt.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge "
        "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>" + LLAMA_TOOLS_TURN
    )
    assert '"name": "get_time",' in prompt
    assert prompt.endswith(LLAMA_HISTORY)


def test_llama32_prompt_dates_itself_with_strftime_now(templates):
    before = datetime.now().strftime("%d %b %Y")
    prompt = FORMATS["llama3"].render(template(templates, "meta-llama-Llama-3.2-3B-Instruct"), HISTORY, TOOLS)
    after = datetime.now().strftime("%d %b %Y")
    date = re.search(r"Today Date: (.*)\n", prompt).group(1)
    assert date in (before, after)
    assert LLAMA_TOOLS_TURN in prompt and prompt.endswith(LLAMA_HISTORY)


def test_template_refusals_are_edgepack_errors(templates):
    """raise_exception in a template (here: Llama's tools need a user message) is a one-line error."""
    with pytest.raises(EdgepackError, match="Cannot put tools in the first user message"):
        FORMATS["llama3"].render(template(templates, "meta-llama-Llama-3.1-8B-Instruct"),
                                 [{"role": "system", "content": "S"}], TOOLS)


def test_mistral_prompt_shows_calls_with_nine_character_ids(templates):
    """Nemo's template refuses ids other than 9 letters or digits: call_7 is mapped, the same in the call and in
    its result; abcDEF123 is kept."""
    prompt = FORMATS["mistral"].render(template(templates, "mistralai-Mistral-Nemo-Instruct-2407"), HISTORY, TOOLS,
                                       bos="<s>", eos="</s>")
    expected = (
        f"<s>[AVAILABLE_TOOLS][{WEATHER_JSON}, {TIME_JSON}][/AVAILABLE_TOOLS]"
        "[INST]Weather in Paris in 2 days, and the time?[/INST]"
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "abcDEF123"}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}, "id": "ID"}]</s>'
        '[TOOL_RESULTS]{"content": {"temperature": 22}, "call_id": "abcDEF123"}[/TOOL_RESULTS]'
        '[TOOL_RESULTS]{"content": "14:05", "call_id": "ID"}[/TOOL_RESULTS]'
    )
    pattern = re.escape(expected).replace("ID", "([A-Za-z0-9]{9})", 1).replace("ID", r"\1")
    assert re.fullmatch(pattern, prompt), prompt


GEMMA_TOOLS = (
    "You can call these tools (functions); the parameters of each are a JSON schema of its arguments:\n"
    '{"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string", "description": "City name"}, "days": {"type": "integer", "description": "Days '
    'ahead"}}, "required": ["city", "days"]}}\n'
    '{"name": "get_time", "description": "The time in a zone", "parameters": {"type": "object", "properties": '
    '{"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}\n\n'
    "To call tools, answer with only a JSON object of this form, and nothing else:\n"
    '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments, as its parameters say>}}]}\n'
    "Otherwise, answer in plain text."
)
GEMMA_HISTORY = (
    "Weather in Paris in 2 days, and the time?<end_of_turn>\n<start_of_turn>model\n"
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "get_time", '
    '"arguments": {"zone": "CET"}}]}<end_of_turn>\n<start_of_turn>user\nTool result (get_weather):\n'
    '{"temperature": 22}\n\nTool result (get_time):\n"14:05"<end_of_turn>\n<start_of_turn>model\n'
)


def test_generic_prompt_through_a_template_without_tools_or_system_role(templates):
    """Gemma 2's template refuses a system message and insists on alternating roles: the tools open the first user
    turn, the two results share one user turn."""
    prompt = FORMATS["generic"].render(template(templates, "google-gemma-2-2b-it"), HISTORY, TOOLS, bos="<bos>")
    assert prompt == f"<bos><start_of_turn>user\nYou are terse.\n\n{GEMMA_TOOLS}\n\n{GEMMA_HISTORY}"


def test_generic_turns_for_llama_cpp_builtin_template(engine):
    """No Jinja template (the demo model): turns for llama.cpp's own renderer, here its built-in gemma template."""
    turns = FORMATS["generic"].render("gemma", HISTORY, TOOLS)
    assert turns[0] == ("system", f"You are terse.\n\n{GEMMA_TOOLS}")
    assert engine.format_chat(turns) == f"<start_of_turn>user\nYou are terse.\n\n{GEMMA_TOOLS}\n\n{GEMMA_HISTORY}"


def test_generic_prompt_without_tools_keeps_the_conversation():
    assert FORMATS["generic"].render(None, HISTORY[:2], []) == [
        ("system", "You are terse."), ("user", "Weather in Paris in 2 days, and the time?")]


def test_jinja_formats_need_a_jinja_template():
    with pytest.raises(EdgepackError, match="needs the model's Jinja chat template"):
        FORMATS["hermes"].render("chatml", HISTORY, TOOLS)


# ---- reading answers ----

# (format, answer, content, [(name, arguments)]): hand-written answers as the models write them.
ANSWERS = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     "", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
     "Let me look.", [("get_time", '{"zone": "UTC"}')]),
    ("hermes", '<tool_call>{"name":"get_weather","arguments":{"city":"a}\\"b","days":[{"x":"]"}]}}</tool_call> ok',
     "ok", [("get_weather", '{"city":"a}\\"b","days":[{"x":"]"}]}')]),
    ("hermes", '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>', []),
    ("hermes", "Write <tool_call> tags, then <tool_call>\n", "Write <tool_call> tags, then <tool_call>", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
     "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}\n'
               '{"name": "get_time", "parameters": {"zone": "CET"}}',
     "", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')]),
    ("llama3", 'Checking. <|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}',
     "Checking.", [("get_time", '{"zone": "UTC"}')]),
    ("llama3", '<|python_tag|>get_weather.call(city="Paris", days=2)',
     "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("llama3", "<|python_tag|>import os; os.remove('x')", "<|python_tag|>import os; os.remove('x')", []),
    ("llama3", 'Use {"name": 42, "parameters": {}}', 'Use {"name": 42, "parameters": {}}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "abcDEF123"}]',
     "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]',
     "", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]',
     "Sure.", [("get_time", '{"zone": "UTC"}')]),
    ("mistral", '[TOOL_CALLS][{"name": "get_time" "arguments": {}}]',
     '[TOOL_CALLS][{"name": "get_time" "arguments": {}}]', []),
    ("mistral", "[TOOL_CALLS] I cannot call tools.", "[TOOL_CALLS] I cannot call tools.", []),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]}',
     "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},\n'
                ' {"name": "get_time", "arguments": {"zone": "CET"}}]}',
     "", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "CET"}')]),
    ("generic", 'I will check. {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}',
     "I will check.", [("get_time", '{"zone": "UTC"}')]),
    ("generic", '{"tool_calls": "get_weather"}', '{"tool_calls": "get_weather"}', []),
    ("generic", "  It is sunny in Paris.\n", "It is sunny in Paris.", []),
]


def calls_of(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("fmt", "answer", "content", "calls"), ANSWERS)
def test_parse(fmt, answer, content, calls):
    got_content, got_calls = FORMATS[fmt].parse(answer)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def streamed(fmt: str, pieces: list[str]) -> list:
    parser = FORMATS[fmt].stream()
    deltas = [d for piece in pieces for d in parser.feed(piece)]
    return deltas + parser.finish()


@pytest.mark.parametrize(("fmt", "answer", "content", "calls"), ANSWERS)
def test_streamed_deltas_join_to_the_parsed_answer(fmt, answer, content, calls):
    rng = random.Random(answer)
    splits = [list(answer), [answer]]
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(answer)), min(len(answer) - 1, rng.randint(1, 8))))
        splits.append([answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)])
    for pieces in splits:
        got_content, got_calls = collect(streamed(fmt, pieces))
        assert (got_content, calls_of(got_calls)) == (content, calls), pieces


def test_a_call_streams_its_name_first_then_its_arguments_as_they_arrive():
    parser = FORMATS["hermes"].stream()
    assert parser.feed("I'll check.\n<tool_call>\n") == [ContentDelta("I'll check.")]
    first = parser.feed('{"name": "get_weather", "arguments": {"ci')
    assert [(d.index, d.name, d.arguments) for d in first] == [(0, "get_weather", ""), (0, None, '{"ci')]
    assert first[0].id.startswith("call_") and first[1].id is None
    assert parser.feed('ty": "Paris", ') == [CallDelta(0, arguments='ty": "Paris", ')]
    assert parser.feed('"days": 2}}\n</tool_call>') == [CallDelta(0, arguments='"days": 2}')]
    assert parser.finish() == []


def test_text_that_may_start_a_trigger_is_held_back_until_it_cannot():
    parser = FORMATS["mistral"].stream()
    assert parser.feed("Use [TOOL") == [ContentDelta("Use")]
    assert parser.feed("S] here") == [ContentDelta(" [TOOLS] here")]
    llama = FORMATS["llama3"].stream()
    assert llama.feed('A {"na') == [ContentDelta("A")]
    assert llama.feed('me"') == []  # the trigger: whether a call follows is not known yet
    assert llama.feed(': "Bob"') == []
    assert llama.feed(" is the key}") == [ContentDelta(' {"name"'), ContentDelta(': "Bob" is the key}')]


def test_an_answer_cut_inside_the_arguments_keeps_the_call_as_far_as_it_went():
    """max_tokens can end an answer mid-call (the grammar cannot prevent that): the streamed call stands."""
    content, calls = FORMATS["generic"].parse('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa')
    assert (content, calls_of(calls)) == ("", [("get_weather", '{"city": "Pa')])


# ---- grammars, run by llama.cpp's grammar sampler ----

_TOKENS = tiny_vocab()[0]
BYTE = {int(t[3:5], 16): i for i, t in enumerate(_TOKENS) if re.fullmatch(r"<0x[0-9A-F]{2}>", t)}
BYTE_OF = {token: byte for byte, token in BYTE.items()}
EOS = _TOKENS.index("</s>")

# (format, one call, two calls, the two calls' separator): calls of get_weather and get_time as each writes them.
CALLS = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', "\n", ""),
    "mistral": ('{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "abcDEF123"}',
                '{"name": "get_time", "arguments": {"zone": "CET"}, "id": "a1b2c3d4e"}', ", ", "[TOOL_CALLS][", "]"),
    "generic": ('{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}',
                '{"name": "get_time", "arguments": {"zone": "CET"}}', ", ", '{"tool_calls": [', "]}"),
    "llama3": ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
               '{"name": "get_time", "parameters": {"zone": "CET"}}', None, ""),
}


def answer(fmt: str, *which: int) -> str:
    weather, time, separator, start, *end = CALLS[fmt]
    calls = [(weather, time)[i] for i in which]
    return start + (separator or "").join(calls) + "".join(end)


def sampler(engine: Engine, grammar: str, patterns: tuple[str, ...] = ()) -> ctypes.c_void_p:
    """llama.cpp's grammar sampler; lazy (free text until a pattern matches) when patterns are given."""
    if patterns:
        array = (ctypes.c_char_p * len(patterns))(*[p.encode() for p in patterns])
        smpl = llama_cpp.llama_sampler_init_grammar_lazy_patterns(engine._vocab, grammar.encode(), b"root", array,
                                                                  len(patterns), None, 0)
    else:
        smpl = llama_cpp.llama_sampler_init_grammar(engine._vocab, grammar.encode(), b"root")
    assert smpl, f"llama.cpp did not compile the grammar:\n{grammar}"
    return smpl


def allowed(smpl: ctypes.c_void_p, tokens: list[int]) -> list[bool]:
    data = (llama_cpp.llama_token_data * len(tokens))(*[llama_cpp.llama_token_data(t, 0.0, 0.0) for t in tokens])
    candidates = llama_cpp.llama_token_data_array(data, len(tokens), -1, False)
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(candidates))
    return [data[i].logit != -math.inf for i in range(len(tokens))]


def run(engine: Engine, grammar: str, text: str, patterns: tuple[str, ...] = ()) -> tuple[int, bool]:
    """Feeds `text` byte by byte (the tiny vocabulary's byte tokens) through the grammar sampler: (how many bytes
    it allowed before the first it refused, whether it then allowed the end of generation)."""
    smpl = sampler(engine, grammar, patterns)
    try:
        data = text.encode()
        for i, byte in enumerate(data):
            if not allowed(smpl, [BYTE[byte]])[0]:
                return i, False
            llama_cpp.llama_sampler_accept(smpl, BYTE[byte])
        return len(data), allowed(smpl, [EOS])[0]
    finally:
        llama_cpp.llama_sampler_free(smpl)


@pytest.mark.parametrize("fmt", list(CALLS))
def test_grammar_accepts_a_call_and_it_parses(engine, fmt):
    text = answer(fmt, 0)
    assert run(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=False), text) == (len(text), True)
    assert calls_of(FORMATS[fmt].parse(text)[1]) == [("get_weather", '{"city": "Paris", "days": 2}')]


@pytest.mark.parametrize("fmt", list(CALLS))
def test_grammar_rejects_an_argument_of_the_wrong_type(engine, fmt):
    text = answer(fmt, 0).replace('"days": 2', '"days": "two"')
    assert run(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=True), text) == (text.index('"two"'), False)


@pytest.mark.parametrize("fmt", list(CALLS))
def test_grammar_rejects_a_missing_required_argument(engine, fmt):
    text = answer(fmt, 0).replace('"city": "Paris", ', "")
    refused = text.index('"days"') + 1  # the "d" where "city" must come
    assert run(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=True), text) == (refused, False)


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "generic"])
def test_grammar_takes_several_calls_only_when_parallel(engine, fmt):
    text = answer(fmt, 0, 1)
    assert run(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=True), text) == (len(text), True)
    weather, _, _, start, *_ = CALLS[fmt]  # one call, then the separator is refused
    assert run(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=False), text) == (len(start + weather), False)
    assert calls_of(FORMATS[fmt].parse(text)[1]) == [("get_weather", '{"city": "Paris", "days": 2}'),
                                                      ("get_time", '{"zone": "CET"}')]


def test_llama_grammar_takes_one_call_even_when_parallel(engine):
    first, second = answer("llama3", 0), answer("llama3", 1)
    assert run(engine, FORMATS["llama3"].grammar(TOOLS, choice=None, parallel=True), first + "\n" + second) == (
        len(first), False)


def test_llama_grammar_takes_the_python_tag(engine):
    text = "<|python_tag|>" + answer("llama3", 1)
    assert run(engine, FORMATS["llama3"].grammar(TOOLS, choice=None, parallel=False), text) == (len(text), True)


@pytest.mark.parametrize("fmt", list(CALLS))
def test_grammar_of_a_named_function_refuses_the_others(engine, fmt):
    grammar = FORMATS[fmt].grammar(TOOLS, choice="get_time", parallel=True)
    assert run(engine, grammar, answer(fmt, 1)) == (len(answer(fmt, 1)), True)
    text = answer(fmt, 0)
    assert run(engine, grammar, text) == (text.index("get_weather") + len("get_"), False)


def test_mistral_grammar_asks_for_the_nine_character_id(engine):
    text = answer("mistral", 0).replace(', "id": "abcDEF123"', "")
    assert run(engine, FORMATS["mistral"].grammar(TOOLS, choice=None, parallel=False), text) == (
        text.index("}}]") + 1, False)


@pytest.mark.parametrize("fmt", list(CALLS))
def test_lazy_grammar_lets_text_through_until_a_trigger(engine, fmt):
    """tool_choice auto: llama.cpp's lazy grammar with the format's trigger patterns constrains from the trigger on."""
    tool_format = FORMATS[fmt]
    grammar, patterns = tool_format.grammar(TOOLS, choice=None, parallel=True), tool_format.trigger_patterns()
    prose = "No tool is needed: it is {sunny} [today]."
    assert run(engine, grammar, prose, patterns) == (len(prose), True)
    text = "Let me check. " + answer(fmt, 0)
    assert run(engine, grammar, text, patterns) == (len(text), True)
    wrong = text.replace('"days": 2', '"days": "two"')
    assert run(engine, grammar, wrong, patterns) == (wrong.index('"two"'), False)


@pytest.mark.parametrize("fmt", list(CALLS))
def test_constrained_sampling_always_gives_calls_that_parse(engine, fmt):
    """Random logits (printable ASCII, newline, end of generation) sampled under the grammar: every answer parses
    into calls of known functions whose arguments have the schema's types."""
    rng = random.Random(fmt)
    tokens = [BYTE[b] for b in [*range(0x20, 0x7F), 0x0A]] + [EOS]
    favoured = {BYTE[ord('"')], EOS}  # short strings, early ends
    for _ in range(25):
        smpl = sampler(engine, FORMATS[fmt].grammar(TOOLS, choice=None, parallel=True))
        out = bytearray()
        try:
            while True:
                ok = allowed(smpl, tokens)
                choices = [t for t, a in zip(tokens, ok, strict=True) if a]
                token = max(choices, key=lambda t: rng.gauss(0, 1) + (4 if t in favoured else 0))
                if token == EOS:
                    break
                llama_cpp.llama_sampler_accept(smpl, token)
                out.append(BYTE_OF[token])
                assert len(out) < 5000
        finally:
            llama_cpp.llama_sampler_free(smpl)
        content, calls = FORMATS[fmt].parse(out.decode())
        assert content == "" and calls, out
        for call in calls:
            arguments = json.loads(call.arguments)
            if call.name == "get_weather":
                assert isinstance(arguments["city"], str) and type(arguments["days"]) is int
            else:
                assert call.name == "get_time" and arguments["zone"] in ("UTC", "CET")


def test_schemas_without_a_grammar_are_refused_naming_the_tool():
    remote = {"type": "function", "function": {"name": "fetch", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}}}
    with pytest.raises(EdgepackError, match=r"tools\[1\] \(fetch\): its parameters schema"):
        FORMATS["hermes"].grammar([WEATHER, remote], choice=None, parallel=False)


def test_a_named_choice_must_be_one_of_the_tools():
    with pytest.raises(EdgepackError, match="'get_news', which is not one of the tools"):
        FORMATS["generic"].grammar(TOOLS, choice="get_news", parallel=False)


def test_a_function_without_parameters_takes_an_empty_object(engine):
    tools = [{"type": "function", "function": {"name": "ping"}}]
    text = '{"tool_calls": [{"name": "ping", "arguments": {}}]}'
    assert run(engine, FORMATS["generic"].grammar(tools, choice=None, parallel=False), text) == (len(text), True)
