"""`edgepack serve` over a real socket: OpenAI API (also through the official client), health,
metrics, concurrency, and 4xx answers to bad requests without the server falling over."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.request

import httpx
import openai
import pytest
from conftest import post_json, start_server, stop_server, wait_ready


def test_models_and_health(server):
    with urllib.request.urlopen(server + "/v1/models") as response:
        models = json.loads(response.read())
    assert [m["id"] for m in models["data"]] == ["tiny"]
    with urllib.request.urlopen(server + "/health") as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"


def test_chat_completion_non_streamed(server):
    status, body = post_json(server + "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "the time"}], "max_tokens": 8, "temperature": 0,
        "ignore_eos": True,
    })
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 0


def test_greedy_is_deterministic_and_streaming_matches(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the word"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == again.choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_with_sampling_extensions_and_stop(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    extras = {"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1, "ignore_eos": True}
    seeded = [
        client.completions.create(model="tiny", prompt="the way", max_tokens=10, temperature=0.9, seed=7,
                                  extra_body=extras).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    full = client.completions.create(model="tiny", prompt="the way", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) >= 3
    stop = full[1:3]
    cut = client.completions.create(model="tiny", prompt="the way", max_tokens=10, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(model="tiny", prompt="the way", max_tokens=10, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full


def test_concurrent_clients_all_get_their_own_answers(server):
    def ask(i: int) -> str:
        status, body = post_json(server + "/v1/completions", {
            "model": "tiny", "prompt": f"the {['time', 'word', 'way', 'hot'][i % 4]}", "max_tokens": 10,
            "temperature": 0, "ignore_eos": True,
        })
        assert status == 200, body
        return body["choices"][0]["text"]

    sequential = [ask(i) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_answers = list(pool.map(ask, range(8)))
    assert concurrent_answers == sequential + sequential


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "context size"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n: expected int <= 8"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "the " * 5000}]}, 400, "context size"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_json_4xx(server, body, status, message):
    got, doc = post_json(server + "/v1/chat/completions", body)
    assert got == status, doc
    assert message in doc["error"]["message"]
    assert doc["error"]["type"] == "invalid_request_error"


def test_oversized_body_unknown_route_and_wrong_method(server):
    # A declared size over the limit is answered before the body is read (so the client is not made to send it).
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (2 << 20))
        answer = b""
        while b"larger than" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer, answer
    response = httpx.get(server + "/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(server + "/v1/chat/completions")
    assert response.status_code == 405
    # Lying Content-Length with a chunked body that keeps going is cut off too.
    def chunks():
        for _ in range(40):
            yield b"a" * 65536

    response = httpx.post(server + "/v1/completions", content=chunks(), timeout=30)
    assert response.status_code == 413
    got, _ = post_json(server + "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
    assert got == 200  # still serving


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_disconnecting_stream_client_stops_its_generation(served_store):
    # a generation far too long to finish on its own on any machine before the disconnect is seen
    process, server = start_server(served_store, "--threads", "1", "--ctx", "32768")
    try:
        wait_ready(server, process)
        check_disconnect_stops_generation(server, max_tokens=32000)
    finally:
        stop_server(process)


def check_disconnect_stops_generation(server: str, max_tokens: int) -> None:
    payload = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": max_tokens, "stream": True,
                          "ignore_eos": True}).encode()
    generated_before = metric(server, "edgepack_generated_tokens_total")
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the first event"
            received += chunk
    deadline = time.monotonic() + 20
    while metric(server, "edgepack_generations_cancelled_total") < 1:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.05)
    assert metric(server, "edgepack_generated_tokens_total") - generated_before < max_tokens
    got, body = post_json(server + "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3,
                                                       "ignore_eos": True}, timeout=20)
    assert got == 200 and body["usage"]["completion_tokens"] == 3


def test_metrics_exposition(server):
    post_json(server + "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "ignore_eos": True})
    post_json(server + "/v1/chat/completions", b"{bad")
    text = urllib.request.urlopen(server + "/metrics").read().decode()
    assert 'edgepack_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'edgepack_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    assert "edgepack_request_duration_seconds_bucket" in text
    assert 'edgepack_time_to_first_token_seconds_count{model="tiny"}' in text
    assert 'edgepack_generated_tokens_total{model="tiny"}' in text
    assert 'edgepack_decode_tokens_per_second{model="tiny"}' in text
    assert "edgepack_requests_in_flight" in text
    rss = next(line for line in text.splitlines() if line.startswith("edgepack_process_resident_memory_bytes "))
    assert float(rss.split()[1]) > 10e6


def test_serve_fails_cleanly_on_missing_blobs(served_store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(served_store, broken, symlinks=True)
    blob = next((broken / "blobs").iterdir())
    blob.chmod(0o644)
    blob.unlink()
    process, _ = start_server(broken)
    assert process.wait(timeout=30) == 1
    assert "missing" in process.stderr.read()


def _serve_in_thread(service, port: int):
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, thread


def test_health_reports_loading_then_ready_then_failure(served_store):
    import threading

    from conftest import free_port

    from edgepack.runtime.bundle_format import AgentInfo
    from edgepack.runtime.memory import Budget
    from edgepack.runtime.pool import ModelPool
    from edgepack.runtime.serve_config import resolve_config
    from edgepack.runtime.server import Service
    from edgepack.runtime.store import Store

    store = Store(served_store)
    manifest = store.manifest()
    config = resolve_config(manifest, threads=1)
    gate = threading.Event()

    def gated_pool(make_scheduler):
        gate.wait(30)  # hold the real loader back so the loading state is observable
        return ModelPool(store, manifest, config, Budget(2**34, "test"), make_scheduler=make_scheduler)

    port = free_port()
    service = Service(gated_pool, [AgentInfo(name="tiny", model="tiny")], preload=True)
    server, thread = _serve_in_thread(service, port)
    base = f"http://127.0.0.1:{port}"
    try:
        response = httpx.get(base + "/health")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        got, body = post_json(base + "/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert got == 503 and "loading" in body["error"]["message"]
        gate.set()
        wait_until = time.monotonic() + 30
        while httpx.get(base + "/health").status_code != 200:
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        got, _ = post_json(base + "/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert got == 200
    finally:
        server.should_exit = True
        thread.join(10)

    failures = []
    from edgepack.runtime.bundle_format import AgentInfo

    def broken_load(make_scheduler):
        raise RuntimeError("segment sha256-x is unreadable")

    port = free_port()
    service = Service(broken_load, [AgentInfo(name="tiny", model="tiny")], on_failure=failures.append)
    server, thread = _serve_in_thread(service, port)
    try:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        response = httpx.get(f"http://127.0.0.1:{port}/health")
        assert response.status_code == 503
        assert response.json() == {"status": "failed", "error": "segment sha256-x is unreadable"}
    finally:
        server.should_exit = True
        thread.join(10)
