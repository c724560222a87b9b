"""llama-server's own routes beside the OpenAI ones, so clients written for llama.cpp's server work unchanged:
native /completion, /tokenize, /detokenize, /apply-template, /props, and /slots (answered 501).

Request bodies are declared here as msgspec Structs and decoded once by the schema layer (a bad field is a 400
naming it); fields llama-server has and this server does not are ignored, as llama-server ignores unknown ones,
unless they would change the answer (then 400). A native completion becomes the server's CompletionRequest and
runs through its one completion path (Service._complete); the OpenAI-shaped answer that comes back is re-shaped
into llama-server's, with counts, timings and log-probabilities read from the generation itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Protocol

import msgspec
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import __version__, llama, openai_api
from .bundle_format import AgentInfo
from .engine import Engine, Generation
from .http_common import Hooks, once, read_body, sse
from .openai_api import ApiError, CompletionRequest, Constraint
from .sampling import SAMPLING_KEYS, Sampling, SamplingParams, TokenLogprob
from .schema import SchemaError, decode_json


class Service(Protocol):
    """What the routes need of the server (runtime/server.py's Service): its completion path and the steps it is
    made of. A protocol, so this module does not import the server that imports it."""

    default_max_tokens: int

    def _agent(self, name: str | None) -> AgentInfo: ...

    async def _acquire(self, model: str) -> Any: ...  # the model's BatchScheduler, loaded if need be

    def _prompt(self, req: CompletionRequest, agent: AgentInfo, engine: Engine) -> tuple[list[tuple[str, str]], Any]:
        ...

    async def _complete(self, req: CompletionRequest, hooks: Hooks = ..., session: str | None = None) -> Response:
        ...

MAX_N_PROBS = 20
MAX_STOP_WORDS = 16

_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
_Bias = float | bool  # llama-server: a number added to the logit, or false for "never"
_StopWords = Annotated[tuple[Annotated[str, msgspec.Meta(min_length=1)], ...], msgspec.Meta(max_length=MAX_STOP_WORDS)]


class _CompletionBody(SamplingParams, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """POST /completion: the sampling parameters (runtime/sampling.py) and llama-server's own fields."""

    model: str | None = None  # the agent; optional when the server has one
    prompt: str | Annotated[list[_TokenId], msgspec.Meta(min_length=1)]
    n_predict: Annotated[int, msgspec.Meta(ge=-1)] | None = None  # -1: up to the agent's max_tokens
    stop: _StopWords = ()
    stream: bool = False
    cache_prompt: bool = True
    n_probs: Annotated[int, msgspec.Meta(ge=0, le=MAX_N_PROBS)] = 0
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False
    logit_bias: list[tuple[_TokenId | str, _Bias]] | dict[str, _Bias] | None = None
    # llama-server settings this server does not have: accepted only at their neutral value (_NEUTRAL)
    repeat_last_n: int | None = None
    mirostat: int | None = None
    typical_p: float | None = None
    top_n_sigma: float | None = None
    dynatemp_range: float | None = None
    xtc_probability: float | None = None
    dry_multiplier: float | None = None
    return_tokens: bool | None = None
    post_sampling_probs: bool | None = None


_NEUTRAL: dict[str, object] = {
    "repeat_last_n": 64, "mirostat": 0, "typical_p": 1.0, "top_n_sigma": -1.0, "dynatemp_range": 0.0,
    "xtc_probability": 0.0, "dry_multiplier": 0.0, "return_tokens": False, "post_sampling_probs": False,
}


class _TokenizeBody(msgspec.Struct, frozen=True, kw_only=True):
    model: str | None = None
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class _DetokenizeBody(msgspec.Struct, frozen=True, kw_only=True):
    model: str | None = None
    tokens: list[_TokenId]


class LlamaServerApi:
    """The routes, on top of a Service (its agents, model pool and completion path)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        return [
            Route("/completion", self.completion, methods=["POST"]),
            Route("/completions", self.completion, methods=["POST"]),  # llama-server's too (OpenAI's: /v1 only)
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/apply-template", self.apply_template, methods=["POST"]),
            Route("/props", self.props),
            Route("/slots", self.slots),
        ]

    async def completion(self, request: HttpRequest) -> Response:
        doc = _decode(await read_body(request), _CompletionBody)
        req = _completion_request(doc)
        agent, engine, release = await self._hold(doc.model)
        handed_over = False
        try:
            tokens = _prompt_tokens(doc.prompt, engine)
            req = dataclasses.replace(req, prompt=_detokenize(engine, tokens) if tokens else req.prompt,
                                      logit_bias=_logit_bias(doc.logit_bias, engine))
            shape = _NativeShape(req, agent.name, engine.token_text)
            response = await self.service._complete(req, Hooks(prompt_tokens=tokens, on_answer=shape.attach))
            if isinstance(response, StreamingResponse):
                response.body_iterator = shape.stream(response.body_iterator, release)
                tasks = [response.background] if response.background is not None else []
                response.background = BackgroundTasks([*tasks, BackgroundTask(release)])  # a stream never started
                handed_over = True  # the stream releases the model when it ends
                return response
            return JSONResponse(shape.whole(json.loads(response.body)))
        finally:
            if not handed_over:
                release()

    async def tokenize(self, request: HttpRequest) -> Response:
        doc = _decode(await read_body(request), _TokenizeBody)
        if not doc.parse_special:
            raise ApiError(400, "'parse_special': false is not supported (special tokens' text is always parsed)",
                           param="parse_special")
        async with self._engine(doc.model) as (_, engine):
            tokens = engine.tokenize(doc.content, add_special=doc.add_special)
            if not doc.with_pieces:
                return JSONResponse({"tokens": tokens})
            return JSONResponse({"tokens": [{"id": t, "piece": _piece(engine.token_text(t))} for t in tokens]})

    async def detokenize(self, request: HttpRequest) -> Response:
        doc = _decode(await read_body(request), _DetokenizeBody)
        async with self._engine(doc.model) as (_, engine):
            _check_vocabulary(doc.tokens, engine, "tokens")
            return JSONResponse({"content": _detokenize(engine, doc.tokens)})

    async def apply_template(self, request: HttpRequest) -> Response:
        req = openai_api.parse_chat(await read_body(request))
        async with self._engine(req.model) as (agent, engine):
            text = self.service._prompt(req, agent, engine)[1].text
            return JSONResponse({"prompt": text})

    async def props(self, request: HttpRequest) -> Response:
        async with self._engine(request.query_params.get("model")) as (agent, engine):
            max_tokens = agent.sampling.max_tokens or self.service.default_max_tokens
            return JSONResponse({
                "default_generation_settings": {
                    "n_ctx": engine.n_ctx, "params": _settings(Sampling.layered(max_tokens, agent.sampling)),
                },
                "total_slots": engine.slots,
                "model_alias": agent.name,
                "model_path": agent.model,  # a bundle's model is named, not a file (its weights may be segments)
                "modalities": {"vision": False, "audio": False},
                "chat_template": engine.chat_template or "",
                "build_info": f"edgepack {__version__}, {llama.version()}",
                "endpoint_slots": False, "endpoint_props": False, "endpoint_metrics": True, "is_sleeping": False,
            })

    async def slots(self, request: HttpRequest) -> Response:
        raise ApiError(501, "/slots is not supported: slots are assigned by each model's batch scheduler; "
                            "/metrics has their use (edgepack_active_slots, edgepack_queue_depth, edgepack_slot_limit)",
                       code="not_supported")

    # ---- models ----

    async def _hold(self, model: str | None) -> tuple[AgentInfo, Engine, Callable[[], None]]:
        """The agent a request names (or the only one), its model loaded and held; call the third item to release."""
        service = self.service
        agent = service._agent(model)
        scheduler = await service._acquire(agent.model)
        return agent, scheduler.engine, once(lambda: service.pool.release(agent.model))

    @contextlib.asynccontextmanager
    async def _engine(self, model: str | None) -> AsyncIterator[tuple[AgentInfo, Engine]]:
        agent, engine, release = await self._hold(model)
        try:
            yield agent, engine
        finally:
            release()


# ---- requests ----


def _decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return decode_json(body, kind, "request body")
    except SchemaError as exc:
        raise ApiError(400, str(exc), param=exc.path or None) from None


def _completion_request(doc: _CompletionBody) -> CompletionRequest:
    """The server's request for a native one (the prompt's token ids, if given so, are read with the model)."""
    for name, neutral in _NEUTRAL.items():
        if getattr(doc, name) not in (None, neutral):
            raise ApiError(400, f"'{name}' is not supported by this server (only {json.dumps(neutral)})", param=name)
    if doc.prompt == "":
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")
    n_predict = doc.n_predict if doc.n_predict is not None else doc.max_tokens or -1
    if n_predict == 0:
        raise ApiError(400, "'n_predict': 0 asks for no tokens; give -1 (up to the agent's max_tokens) or at least 1",
                       param="n_predict")
    if doc.grammar is not None and doc.json_schema is not None:
        raise ApiError(400, "give one of grammar, json_schema, not both", param="json_schema")
    constraint = Constraint("grammar", grammar=doc.grammar) if doc.grammar is not None \
        else Constraint("json_schema", schema=doc.json_schema) if doc.json_schema is not None else None
    return CompletionRequest(
        kind="text",
        model=doc.model,
        messages=(),
        prompt=doc.prompt if isinstance(doc.prompt, str) else "",
        max_tokens=None if n_predict == -1 else n_predict,
        stream=doc.stream,
        include_usage=False,
        sampling=SamplingParams(**{key: getattr(doc, key) for key in SAMPLING_KEYS if key != "max_tokens"}),
        ignore_eos=doc.ignore_eos,
        stop=doc.stop,
        cache_prompt=doc.cache_prompt,
        constraint=constraint,
        logprobs=doc.n_probs or None,
    )


def _prompt_tokens(prompt: str | list[int], engine: Engine) -> tuple[int, ...]:
    """A prompt given as token ids, checked against the model's vocabulary; () for a text prompt."""
    if isinstance(prompt, str):
        return ()
    _check_vocabulary(prompt, engine, "prompt")
    return tuple(prompt)


