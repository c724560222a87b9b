"""POST /v1/embeddings (and /embeddings), OpenAI-compatible, answered by the bundle's encoders (runtime/encoder.py)
through the model pool's memory budget. The body is declared once here and checked at the border: `input` is a
string, an array of strings, an array of token ids or an array of such arrays; `encoding_format` float or base64
(little-endian float32, as OpenAI's clients decode it); `dimensions` only at the encoder's own width (docs/api.md).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal, Protocol

import msgspec
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .bundle_format import AgentInfo
from .errors import EdgepackError
from .http_common import read_body
from .openai_api import ApiError
from .pool import DoesNotFit, ModelPool
from .schema import SchemaError, decode_json


class Service(Protocol):
    """What the routes need of the server (runtime/server.py's Service): its state and its pool. A protocol, so
    this module does not import the server that imports it."""

    state: str
    pool: ModelPool | None
    agents: dict[str, AgentInfo]


MAX_INPUTS = 2048  # OpenAI's limit per request


class _EmbeddingsBody(msgspec.Struct, frozen=True, kw_only=True):
    input: str | list[Any]  # the items' types are checked below: msgspec takes one array type in a union
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None  # accepted, as OpenAI's is: an end-user id for abuse monitoring


class EmbeddingsApi:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: HttpRequest) -> Response:
        body = _parse(await read_body(request))
        pool = self.service.pool
        if self.service.state != "ready" or pool is None:
            raise ApiError(503, f"the server is {self.service.state}; retry when /health says ok", code="not_ready")
        model = body.model
        agent = self.service.agents.get(model) if model is not None else None
        if agent is not None and agent.semantic_embedder is not None:  # an agent names the encoder it embeds with
            model = agent.semantic_embedder
        info = _encoder(pool.manifest.encoders, model)
        if body.dimensions is not None and body.dimensions != info.dimensions:
            raise ApiError(400, f"dimensions: encoder {info.name!r} gives {info.dimensions} dimensions and was not "
                                "trained to be cut shorter; leave dimensions out or set it to "
                                f"{info.dimensions}", param="dimensions")
        try:
            encoder = await asyncio.to_thread(pool.acquire_encoder, info.name)
        except DoesNotFit as exc:
            raise ApiError(503, str(exc), code="insufficient_memory",
                           headers={"Retry-After": "5"} if exc.busy else None) from None
        except EdgepackError as exc:
            raise ApiError(503, f"encoder {info.name!r} could not be loaded: {exc}", code="load_failed") from None
        try:
            vectors, tokens = await asyncio.to_thread(encoder.embed, _items(body.input))
        except EdgepackError as exc:
            raise ApiError(400, str(exc), param="input") from None
        finally:
            pool.release_encoder(info.name)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": info.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _parse(raw: bytes) -> _EmbeddingsBody:
    try:
        return decode_json(raw, _EmbeddingsBody, "request body")
    except SchemaError as exc:
        raise ApiError(400, str(exc), param=exc.path.lstrip("$.").split("[")[0] or None) from None


def _items(value: str | list[Any]) -> list[str] | list[list[int]]:
    """The inputs as texts or token-id lists (one kind per request, as OpenAI takes them)."""
    items: list[Any] = [value] if isinstance(value, str) else value
    if items and all(type(t) is int for t in items):
        items = [items]  # one array of token ids
    if not items:
        raise ApiError(400, "input: expected at least one input, got an empty array", param="input")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"input: expected at most {MAX_INPUTS} inputs, got {len(items)}", param="input")
    texts = all(isinstance(t, str) for t in items)
    ids = all(isinstance(t, list) and t and all(type(i) is int and i >= 0 for i in t) for t in items)
    if not (texts or ids):
        raise ApiError(400, "input: expected a string, an array of strings, an array of token ids or an array of "
                            "non-empty arrays of token ids", param="input")
    if texts and not all(items):
        raise ApiError(400, "input: expected non-empty strings", param="input")
    return items


def _encoder(encoders: tuple, name: str | None) -> Any:
    if not encoders:
        raise ApiError(404, "this server has no encoder: build one into the bundle (edgepack build-encoder)",
                       param="model", code="model_not_found")
    if name is None:
        if len(encoders) == 1:
            return encoders[0]
        raise ApiError(400, "'model' is required: this server has several encoders", param="model")
    for info in encoders:
        if info.name == name:
            return info
    raise ApiError(404, f"encoder {name!r} does not exist; available: {', '.join(e.name for e in encoders)}",
                   param="model", code="model_not_found")
