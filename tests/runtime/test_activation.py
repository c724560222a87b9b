"""install --activate with real failing releases: the new release is checked in a child server (models load within
the budget, /health, one greedy chat request per agent); a release that fails goes back to the previous one, with
one line, exit 1, and the outcome recorded in DIR/activation.json."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import zstandard
from conftest import build_bundle, run_cli
from gguf import GGUFReader
from test_store import members, write_tar

from edgepack.runtime.store import Store


def activate(bundle, store, *extra: str):
    return run_cli("install", str(bundle), "--store", str(store), "--activate", "--health-timeout", "60", *extra)


def test_a_healthy_release_is_activated_and_a_failing_one_rolled_back(tiny_gguf, tiny_bundle, tmp_path):
    store = tmp_path / "store"
    first = activate(tiny_bundle, store)
    assert first.returncode == 0 and "healthy in" in first.stdout, first.stderr
    good = Store(store).release_id()
    assert json.loads((store / "activation.json").read_text())["healthy"] is True

    v2 = build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny", bundle_version=2)
    failed = activate(v2, store, "--memory-budget", "1MiB")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert "failed its health check" in lines[0] and "does not fit the memory budget" in lines[0]
    assert lines[0].endswith(f"rolled back to {good}")
    assert Store(store).release_id() == good
    record = json.loads((store / "activation.json").read_text())
    assert record["healthy"] is False and record["rolled_back_to"] == good


def rewritten(bundle: Path, out: Path, change, version: int = 2) -> Path:  # noqa: ANN001 - change(manifest, entries)
    """`bundle` as `version`, with `change` applied to its manifest (a dict) and members."""
    entries = members(bundle)
    manifest = json.loads(entries[0][1])
    manifest["bundle_version"] = version
    change(manifest, entries)
    entries[0] = (entries[0][0], json.dumps(manifest).encode())
    return write_tar(out, entries)


def break_the_template(bundle: Path, out: Path, version: int = 2) -> Path:
    """A release whose chat template fails when rendered."""
    def change(manifest: dict, _entries: list) -> None:
        for model in manifest["models"]:
            model["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    return rewritten(bundle, out, change, version)


def break_a_segment(bundle: Path, out: Path, version: int = 2) -> Path:
    """A release with a segment built broken: its digest is right (it was built broken, not damaged on the way), so
    only loading it shows the fault. One tensor's type is set to one ggml does not have."""
    def change(manifest: dict, entries: list) -> None:
        model = manifest["models"][0]
        old = model["segments"][1]
        index = next(i for i, (info, _) in enumerate(entries) if info.name == f"blobs/{old}.zst")
        segment = out.with_suffix(".segment.gguf")
        segment.write_bytes(zstandard.ZstdDecompressor().decompress(entries[index][1], max_output_size=1 << 31))
        reader = GGUFReader(segment, "r+")
        reader.tensors[0].field.parts[-2][0] = 200  # the tensor's ggml type: no such type
        del reader
        raw = segment.read_bytes()
        segment.unlink()
        new = "sha256-" + hashlib.sha256(raw).hexdigest()
        packed = zstandard.ZstdCompressor().compress(raw)
        model["segments"][1] = new
        manifest["blobs"][new] = {**manifest["blobs"].pop(old), "size": len(raw), "zsize": len(packed)}
        entries[index] = (f"blobs/{new}.zst", packed)
    return rewritten(bundle, out, change, version)


def test_a_release_whose_chat_template_breaks_is_rolled_back(tiny_bundle, tmp_path):
    store = tmp_path / "store"
    assert activate(tiny_bundle, store).returncode == 0
    good = Store(store).release_id()
    failed = activate(break_the_template(tiny_bundle, tmp_path / "broken.edgepack"), store)
    assert failed.returncode == 1 and "failed its health check" in failed.stderr, failed.stderr
    assert "tiny answered 500" in failed.stderr or "tiny answered 400" in failed.stderr, failed.stderr
    assert Store(store).release_id() == good


def test_a_release_with_a_segment_built_broken_dies_at_load_and_is_rolled_back(tiny_bundle, tmp_path):
    """llama.cpp refuses the file (break_a_segment) and serve exits: activation sees the child server die."""
    store = tmp_path / "store"
    assert activate(tiny_bundle, store).returncode == 0
    good = Store(store).release_id()
    broken = break_a_segment(tiny_bundle, tmp_path / "broken.edgepack")

    failed = activate(broken, store)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert "failed its health check" in lines[0] and "the server exited" in lines[0], lines[0]
    assert lines[0].endswith(f"rolled back to {good}")
    assert Store(store).release_id() == good
    record = json.loads((store / "activation.json").read_text())
    assert record["healthy"] is False and record["rolled_back_to"] == good


@pytest.fixture()
def system_log():
    """A listener on /dev/log, where journald (or any syslog daemon) listens on a board."""
    path = Path("/dev/log")
    if path.exists():
        pytest.skip("/dev/log belongs to this machine's logger")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        pytest.skip(f"cannot listen on /dev/log: {exc}")
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_the_outcome_reaches_the_system_log(tiny_gguf, tiny_bundle, system_log, tmp_path):
    store = tmp_path / "store"
    assert activate(tiny_bundle, store).returncode == 0
    good = Store(store).release_id()
    assert system_log.recv(4096).startswith(f"<14>edgepack: activated {good}: healthy in".encode())  # user.info
    v2 = build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny", bundle_version=2)
    assert activate(v2, store, "--memory-budget", "1MiB").returncode == 1
    line = system_log.recv(4096).decode()
    assert line.startswith("<11>edgepack: release r") and "does not fit the memory budget" in line  # user.err
    assert line.rstrip("\x00").endswith(f"rolled back to {good}")


def test_a_service_that_cannot_be_restarted_on_the_release_sends_it_back(tiny_gguf, tiny_bundle, tmp_path):
    """--service restarts the unit with the real systemctl. Here (no systemd as PID 1, or no such unit) that fails,
    which is what a unit that will not start looks like: the release goes back, the command says why."""
    store = tmp_path / "store"
    assert activate(tiny_bundle, store).returncode == 0
    good = Store(store).release_id()
    v2 = build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny", bundle_version=2)
    failed = activate(v2, store, "--service", "edgepack-no-such-unit")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert "systemctl restart edgepack-no-such-unit failed" in lines[0], lines[0]
    assert lines[0].endswith(f"rolled back to {good}") and Store(store).release_id() == good


def test_api_keys_in_the_environment_do_not_lock_the_check_out(tiny_bundle, tmp_path, monkeypatch):
    """A board whose shell or service sets keys: the child server of the check runs without them (loopback only)."""
    monkeypatch.setenv("EDGEPACK_API_KEYS", "sk-board")
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "edgepack-api-keys").write_text("sk-service\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    done = activate(tiny_bundle, tmp_path / "store")
    assert done.returncode == 0 and "healthy in" in done.stdout, done.stderr
