"""The OpenAI-compatible API's shapes: request bodies' schema, decoded into typed objects, and response documents.

Validation happens here, once, at the border, by the runtime's schema layer (msgspec); every problem becomes
an ApiError (a 4xx with the OpenAI error body, `param` the bad field's path). Unknown fields are ignored, as
OpenAI does; known ones this server does not support are refused. Knows neither llama.cpp nor the HTTP framework.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from .sampling import SAMPLING_KEYS, SamplingParams, TokenLogprob
from .schema import SchemaError, decode_json
from .tool_spec import Tool, ToolChoice

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # n: each choice holds a slot of the batcher while it runs


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Message:
    """One chat message, checked and with its content as text."""

    role: str  # system (developer is read as system), user, assistant, tool
    content: str
    tool_calls: tuple[ToolCallIn, ...] = ()  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers


@dataclass(frozen=True)
class Constraint:
    """What the answer must be: valid JSON, JSON of a schema, or text of a llama.cpp grammar."""

    kind: Literal["json_object", "json_schema", "grammar"]
    schema: dict[str, Any] | None = None
    grammar: str | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request, whichever route it came by."""

    kind: str  # "chat" or "text"
    model: str | None
    messages: tuple[Message, ...]  # chat only
    prompt: str  # text only
    max_tokens: int | None
    stream: bool
    include_usage: bool
    sampling: SamplingParams  # the request's own; the agent's fill what it leaves unset
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    cache_prompt: bool = True  # llama-server's extension: false = process the whole prompt again
    tools: tuple[Tool, ...] = ()
    tool_choice: str | None = None  # auto, none, required, or the function to call; None: the agent's, else auto
    parallel_tool_calls: bool = True
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: none; N: each token's log-probability and the top N alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 1  # choices, each its own sequence
    user: str | None = None  # the client's end-user id (OpenAI's `user`): keeps a conversation on one A/B arm

    def pairs(self) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.messages]


# ---- the request bodies' schema (unknown fields are ignored, as OpenAI does) ----

