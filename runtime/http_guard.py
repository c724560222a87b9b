"""Limits a hostile client cannot exceed: how long it may take to send a request's head and body, how many
connections it may hold, how big a head, how many headers, how long a request line. uvicorn's own settings
carry what they can (the head's size, the keep-alive timeout, the listen backlog); the rest is a small
subclass of uvicorn's h11 protocol and an ASGI check of the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import EdgepackError
from .openai_api import ApiError

MAX_HEAD_BYTES = 16 * 1024  # request line and headers together (h11's default, set explicitly)
MAX_HEADERS = 100  # Apache's LimitRequestFields
MAX_TARGET_BYTES = 8 * 1024  # the request line's path and query
BACKLOG = 2048  # connections the kernel queues before accept at most (capped by net.core.somaxconn)
RESERVED_FILES = 64  # descriptors kept for models, the caches, the listening sockets and the loader
BUSY_RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    header_timeout: float = 10.0  # seconds from connecting (or the last answer) to a request's whole head
    body_timeout: float = 30.0  # seconds from the head to the body's last byte
    idle_timeout: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)
    backlog: int = BACKLOG  # connections the kernel queues before they are accepted (fit_open_files)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise EdgepackError(f"--max-connections must be at least 1, got {self.max_connections}")
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise EdgepackError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)}")

    def uvicorn_settings(self) -> dict[str, Any]:
        """uvicorn.Config's own limits. Not limit_concurrency: it answers 503 to every request once that many
        connections are open, idle ones included, so a few hundred idle sockets would lock everyone out;
        GuardedH11Protocol makes room by closing idle connections instead."""
        return {
            "http": guarded_protocol(self),
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
            "timeout_keep_alive": self.idle_timeout,
            "backlog": self.backlog,
        }


def fit_open_files(max_connections: int) -> tuple[int, int, str | None]:
    """The connections and the listen backlog that fit under the open-file limit, after raising the soft
    limit to the hard one; with a warning when --max-connections had to be lowered.

    Each connection is a descriptor, and asyncio accepts up to `backlog` connections in one go before any of
    them can close an idle one; running out on the way makes Python 3.11 log every remaining accept of that
    burst (thousands of lines) and stop accepting for a second. So connections and a few bursts must fit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FILES + 3 * BACKLOG
    raised = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if raised > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    room = max(soft - RESERVED_FILES, 4)
    backlog = max(min(BACKLOG, room // 8), 1)
    spare = 3 * backlog  # a burst being accepted, one being made, and the idle ones it evicts, not yet closed
    if room - spare >= max_connections:
        return max_connections, backlog, None
    fitted = max(room - spare, 1)
    return fitted, backlog, (f"--max-connections {max_connections} lowered to {fitted}: the open-file limit is "
                             f"{soft} (raise LimitNOFILE= or ulimit -n)")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with deadlines and a cap it lacks.

    uvicorn re-arms no timer while a request's head arrives (each byte cancels the keep-alive timeout) and
    has none for a new connection or a body, so a client sending one byte every few seconds holds a
    connection forever. Here a connection waiting for a request must deliver the whole head within
    header_timeout, and a request's body must arrive within body_timeout; past either, the connection is
    closed. This sits in the protocol, not in ASGI middleware, because the application sees a request only
    once its head is complete. At max_connections, a new connection makes room by closing the one that has
    waited longest without a request in flight; if every one is busy, its request is answered 503.
    """

    limits: Limits = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_phase = ""
        self._waiting_since = time.monotonic()
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and self._open_connections() > \
                self.limits.max_connections and not self._evict_longest_waiting():
            self.app = _busy  # read its request, then refuse it: closing at once could reach the client as a reset
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm()

    def on_response_complete(self) -> None:
        self._waiting_since = time.monotonic()
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline("", 0)
        super().connection_lost(exc)

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        """The deadline for what the connection now waits for: a head, a body, or nothing (an answer)."""
        if self.transport.is_closing():
            self._set_deadline("", 0)
        elif not self._in_flight():
            self._set_deadline("head", self.limits.header_timeout)
        elif self.conn.their_state is h11.SEND_BODY:
            self._set_deadline("body", self.limits.body_timeout)
        else:
            self._set_deadline("", 0)

    def _set_deadline(self, phase: str, seconds: float) -> None:
        if phase == self._deadline_phase:
            return  # a deadline runs from the start of its phase: bytes trickling in do not extend it
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_phase = phase
        if phase:
            self._deadline = self.loop.call_later(seconds, self.transport.close)

    def _open_connections(self) -> int:
        """Connections not already closing (one closed a moment ago leaves the set on the next loop turn)."""
        return sum(not c.transport.is_closing() for c in self.connections if isinstance(c, GuardedH11Protocol))

    def _evict_longest_waiting(self) -> bool:
        waiting = [c for c in self.connections
                   if c is not self and isinstance(c, GuardedH11Protocol) and not c._in_flight()
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c._waiting_since).transport.close()
        return True


def guarded_protocol(limits: Limits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds each connection with, bound to these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


async def _busy(scope: dict, receive: Callable, send: Callable) -> None:
    from starlette.responses import JSONResponse

    error = ApiError(503, "the server has no room for another connection; retry later", code="too_many_connections")
    await JSONResponse(error.body(), status_code=503, headers={
        "Retry-After": str(BUSY_RETRY_AFTER_SECONDS), "Connection": "close"})(scope, receive, send)


class CheckRequestHead:
    """ASGI middleware: a request target too long is 414, too many headers or too big a head 431. h11 caps the
    head only while it is incomplete (uvicorn answers 400 and closes), so one that arrived whole in a single
    read of up to 256 KiB is measured here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        error = None
        if scope["type"] == "http":
            if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_TARGET_BYTES:
                error = ApiError(414, f"the request target is longer than {MAX_TARGET_BYTES} bytes")
            elif len(scope["headers"]) > MAX_HEADERS:
                error = ApiError(431, f"the request has more than {MAX_HEADERS} headers")
            elif sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > MAX_HEAD_BYTES:
                error = ApiError(431, f"the request's headers are larger than {MAX_HEAD_BYTES} bytes")
        if error is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        await JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})(
            scope, receive, send)