def _check_vocabulary(tokens: list[int], engine: Engine, field: str) -> None:
    for i, token in enumerate(tokens):
        if token >= engine.n_vocab:
            raise ApiError(400, f"{field}[{i}]: token {token} is not in the vocabulary of {engine.n_vocab} tokens",
                           param=f"{field}[{i}]")


def _logit_bias(bias: list[tuple[int | str, float | bool]] | dict[str, float | bool] | None,
                engine: Engine) -> tuple[tuple[int, float], ...]:
    """llama-server's forms: [[id or text, bias or false], ...] or {"id or text": bias or false}; a text stands
    for each of its tokens, false for "never"."""
    pairs = list(bias.items()) if isinstance(bias, dict) else list(bias or ())
    out = []
    for i, (key, value) in enumerate(pairs):
        where = f"logit_bias.{key}" if isinstance(bias, dict) else f"logit_bias[{i}]"
        if value is True:
            raise ApiError(400, f"{where}: a bias is a number, or false for never", param=where)
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        tokens = [key] if isinstance(key, int) else engine.tokenize(key, add_special=False)
        out += [(token, float("-inf") if value is False else float(value)) for token in tokens]
    return tuple(out)


def _detokenize(engine: Engine, tokens: list[int] | tuple[int, ...]) -> str:
    """The tokens' text as llama-server's /detokenize gives it: their pieces joined."""
    return b"".join(engine.token_text(t) for t in tokens).decode("utf-8", "replace")


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not UTF-8 on their own (llama-server's with_pieces)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _settings(sampling: Sampling) -> dict[str, Any]:
    """Generation settings under llama-server's names (the ones it has and this server not: their neutral value)."""
    return {
        **_NEUTRAL,
        "n_predict": sampling.max_tokens, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
        "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty, "repeat_last_n": sampling.penalty_last_n,
        "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
        "seed": -1 if sampling.seed is None else sampling.seed, "ignore_eos": sampling.ignore_eos,
        "n_probs": sampling.logprobs or 0,
    }


# ---- responses ----


class _NativeShape:
    """One native completion's documents in llama-server's shape: streamed pieces and the final one, or the
    whole answer. Fed the server's OpenAI-shaped text-completion documents and the generation behind them."""

    def __init__(self, req: CompletionRequest, model: str, token_text: Callable[[int], bytes]) -> None:
        self.req, self.model, self.token_text = req, model, token_text
        self.result = Generation()
        self.reported = 0  # log-probabilities already streamed
        self.new_line = False

    def attach(self, result: Generation) -> None:
        self.result = result

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        choice = body["choices"][0]
        doc = self.final(choice["text"], choice["finish_reason"])
        if self.req.logprobs:
            doc["completion_probabilities"] = [self._probability(e) for e in self.result.logprobs]
        return doc

    async def stream(self, chunks: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
        """llama-server's stream: `data: {"content": ..., "stop": false}` events, then one with stop true and the
        totals; no [DONE]. An error event passes as it is."""
        try:
            async for chunk in chunks:
                for event in chunk.split(b"\n\n"):
                    payload = event.removeprefix(b"data: ").strip()
                    if not payload or payload == b"[DONE]":
                        continue
                    doc = json.loads(payload)
                    choice = doc["choices"][0] if "choices" in doc else None
                    if choice is None:
                        yield sse(doc)
                    elif choice["finish_reason"] is None:
                        yield sse(self.piece(choice["text"]))
                    else:
                        yield sse(self.final("", choice["finish_reason"]))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined] - the server's stream is an async generator
            release()

    def piece(self, text: str) -> dict[str, Any]:
        self.new_line = self.new_line or "\n" in text
        doc = self._counts(text, stop=False)
        if self.req.logprobs:
            entries = self.result.logprobs[self.reported:]
            self.reported += len(entries)
            doc["completion_probabilities"] = [self._probability(e) for e in entries]
        return doc

    def final(self, content: str, finish: str) -> dict[str, Any]:
        """The last document (`content`: the whole answer, or "" at the end of a stream)."""
        word = self.result.stop_word if finish == "stop" else None
        timings = _timings(self.result)
        return {
            **self._counts(content, stop=True),
            "model": self.model,
            "prompt": self.req.prompt,
            "has_new_line": self.new_line or "\n" in content,
            "truncated": False,  # a prompt that does not fit is refused (400), never cut
            "stop_type": "limit" if finish == "length" else "word" if word else "eos",
            "stopping_word": word or "",
            "tokens_cached": timings["cache_n"],
            "timings": timings,
        }

    def _counts(self, content: str, *, stop: bool) -> dict[str, Any]:
        result = self.result
        return {"index": 0, "content": content, "tokens": [], "stop": stop, "id_slot": -1,
                "tokens_predicted": result.completion_tokens, "tokens_evaluated": result.prompt_tokens}

    def _probability(self, entry: TokenLogprob) -> dict[str, Any]:
        return {**self._token(entry.token, entry.logprob),
                "top_logprobs": [self._token(token, logprob) for token, logprob in entry.top]}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.token_text(token)
        return {"id": token, "token": raw.decode("utf-8", "ignore"), "bytes": list(raw), "logprob": logprob}


def _timings(result: Generation) -> dict[str, Any]:
    """llama-server's timings of one generation; an answer from the response cache computed nothing (all 0).
    prompt_ms runs from the request's arrival at the scheduler to its first token (a wait for a slot included)."""
    computed = result.first_token_at is not None
    prompt_n = result.prompt_tokens - result.cached_tokens if computed else 0
    predicted_n = result.completion_tokens if computed else 0
    prompt_ms = (result.first_token_at - result.started_at) * 1000 if computed else 0.0
    end = result.finished_at if result.finished_at is not None else result.first_token_at
    predicted_ms = (end - result.first_token_at) * 1000 if computed else 0.0
    return {
        "cache_n": result.cached_tokens if computed else result.prompt_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
    }
