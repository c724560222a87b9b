"""What the HTTP layer's route modules share (runtime/server.py, runtime/llama_server_api.py): request bodies read
within a limit, server-sent events, run-once callbacks, and the hooks another API's route adds to the one
completion path. A leaf: it imports neither route module.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from .openai_api import ApiError

if TYPE_CHECKING:
    from .engine import Generation

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Hooks:
    """What a route of another API (llama_server_api.py) adds to the one completion path: a prompt given
    as token ids (req.prompt is then their text; such a request bypasses the caches, which key prompts by text),
    and a look at the generation behind the answer, for a response of its own shape."""

    prompt_tokens: tuple[int, ...] = ()
    on_answer: Callable[[Generation], None] = lambda result: None


NO_HOOKS = Hooks()


def once(action: Callable[[], object]) -> Callable[[], None]:
    """action, run at most once however often the result is called."""
    lock, ran = threading.Lock(), []

    def run() -> None:
        with lock:
            if ran:
                return
            ran.append(True)
        action()

    return run


def sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


async def read_body(request: HttpRequest) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:  # gone, or closed for sending too slowly (http_guard.py): nobody reads this answer
        raise ApiError(400, "the request body did not arrive whole", code="incomplete_body") from None
    return bytes(body)
