"""The emulated Raspberry Pi 4 (Cortex-A72, Debian 12): its Python 3.11 runs as aarch64, and a venv made from it
installs the runtime's one binary dependency (msgspec's manylinux aarch64 wheel) offline with Debian's pip wheel."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from arm64 import arm64_userland, run_arm64


def test_bookworm_python_runs_as_aarch64_and_its_venv_installs_a_binary_wheel_offline(tmp_path):
    _, sysroot = arm64_userland()
    wheels = tmp_path / "wheels"
    msgspec = f"msgspec=={importlib.metadata.version('msgspec')}"
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
         "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
         msgspec], capture_output=True, text=True, timeout=300)
    if download.returncode != 0:
        pytest.skip(f"no aarch64 wheel of {msgspec} from pip: {download.stderr.strip()[-300:]}")

    def on_a72(*argv, **kwargs) -> str:
        done = run_arm64("cortex-a72", list(argv), capture_output=True, text=True, timeout=300, **kwargs)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert on_a72(sysroot / "usr/bin/python3.11", "-c", "import platform; print(platform.machine())") == "aarch64"
    venv = tmp_path / "venv"
    on_a72(sysroot / "usr/bin/python3.11", "-m", "venv", "--without-pip", venv)
    # pip runs from Debian's wheel file; --isolated keeps the host's pip.conf out (qemu -L falls back to host files).
    (pip_wheel,) = (sysroot / "usr/share/python-wheels").glob("pip-*.whl")
    on_a72(venv / "bin/python", pip_wheel / "pip", "install", "--isolated", "--no-index", "--find-links", wheels,
           "--no-compile", "--disable-pip-version-check", "--quiet", msgspec)
    decoded = on_a72(venv / "bin/python", "-c", "import msgspec, sys; print(msgspec.json.decode(b'[1]'), sys.prefix)")
    assert decoded == f"[1] {venv}"
