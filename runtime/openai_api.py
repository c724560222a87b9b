"""The OpenAI-compatible API's shapes: request validation into typed objects, response documents.

Validation happens here, once, at the border; every problem becomes an ApiError (a 4xx with the
OpenAI error body). Knows neither llama.cpp nor the HTTP framework.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

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
    kind: str  # "chat" or "text"
    model: str | None
    messages: tuple[tuple[str, str], ...]  # chat only
    prompt: str  # text only
    max_tokens: int | None
    stream: bool
    include_usage: bool
    sampling: dict[str, Any]  # keyword arguments for engine.Sampling (without max_tokens)
    cache_prompt: bool = True  # llama-server's extension: false = process the whole prompt again


_SAMPLING_FIELDS = {
    # name: (type, minimum, maximum)
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 100_000),
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.0, 10.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "presence_penalty": (float, -2.0, 2.0),
    "seed": (int, -(2**63), 2**63 - 1),
}


def parse_chat(doc: Any) -> CompletionRequest:
    doc = _object(doc)
    raw_messages = doc.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = tuple(_message(m, i) for i, m in enumerate(raw_messages))
    if doc.get("tools"):
        raise ApiError(400, "'tools' are not supported by this server yet", param="tools")
    fmt = doc.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "only response_format {'type': 'text'} is supported yet", param="response_format")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    return _request("chat", doc, messages=messages, prompt="", max_tokens=max_tokens)


def parse_completion(doc: Any) -> CompletionRequest:
    doc = _object(doc)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one string)", param="prompt")
    for unsupported in ("echo", "suffix", "logprobs", "best_of"):
        if doc.get(unsupported) not in (None, False, 1 if unsupported == "best_of" else None):
            raise ApiError(400, f"'{unsupported}' is not supported", param=unsupported)
    return _request("text", doc, messages=(), prompt=prompt, max_tokens=doc.get("max_tokens"))


def _request(kind: str, doc: dict, *, messages, prompt: str, max_tokens: Any) -> CompletionRequest:
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    if doc.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if doc.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported yet", param="logit_bias")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    sampling: dict[str, Any] = {}
    for name, (kind_, low, high) in _SAMPLING_FIELDS.items():
        value = doc.get(name)
        if value is None:
            continue
        ok = _is_int(value) if kind_ is int else (_is_int(value) or isinstance(value, float))
        if not ok or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be a number between {low} and {high}", param=name)
        sampling[name] = kind_(value)
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
    sampling["ignore_eos"] = ignore_eos
    sampling["stop"] = _stop(doc.get("stop"))
    cache_prompt = doc.get("cache_prompt", True)
    if not isinstance(cache_prompt, bool):
        raise ApiError(400, "'cache_prompt' must be a boolean", param="cache_prompt")
    return CompletionRequest(
        kind=kind,
        model=model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        sampling=sampling,
        cache_prompt=cache_prompt,
    )


def _object(doc: Any) -> dict:
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message(message: Any, index: int) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"'{where}' must be an object", param=where)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise ApiError(400, f"'{where}.role' must be system, user, assistant or tool", param=where)
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text parts are understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'{where}.content' parts must be text parts", param=where)
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise ApiError(400, f"'{where}.content' must be a string or a list of text parts", param=where)
    return ("system" if role == "developer" else role, content)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings", param="stop")
    return tuple(value)


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
