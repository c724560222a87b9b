"""The device runtime on the boards' Pythons (JetPack 6: 3.10, Bookworm: 3.11, Trixie: 3.13; and 3.12): a plain
install (no host extras), `edgepack install` of a bundle built here, a greedy `run` giving this interpreter's
tokens, and `serve` answering a chat request. Interpreters come from pyenv; one that is missing is a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import post_json, serving

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("3.10", "3.12", "3.13")


def interpreter(version: str) -> Path | None:
    """pyenv's newest CPython `version`.x, else python`version` on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}")) if root.is_dir() else []
    if found:
        return found[-1]
    on_path = shutil.which(f"python{version}")
    return Path(on_path) if on_path else None


@pytest.fixture(scope="module")
def greedy(tiny_bundle, tmp_path_factory) -> str:
    store = tmp_path_factory.mktemp("store311")
    subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "install", str(tiny_bundle), "--store", str(store)],
                   check=True, capture_output=True)
    return run_greedy(Path(sys.executable).parent / "edgepack", store)


def run_greedy(edgepack: Path, store: Path) -> str:
    done = subprocess.run([str(edgepack), "run", "--store", str(store), "--raw", "--max-tokens", "12", "the"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_the_runtime_installs_runs_and_serves_on_python(version, tiny_bundle, greedy, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv install {version})")
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    edgepack = venv / "bin" / "edgepack"
    store = tmp_path / "store"
    installed = subprocess.run([str(edgepack), "install", str(tiny_bundle), "--store", str(store)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert run_greedy(edgepack, store) == greedy  # the same tokens as under this suite's Python
    with serving(store, "--threads", "1", python=venv / "bin" / "python") as base:
        status, doc = post_json(base + "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert status == 200 and doc["usage"]["completion_tokens"] == 4, doc
