"""The tool-calling formats of the model families: how a prompt shows the tools, how the model answers with calls.

One class per format registers itself under its name: the prompt (the model's own Jinja template, rendered as
Hugging Face renders it), the grammar an answer that is a call must follow (each function's arguments from its JSON
schema, by llama-cpp-python's converter), and where the calls sit in the output (read by tool_calls.py).
`detect()` picks the format from the chat template.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_grammar import SchemaConverter

from .errors import EdgepackError
from .grammar import strict_strings
from .tool_calls import StreamParser, ToolCall, Trigger, parse

Turns = list[tuple[str, str]]  # (role, content) for llama.cpp's built-in templates (Engine.format_chat)

# Between the parts of a format's wrapper: lenient enough for what a model wrote before the grammar took over.
_WRAP_WS = "wrap-ws ::= [ \\t\\n]{0,4}"
_NO_ARGUMENTS = {"type": "object", "properties": {}}


class ToolFormat:
    """A format: subclasses register under `name` (class Hermes(ToolFormat, name="hermes"))."""

    name: ClassVar[str]
    triggers: ClassVar[tuple[Trigger, ...]]
    arguments_key: ClassVar[str] = "arguments"

    def __init_subclass__(cls, *, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        FORMATS[name] = cls()

    @classmethod
    def fits(cls, template: str) -> bool:
        """Whether a Jinja chat template writes this format's calls."""
        raise NotImplementedError

    def render(self, template: str | None, messages: list[dict], tools: list[dict], *, bos: str = "",
               eos: str = "") -> str | Turns:
        """The prompt up to the assistant's cue: the model's Jinja `template` rendered with the OpenAI `messages`
        and `tools`. (Only the generic format takes None or a built-in template's name: it returns turns.)"""
        if template is None or not is_jinja(template):
            raise EdgepackError(f"the {self.name} tool format needs the model's Jinja chat template")
        return _render(template, messages=self._messages(messages), tools=_tools(tools) or None, bos_token=bos,
                       eos_token=eos, add_generation_prompt=True)

    def _messages(self, messages: list[dict]) -> list[dict]:
        """The messages as the templates of this format read them: text content, arguments as objects."""
        out = []
        for original in messages:
            message = {k: v for k, v in original.items() if k != "tool_calls"}  # Llama's asks `'tool_calls' in message`
            message["content"] = _text(original.get("content"))
            if calls := _calls(original):
                message["tool_calls"] = [
                    {**call, "function": {**call["function"], "arguments": _arguments(call["function"]["arguments"])}}
                    for call in calls
                ]
            out.append(message)
        return out

    def grammar(self, tools: list[dict], *, choice: str | None = None, parallel: bool = True) -> str:
        """A GBNF grammar (llama.cpp) of an answer that is a call (one, or one or more if `parallel`), of any of
        `tools` or of the function named `choice`, wrapped as the format wraps calls. It starts with a trigger's
        text, so it also serves llama.cpp's lazy grammar (trigger_patterns)."""
        return "\n".join([_call_rules(tools, choice, self.arguments_key, self._extra_member()), _WRAP_WS,
                          self._root(parallel)])

    def _extra_member(self) -> str:
        return ""

    def _root(self, parallel: bool) -> str:
        """The grammar's root: the format's wrapper around `call`s."""
        raise NotImplementedError

    def trigger_patterns(self) -> tuple[str, ...]:
        """The texts that start a call, as the regular expressions llama.cpp's lazy grammar takes (ECMAScript)."""
        return tuple(re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", t.text) for t in self.triggers)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole answer: (its content without the calls, the calls)."""
        return parse(self.triggers, text)

    def stream(self) -> StreamParser:
        return StreamParser(self.triggers)


FORMATS: dict[str, ToolFormat] = {}  # by name, in the order detect() tries them


class Mistral(ToolFormat, name="mistral"):
    """[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "<9 letters or digits>"}, ...] (Mistral Nemo, 7B v0.3;
    the later [TOOL_CALLS]name[ARGS]{...} of Small 3.2, Devstral and Ministral 3 is not this format)."""

    triggers = (Trigger("[TOOL_CALLS]", open=("[",), separator=",", close=("]",)),)

    @classmethod
    def fits(cls, template: str) -> bool:
        return "[TOOL_CALLS]" in template and "[ARGS]" not in template  # [ARGS]: the v11 format, not this one

    def _messages(self, messages: list[dict]) -> list[dict]:
        """Mistral's template refuses call ids other than 9 letters or digits: others map to one, the same for
        the call and its result."""
        out = super()._messages(messages)
        for message in out:
            for call in message.get("tool_calls", ()):
                call["id"] = _mistral_id(call.get("id") or "")
            if message.get("tool_call_id") is not None:
                message["tool_call_id"] = _mistral_id(message["tool_call_id"])
        return out

    def _extra_member(self) -> str:
        return ' "," space "\\"id\\"" space ":" space "\\"" [a-zA-Z0-9]{9} "\\"" space'

    def _root(self, parallel: bool) -> str:
        return f'root ::= "[TOOL_CALLS]" wrap-ws "[" wrap-ws {_repeat("call", parallel, ",")} wrap-ws "]"'


class Hermes(ToolFormat, name="hermes"):
    """<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call (Hermes, Qwen2.5, Qwen3)."""

    triggers = (Trigger("<tool_call>", close=("</tool_call>",)),)

    @classmethod
    def fits(cls, template: str) -> bool:
        return "<tool_call>" in template

    def _root(self, parallel: bool) -> str:
        return (f'root ::= {_repeat("tool-call", parallel, None)}\n'
                'tool-call ::= "<tool_call>" wrap-ws call wrap-ws "</tool_call>"')


class Llama3(ToolFormat, name="llama3"):
    """{"name": ..., "parameters": {...}} as the whole answer, or after <|python_tag|> (Llama 3.1, 3.2, 3.3).
    One call per answer: the model card's format has no parallel calls, and earlier parallel calls are shown
    to the template as one assistant message each."""

    triggers = (Trigger("<|python_tag|>", python=True), Trigger('{"name"', consume=False))
    arguments_key = "parameters"

    @classmethod
    def fits(cls, template: str) -> bool:
        return "<|start_header_id|>" in template and ("<|python_tag|>" in template or '"parameters"' in template)

    def _messages(self, messages: list[dict]) -> list[dict]:
        out = []
        for message in super()._messages(messages):
            calls = message.get("tool_calls", [])
            out.extend([{**message, "tool_calls": [call]} for call in calls] if len(calls) > 1 else [message])
        return out

    def grammar(self, tools: list[dict], *, choice: str | None = None, parallel: bool = True) -> str:
        return super().grammar(tools, choice=choice, parallel=False)

    def _root(self, parallel: bool) -> str:
        return 'root ::= ("<|python_tag|>" wrap-ws)? call'


class Generic(ToolFormat, name="generic"):
    """For a template without tools (or none, or one of llama.cpp's built-in ones): the tools are described in
    the system message, and a call is an answer that is only {"tool_calls": [{"name": ..., "arguments": {...}}]};
    any other answer is text. Earlier calls and tool results are shown to the model as text in the same shape."""

    triggers = (Trigger('{"tool_calls"', open=(":", "["), separator=",", close=("]", "}")),)

    @classmethod
    def fits(cls, template: str) -> bool:
        return True

    def render(self, template: str | None, messages: list[dict], tools: list[dict], *, bos: str = "",
               eos: str = "") -> str | Turns:
        """With a Jinja template, the prompt; with None or a built-in template's name, the turns to give
        llama.cpp's own renderer (Engine.format_chat)."""
        jinja = template is not None and is_jinja(template)
        turns = _merge(_generic_turns(messages, tools), system=not jinja or _supports_system(template))
        if not jinja:
            return turns
        return _render(template, messages=[{"role": r, "content": c} for r, c in turns], bos_token=bos,
                       eos_token=eos, add_generation_prompt=True)

    def _root(self, parallel: bool) -> str:
        calls = _repeat("call", parallel, ",")
        return f'root ::= "{{\\"tool_calls\\"" space ":" space "[" wrap-ws {calls} wrap-ws "]" space "}}"'


def detect(template: str | None) -> ToolFormat:
    """The format a model's chat template writes calls in; generic without a Jinja template."""
    if template is None or not is_jinja(template):
        return FORMATS["generic"]
    return next(f for f in FORMATS.values() if f.fits(template))


def is_jinja(template: str) -> bool:
    """A Jinja template, rather than the name of one of llama.cpp's built-in templates."""
    return "{{" in template or "{%" in template


# ---- Jinja, as Hugging Face's apply_chat_template sets it up ----


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Hugging Face's tojson: Jinja's own escapes HTML and sorts keys, which the templates' authors did not see."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise EdgepackError(f"chat template: line {exc.lineno}: {exc.message}") from None


def _render(template: str, **context: Any) -> str:
    try:
        return _compile(template).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:  # the conversation's fault, e.g. roles out of turn
        raise EdgepackError(f"chat template: {exc}") from None


@functools.lru_cache(maxsize=16)
def _supports_system(template: str) -> bool:
    """Whether the template shows a system message (Gemma 2's refuses one), tried on a two-message chat."""
    probe = "<system-probe>"
    try:
        text = _render(template, messages=[{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                       bos_token="", eos_token="", add_generation_prompt=True)
    except EdgepackError:
        return False
    return probe in text


# ---- messages ----


def _text(content: Any) -> str:
    """OpenAI content (text, None, or a list of parts) as the text the templates concatenate."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return str(content)


def _tools(tools: list[dict]) -> list[dict]:
    """The tools, a function without parameters given the empty object's schema (OpenAI's meaning of none),
    which templates that list the parameters (Hermes') can read."""
    return [tool if tool["function"].get("parameters") else
            {**tool, "function": {**tool["function"], "parameters": _NO_ARGUMENTS}} for tool in tools]


def _calls(message: dict) -> list[dict]:
    return list(message.get("tool_calls") or ())


def _arguments(text: Any) -> Any:
    """A call's arguments as the object the templates expect; text that is not a JSON object stays text."""
    if not isinstance(text, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def _mistral_id(call_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest(), "big")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(alphabet[(digest >> (6 * i)) % 62] for i in range(9))


_GENERIC_TOOLS = """You can call these tools (functions); the parameters of each are a JSON schema of its arguments:
{tools}

To call tools, answer with only a JSON object of this form, and nothing else:
{{"tool_calls": [{{"name": "<function name>", "arguments": {{<its arguments, as its parameters say>}}}}]}}
Otherwise, answer in plain text."""


def _generic_turns(messages: list[dict], tools: list[dict]) -> Turns:
    """The conversation for a model that knows no tools: the tools in the system message, earlier calls as the
    JSON the model is asked to write, tool results as the user's."""
    names = {call.get("id"): call["function"]["name"] for m in messages for call in _calls(m)}
    turns: Turns = []
    if tools:
        listed = "\n".join(json.dumps({k: t["function"][k] for k in ("name", "description", "parameters")
                                       if t["function"].get(k) is not None}, ensure_ascii=False) for t in _tools(tools))
        instructions = _GENERIC_TOOLS.format(tools=listed)
        system = [_text(m.get("content")) for m in messages if m["role"] == "system"]
        turns.append(("system", "\n\n".join([*system, instructions]) if system else instructions))
    for message in messages:
        role, content = message["role"], _text(message.get("content"))
        if role == "system" and tools:
            continue  # already in the first turn
        if role == "tool":
            name = names.get(message.get("tool_call_id"), message.get("tool_call_id") or "a tool")
            turns.append(("user", f"Tool result ({name}):\n{content}"))
        elif _calls(message):
            called = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                      for c in _calls(message)]
            turns.append((role, "\n".join(filter(None, [content, json.dumps({"tool_calls": called},
                                                                             ensure_ascii=False)]))))
        else:
            turns.append((role, content))
    return turns


def _merge(turns: Turns, *, system: bool) -> Turns:
    """Neighbouring turns of one role made one (tool results, then the user's next words): templates that insist
    on alternating roles accept it. Without `system`, the system turn opens the first user turn instead."""
    if not system and turns and turns[0][0] == "system":
        turns = [("user", turns[0][1]), *turns[1:]]
    merged: Turns = []
    for role, content in turns:
        if merged and merged[-1][0] == role:
            merged[-1] = (role, f"{merged[-1][1]}\n\n{content}")
        else:
            merged.append((role, content))
    return merged


# ---- grammars ----


def _literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


MAX_PARALLEL_CALLS = 8  # a small model left free to add calls repeats its first one until max_tokens


def _repeat(rule: str, parallel: bool, separator: str | None) -> str:
    """One `rule`, or one to MAX_PARALLEL_CALLS with `separator` between them."""
    if not parallel:
        return rule
    between = f' {_literal(separator)} wrap-ws' if separator else ""
    return f"{rule} (wrap-ws{between} {rule}){{0,{MAX_PARALLEL_CALLS - 1}}}"


def _call_rules(tools: list[dict], choice: str | None, key: str, extra: str) -> str:
    """`call ::= ...`, a call of one of the functions as `{"name": "<name>", "<key>": <arguments>}`, the arguments'
    rules converted from each function's JSON schema."""
    names = [tool["function"]["name"] for tool in tools]
    if not names:
        raise EdgepackError("a tool call needs at least one tool")
    if choice is not None and choice not in names:
        raise EdgepackError(f"tool_choice names {choice!r}, which is not one of the tools ({', '.join(names)})")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    rules = []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if choice is not None and name != choice:
            continue
        schema = copy.deepcopy(tool["function"].get("parameters") or _NO_ARGUMENTS)  # the converter edits $refs
        try:
            arguments = converter.visit(converter.resolve_refs(schema, f"tool{i}"), f"fn{i}-{key}")
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise EdgepackError(f"tools[{i}] ({name}): its parameters schema cannot be turned into a grammar: "
                                f"{exc or type(exc).__name__}") from None
        rules.append(f'fn{i}-call ::= "{{\\"name\\"" space ":" space {_literal(json.dumps(name))} space "," space '
                     f'{_literal(json.dumps(key))} space ":" space {arguments}{extra} "}}"')
    call = "call ::= " + " | ".join(rule.split(" ::= ")[0] for rule in rules)
    return strict_strings("\n".join([converter.format_grammar(), *rules, call]))
