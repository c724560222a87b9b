"""The OpenAI-compatible API's shapes: request bodies' schema, decoded into typed objects, and response documents.

Validation happens here, once, at the border, by the runtime's schema layer (msgspec); every problem becomes
an ApiError (a 4xx with the OpenAI error body, `param` the bad field's path). Unknown fields are ignored, as
OpenAI does; known ones this server does not support are refused. Knows neither llama.cpp nor the HTTP framework.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from .sampling import SAMPLING_KEYS, SamplingParams
from .schema import SchemaError, decode_json

MAX_STOP_SEQUENCES = 4


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
class CompletionRequest:
    """A validated request, whichever route it came by."""

    kind: str  # "chat" or "text"
    model: str | None
    messages: tuple[tuple[str, str], ...]  # chat only
    prompt: str  # text only
    max_tokens: int | None
    stream: bool
    include_usage: bool
    sampling: SamplingParams  # the request's own; the agent's fill what it leaves unset
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    cache_prompt: bool = True  # llama-server's extension: false = process the whole prompt again


# ---- the request bodies' schema (unknown fields are ignored, as OpenAI does) ----

class _StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class _ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class _Message(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None


class _Body(SamplingParams, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """What chat and text completions share: the sampling parameters (runtime/sampling.py) and the rest."""

    model: str | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = 1
    logit_bias: dict[str, Any] | None = None
    ignore_eos: bool = False  # llama-server's extensions
    cache_prompt: bool = True
    stop: str | Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]],
                          msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None


class _ChatBody(_Body, frozen=True, kw_only=True):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class _TextBody(_Body, frozen=True, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool = False  # known, unsupported when set (400)
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


def parse_chat(body: bytes) -> CompletionRequest:
    doc = _decode(body, _ChatBody)
    if doc.tools:
        raise ApiError(400, "'tools' are not supported by this server yet", param="tools")
    if doc.response_format not in (None, {"type": "text"}):
        raise ApiError(400, "only response_format {'type': 'text'} is supported yet", param="response_format")
    messages = tuple(_message(m, i) for i, m in enumerate(doc.messages))
    return _request("chat", doc, messages=messages, prompt="", max_tokens=doc.max_completion_tokens or doc.max_tokens)


def parse_completion(body: bytes) -> CompletionRequest:
    doc = _decode(body, _TextBody)
    prompt = doc.prompt[0] if isinstance(doc.prompt, list) else doc.prompt
    if not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one string)", param="prompt")
    for unsupported, allowed in (("echo", False), ("suffix", None), ("logprobs", None), ("best_of", 1)):
        if getattr(doc, unsupported) not in (None, allowed):
            raise ApiError(400, f"'{unsupported}' is not supported", param=unsupported)
    return _request("text", doc, messages=(), prompt=prompt, max_tokens=doc.max_tokens)


def _decode(body: bytes, kind: type[_Body]) -> Any:
    if not body.lstrip().startswith(b"{"):
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})") from None
        raise ApiError(400, "request body must be a JSON object")
    try:
        return decode_json(body, kind, "request body")
    except SchemaError as exc:
        raise ApiError(400, str(exc), param=exc.path or None) from None


def _request(kind: str, doc: _Body, *, messages: tuple[tuple[str, str], ...], prompt: str,
             max_tokens: int | None) -> CompletionRequest:
    if doc.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if doc.logit_bias:
        raise ApiError(400, "'logit_bias' is not supported yet", param="logit_bias")
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
    )


def _message(message: _Message, index: int) -> tuple[str, str]:
    content = message.content
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text parts are understood
        if not all(part.type == "text" and part.text is not None for part in content):
            where = f"messages[{index}].content"
            raise ApiError(400, f"'{where}' parts must be text parts", param=where)
        content = "".join(part.text or "" for part in content)
    return ("system" if message.role == "developer" else message.role, content)


# ---- responses ----


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    req: CompletionRequest, rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": rid, "object": kind, "created": int(time.time()), "model": model,
        "choices": [choice], "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    req: CompletionRequest, rid: str, model: str, text: str | None, finish: str | None, *, first: bool = False
) -> dict[str, Any]:
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(req: CompletionRequest, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    kind = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {
        "id": rid, "object": kind, "created": int(time.time()), "model": model,
        "choices": [], "usage": usage(prompt_tokens, completion_tokens),
    }
