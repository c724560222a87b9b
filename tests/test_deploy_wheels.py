"""deploy --wheels: a device without edgepack gets the runtime from a wheelhouse, installed offline into a venv over
the deploy's ssh connection, then the bundle; a second deploy finds it there and installs nothing. The "device" is
this machine behind the test's sshd, and the wheelhouse is for this machine's platform (llama-cpp-python's wheel
from pip's cache, the rest fetched for this Python)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from conftest import run_cli

from edgepack.runtime.store import Store

if TYPE_CHECKING:
    from sshd import Sshd

pytest_plugins = ["sshd"]
def test_a_device_without_edgepack_gets_the_runtime_then_the_bundle(sshd: Sshd, host_wheelhouse, tiny_bundle,
                                                                     tmp_path):
    venv, store = tmp_path / "device-venv", tmp_path / "store"
    args = ("deploy", str(tiny_bundle), sshd.url(store), *sshd.options, "--remote-edgepack", "/nonexistent/edgepack",
            "--wheels", str(host_wheelhouse), "--remote-venv", str(venv))
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stderr
    assert f"runtime: installed edgepack 0.1.0 into {venv} from the wheelhouse" in first.stdout
    assert (venv / "bin" / "edgepack").exists() and Store(store).manifest().name == "tiny"
    before = (venv / "bin" / "edgepack").stat().st_mtime_ns
    second = run_cli(*args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"runtime: edgepack 0.1.0 already on the device ({venv}/bin/edgepack)" in second.stdout
    assert (venv / "bin" / "edgepack").stat().st_mtime_ns == before


def test_a_folder_without_an_edgepack_wheel_is_refused_in_one_line(sshd: Sshd, tiny_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli("deploy", str(tiny_bundle), sshd.url(tmp_path / "store"), *sshd.options, "--wheels",
                   str(tmp_path / "empty"))
    assert done.returncode == 1 and "no edgepack wheel there" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
