"""`edgepack serve`'s listening flags, on real sockets: several --host addresses, a failed bind (one line, non-zero
exit, never "ready"), and CORS with --cors-origins."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest
from conftest import start_server, stop_server, wait_ready


def serve_until_exit(store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "serve", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("hosts", ["127.0.0.1", "127.0.0.2,127.0.0.1"])
def test_failed_bind_is_one_line_and_never_ready(served_store, hosts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_until_exit(served_store, "--host", hosts, "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"could not listen on http://127.0.0.1:{port}" in lines[0], result.stderr
    assert "ready on" not in result.stderr


def test_several_hosts_each_serve(served_store):
    hosts = ["127.0.0.1", "127.0.0.2"] + (["::1"] if ipv6_loopback() else [])
    process, base = start_server(served_store, "--host", ",".join(hosts))
    port = base.rsplit(":", 1)[1]
    try:
        wait_ready(base, process)
        for host in hosts:
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
    finally:
        stop_server(process)
    ready = [line for line in process.stderr.read().splitlines() if "ready on" in line]
    assert len(ready) == 1 and all(host in ready[0] for host in hosts), ready


def test_a_port_in_use_on_ipv6_names_the_bracketed_address(served_store):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_until_exit(served_store, "--host", "[::1]", "--port", str(port))
    assert result.returncode == 1 and f"could not listen on http://[::1]:{port}" in result.stderr


def test_cors_origins(served_store):
    process, base = start_server(served_store, "--cors-origins", "http://app.example, http://other.example")
    try:
        wait_ready(base, process)
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        allowed = httpx.get(base + "/models", headers={"Origin": "http://other.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://other.example"
        refused = httpx.get(base + "/models", headers={"Origin": "http://evil.example"})
        assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
        error = httpx.post(base + "/completion", json={"prompt": ""}, headers={"Origin": "http://app.example"})
        assert error.status_code == 400 and error.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        stop_server(process)


def test_cors_any_origin(served_store):
    process, base = start_server(served_store, "--cors-origins", "*")
    try:
        wait_ready(base, process)
        response = httpx.get(base + "/health", headers={"Origin": "http://anywhere.example"})
        assert response.headers["access-control-allow-origin"] == "*"
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def jetson_store(tiny_gguf, tmp_path_factory):
    """The tiny model built for the Jetson, whose profile puts every layer on the GPU."""
    from conftest import build_bundle

    from edgepack.runtime.boards import load_board
    from edgepack.runtime.store import Store

    bundle = build_bundle(tiny_gguf, tmp_path_factory.mktemp("jetson") / "tiny.edgepack", quant="Q8_0",
                          name="tiny", board=load_board("jetson-orin-nano"))
    store = tmp_path_factory.mktemp("jetson-store")
    Store(store).install(bundle)
    return store


def run_tiny(store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "run", "--store", str(store), "--max-tokens",
                           "4", "--raw", "the", *args], capture_output=True, text=True, timeout=60)


def test_gpu_layers_in_a_build_without_gpu_offload(jetson_store):
    """The Jetson's "all layers on the GPU" is a default: a CPU-only llama.cpp runs its bundle on the CPU; asking
    such a build for GPU layers is a one-line error, not a silent CPU run."""
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has GPU offload (native/check-cuda-offload.sh checks that path)")
    assert run_tiny(jetson_store).returncode == 0
    assert run_tiny(jetson_store, "--gpu-layers", "0").returncode == 0
    refused = run_tiny(jetson_store, "--gpu-layers", "-1")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "Error: --gpu-layers -1: this llama.cpp build has no GPU offload (build the CUDA wheel on the board: "
        "docs/boards.md)"]
    assert serve_until_exit(jetson_store, "--gpu-layers", "4", "--port", "1").returncode == 1
