"""Limits a hostile client cannot exceed, on a real `edgepack serve` over real sockets: a head or a body
dribbled in, connections that never ask anything, a flood of idle connections, heads too big, and request
bodies that are not text (timeouts lowered by flags, so each case takes a second or two)."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import post_json, serving, stop_server, wait_ready

from edgepack.packager.demo import free_port

QUICK = ("--threads", "1", "--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1")


@pytest.fixture(scope="module")
def quick(served_store) -> Iterator[str]:
    with serving(served_store, *QUICK) as base:
        yield base


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds` while we send `trickle` one byte every 0.2 s."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    for byte in [trickle[i:i + 1] for i in range(len(trickle))] or [b""] * 10**6:
        if time.monotonic() > deadline:
            return False
        try:
            if byte:
                sock.sendall(byte)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset: closed with our last byte unread
            return True
    return False


def _request(sock: socket.socket, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a whole request head (no body) and read the answer: status, headers, body."""
    sock.sendall(head)
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().strip()) != b"":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


def _healthy(base: str) -> bool:
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        return response.status == 200


def test_a_head_dribbled_one_byte_at_a_time_is_cut_off(quick):
    # Found by the issue: one byte every 2 s kept a connection open for good (uvicorn re-arms no timer).
    with _connect(quick) as sock:
        head = b"GET /v1/models HTTP/1.1\r\nHost: edge\r\nX-Slow: " + b"a" * 1000
        assert _closed_within(sock, 15, head)
    assert _healthy(quick)


def test_a_connection_that_sends_nothing_is_closed(quick):
    with _connect(quick) as sock:
        assert _closed_within(sock, 15)


def test_a_body_dribbled_in_is_cut_off(quick):
    with _connect(quick) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        assert _closed_within(sock, 15, b"a" * 1000)
    assert _healthy(quick)


def test_an_idle_kept_alive_connection_is_closed(quick):
    with _connect(quick) as sock:
        status, _, _ = _request(sock, b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert status == 200
        assert _closed_within(sock, 15)


def test_heads_too_big_too_many_headers_or_too_long_a_target_are_refused(quick):
    big = b"GET /v1/models HTTP/1.1\r\nHost: edge\r\nX-Big: " + b"a" * 20_000
    with _connect(quick) as sock:  # 16 KiB of head and no end yet: h11 refuses it, uvicorn answers 400 and closes
        status, _, _ = _request(sock, big)
        assert status == 400 and _closed_within(sock, 5)
    with _connect(quick) as sock:  # a whole head, likely read at once: measured after parsing
        status, _, _ = _request(sock, big + b"\r\n\r\n")
        assert status in (400, 431)
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    with _connect(quick) as sock:
        status, _, body = _request(sock, b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n" + many + b"\r\n")
        assert status == 431 and "more than 100 headers" in json.loads(body)["error"]["message"]
    with _connect(quick) as sock:
        status, _, body = _request(sock, b"GET /v1/models?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert status == 414 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert _healthy(quick)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "a\\udc00", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/completion", b'{"prompt": "\\ud800", "n_predict": 2}'),
    ("/tokenize", b'{"content": "\\ud800"}'),
])
def test_a_lone_surrogate_escape_is_a_400_that_says_so(quick, path, body):
    # Found by the issue: {"prompt": "\ud800"} answered 500.
    status, doc = post_json(quick + path, body)
    assert status == 400 and "lone UTF-16 surrogate" in doc["error"]["message"]


@pytest.mark.parametrize("body", [b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}', b'{"prompt": "\xff"}', b'"\xff"'])
def test_bytes_that_are_not_utf8_are_a_400(quick, body):
    # An encoded surrogate (ED A0 80) or a stray byte reached msgspec's UnicodeDecodeError: it answered 500.
    status, doc = post_json(quick + "/v1/completions", body)
    assert status == 400 and "not UTF-8 text" in doc["error"]["message"]


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "user", "content": []}, {"role": "system", "content": []}])
def test_a_chat_message_without_content_is_a_400_naming_the_field(quick, message):
    # Found by the issue: a user message without content answered 200. OpenAI requires it (a string, or a
    # list of at least one part) for every message but an assistant's that carries tool calls.
    status, doc = post_json(quick + "/v1/chat/completions", {"messages": [message], "max_tokens": 2})
    assert status == 400
    assert doc["error"]["param"] == "messages[0].content" and "required" in doc["error"]["message"]


# ---- connections -----------------------------------------------------------------------------


@contextlib.contextmanager
def _server_with_open_files(store, limit: int, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`edgepack serve` with at most `limit` open files (soft and hard), as on a board with a low ulimit -n."""
    port = free_port()

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    process = subprocess.Popen([sys.executable, "-m", "edgepack.runtime.cli", "serve", "--store", str(store),
                                "--port", str(port), "--threads", "1", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lower)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base, process
    finally:
        stop_server(process)


def _flood(base: str, count: int) -> list[socket.socket]:
    """`count` connections that will never send a byte, opened without waiting for each handshake."""
    host, port = base.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, int(port)))
        sockets.append(sock)
    return sockets


def test_a_real_request_gets_through_a_flood_of_idle_connections(served_store):
    # Found by the issue: with 400 idle connections open, a request was reset in 3 of 4 runs. Here the server
    # has 1024 open files (a common ulimit -n) and 1200 idle connections arrive: the old server ran out of
    # descriptors, logged each failed accept and stopped answering; now the longest idle ones make room.
    with _server_with_open_files(served_store, 1024) as (base, process):
        idle = _flood(base, 1200)
        try:
            time.sleep(1)  # let the flood land first
            status, doc = post_json(base + "/v1/completions", {"prompt": "hi", "max_tokens": 2}, timeout=30)
            assert status == 200, doc
            assert _healthy(base)
        finally:
            for sock in idle:
                sock.close()
    assert "Too many open files" not in process.stderr.read()


def test_at_max_connections_the_longest_idle_is_closed_for_a_new_one(served_store):
    with serving(served_store, "--threads", "1", "--max-connections", "8", "--header-timeout", "60") as base:
        idle = [_connect(base) for _ in range(20)]
        try:
            status, _ = post_json(base + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200
            assert _closed_within(idle[0], 5) and _closed_within(idle[11], 5)
            assert not _closed_within(idle[-1], 1)
        finally:
            for sock in idle:
                sock.close()


def test_when_every_connection_is_busy_a_new_request_gets_a_clean_503(served_store):
    with serving(served_store, "--threads", "1", "--max-connections", "2", "--body-timeout", "60") as base:
        busy = [_connect(base) for _ in range(2)]
        try:
            for sock in busy:  # two requests in flight, their bodies still coming
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(1.5)  # for their heads to be read (a probe sooner would find them idle, and close one)
            with _connect(base) as sock:
                status, headers, body = _request(sock, b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        finally:
            for sock in busy:
                sock.close()
        time.sleep(0.5)
        assert _healthy(base)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/apply-template"])
def test_a_deeply_nested_body_is_a_400_not_a_500(quick, route):
    """bench/soak.py's finding: about 1,000 levels of nesting made msgspec raise RecursionError, a 500."""
    for body in (b"[" * 2000 + b"]" * 2000,
                 b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", '
                 b'"function": {"name": "f", "parameters": {"a": ' + b"[" * 3000 + b"]" * 3000 + b"}}}]}"):
        status, doc = post_json(quick + route, body)
        assert status == 400 and "nested too deeply" in doc["error"]["message"], (status, doc)