class _StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class _ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class FunctionCallIn(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it back


class ToolCallIn(msgspec.Struct, frozen=True):
    id: str
    function: FunctionCallIn
    type: Literal["function"] = "function"


class _Message(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class _FunctionName(msgspec.Struct, frozen=True):
    name: str


class _NamedChoice(msgspec.Struct, frozen=True):
    function: _FunctionName
    type: Literal["function"] = "function"


class _TextFormat(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    pass


class _JsonObjectFormat(msgspec.Struct, frozen=True, tag="json_object", tag_field="type"):
    pass


class _JsonSchema(msgspec.Struct, frozen=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class _JsonSchemaFormat(msgspec.Struct, frozen=True, tag="json_schema", tag_field="type"):
    json_schema: _JsonSchema


_LogitBias = dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]]


class _Body(SamplingParams, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """What chat and text completions share: the sampling parameters (runtime/sampling.py) and the rest."""

    model: str | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 1
    logit_bias: _LogitBias | None = None
    ignore_eos: bool = False  # llama-server's extensions
    cache_prompt: bool = True
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    stop: str | Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]],
                          msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None  # OpenAI's end-user id: A/B's sticky key


class _ChatBody(_Body, frozen=True, kw_only=True):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | _NamedChoice | None = None
    parallel_tool_calls: bool = True
    response_format: _TextFormat | _JsonObjectFormat | _JsonSchemaFormat | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


class _TextBody(_Body, frozen=True, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool = False  # known, unsupported when set (400)
    suffix: str | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    best_of: int | None = None


def parse_chat(body: bytes) -> CompletionRequest:
    doc = _decode(body, _ChatBody)
    messages = tuple(_message(m, i) for i, m in enumerate(doc.messages))
    _check_conversation(messages)
    tools = tuple(doc.tools or ())
    choice = _tool_choice(doc.tool_choice)
    if doc.top_logprobs is not None and not doc.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    constraint = _constraint(doc)
    if constraint is not None and tools and choice != "none":
        raise ApiError(400, "a response format or grammar cannot be combined with tools", param="response_format")
    return _request("chat", doc, messages=messages, prompt="", max_tokens=doc.max_completion_tokens or doc.max_tokens,
                    tools=tools, tool_choice=choice, parallel_tool_calls=doc.parallel_tool_calls,
                    constraint=constraint, logprobs=(doc.top_logprobs or 0) if doc.logprobs else None)


def parse_completion(body: bytes) -> CompletionRequest:
    doc = _decode(body, _TextBody)
    prompt = doc.prompt[0] if isinstance(doc.prompt, list) else doc.prompt
    if not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one string)", param="prompt")
    for unsupported, allowed in (("echo", False), ("suffix", None), ("best_of", 1)):
        if getattr(doc, unsupported) not in (None, allowed):
            raise ApiError(400, f"'{unsupported}' is not supported", param=unsupported)
    return _request("text", doc, messages=(), prompt=prompt, max_tokens=doc.max_tokens, constraint=_constraint(doc),
                    logprobs=doc.logprobs)


def _decode(body: bytes, kind: type[_Body]) -> Any:
    try:
        if not body.lstrip().startswith(b"{"):
            decode_json(body, Any, "request body")  # valid JSON, but not an object: say so below
            raise ApiError(400, "request body must be a JSON object")
        return decode_json(body, kind, "request body")
    except SchemaError as exc:
        raise ApiError(400, str(exc), param=exc.path or None) from None


def _request(kind: str, doc: _Body, *, messages: tuple[Message, ...], prompt: str, max_tokens: int | None,
             **extra: Any) -> CompletionRequest:
    return CompletionRequest(
        kind=kind,
        model=doc.model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=doc.stream,
        include_usage=bool(doc.stream_options and doc.stream_options.include_usage),
        sampling=SamplingParams(**{key: getattr(doc, key) for key in SAMPLING_KEYS if key != "max_tokens"}),
        ignore_eos=doc.ignore_eos,
        stop=(doc.stop,) if isinstance(doc.stop, str) else tuple(doc.stop or ()),
        cache_prompt=doc.cache_prompt,
        logit_bias=_logit_bias(doc.logit_bias),
        n=doc.n,
        user=doc.user,
        **extra,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}, -100 meaning never (as -inf) and 100 always, in between added to the logit."""
    out = []
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit() or int(key) >= 2**31:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias")
        out.append((int(key), float("-inf") if value <= -100 else value))
    return tuple(out)


def _constraint(doc: _Body) -> Constraint | None:
    given = [name for name in ("grammar", "json_schema") if getattr(doc, name) is not None]
    fmt = getattr(doc, "response_format", None)
    if fmt is not None and not isinstance(fmt, _TextFormat):
        given.append("response_format")
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}, not several", param=given[1])
    if doc.grammar is not None:
        return Constraint("grammar", grammar=doc.grammar)
    if doc.json_schema is not None:
        return Constraint("json_schema", schema=doc.json_schema)
    if isinstance(fmt, _JsonSchemaFormat):
        return Constraint("json_schema", schema=fmt.json_schema.schema or {})
    if isinstance(fmt, _JsonObjectFormat):
        return Constraint("json_object")
    return None


def _tool_choice(choice: str | _NamedChoice | None) -> str | None:
    """The choice as a word or a function's name (checked against the tools in chat_prompt.py, which knows the
    agent's tools too)."""
    return choice.function.name if isinstance(choice, _NamedChoice) else choice


def _check_conversation(messages: tuple[Message, ...]) -> None:
    """OpenAI's rules: tool messages answer the calls of the assistant message before them, each call answered."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if message.role == "tool":
            if message.tool_call_id not in open_calls:
                raise ApiError(400, f"messages[{i}]: a 'tool' message must answer a 'tool_calls' id of the assistant "
                                    "message before it", param=f"messages[{i}].tool_call_id")
            open_calls.discard(message.tool_call_id)
            continue
        if open_calls:
            raise ApiError(400, f"messages[{i}]: the assistant's tool calls {sorted(open_calls)} have no 'tool' "
                                "message answering them", param=f"messages[{i}]")
        open_calls = {call.id for call in message.tool_calls}


def _message(message: _Message, index: int) -> Message:
    where = f"messages[{index}]"
    content = message.content
    if not content and content != "":  # missing, null or [] (OpenAI: an array needs at least one part)
        if message.role != "assistant" or not message.tool_calls:  # as OpenAI: only a call may come without text
            raise ApiError(400, f"{where}.content: required for a {message.role!r} message"
                                + (" without tool_calls" if message.role == "assistant" else "")
                                + (" (an empty list has no text part)" if content == [] else ""),
                           param=f"{where}.content")
        content = ""
    elif isinstance(content, list):  # content parts: only text parts are understood
        if not all(part.type == "text" and part.text is not None for part in content):
            raise ApiError(400, f"'{where}.content' parts must be text parts", param=f"{where}.content")
        content = "".join(part.text or "" for part in content)
    if message.tool_calls and message.role != "assistant":
        raise ApiError(400, f"{where}.tool_calls: only assistant messages carry tool calls",
                       param=f"{where}.tool_calls")
    if message.role == "tool" and not message.tool_call_id:
        raise ApiError(400, f"{where}.tool_call_id: required for a 'tool' message", param=f"{where}.tool_call_id")
    role = "system" if message.role == "developer" else message.role
    return Message(role, content, tuple(message.tool_calls or ()), message.tool_call_id)


# ---- responses ----


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice_doc(
    req: CompletionRequest, index: int, text: str, finish: str, *, logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a whole answer."""
    if req.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(req: CompletionRequest, rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """The answer: its choices (choice_doc), the prompt counted once, the completion tokens of all choices."""
    return {
        "id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model, "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    req: CompletionRequest, rid: str, model: str, text: str | None, finish: str | None, *, index: int = 0,
    first: bool = False, logprobs: dict[str, Any] | None = None, tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A streamed piece of choice `index`."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(req: CompletionRequest, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    kind = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {
        "id": rid, "object": kind, "created": int(time.time()), "model": model,
        "choices": [], "usage": usage(prompt_tokens, completion_tokens),
    }


def logprobs_body(req: CompletionRequest, entries: list[TokenLogprob], token_bytes: Callable[[int], bytes],
                  offset: int = 0) -> dict[str, Any]:
    """Log-probabilities as OpenAI shapes them: chat's `content` list, or the completions API's parallel lists
    (`offset`: characters of text before these tokens, for text_offset)."""
    if req.kind == "chat":
        def entry(token: int, logprob: float) -> dict[str, Any]:
            raw = token_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    texts = [token_bytes(e.token).decode("utf-8", "replace") for e in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_bytes(t).decode("utf-8", "replace"): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
