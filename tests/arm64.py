"""An emulated aarch64 Debian 12 board for tests: native/arm64-userland.sh's qemu-aarch64-static and arm64 sysroot
(Python 3.11 with venv), prepared once per session, and a runner for commands under `qemu -cpu CPU -L SYSROOT`.
No root, chroot or binfmt: qemu is called directly. What this machine cannot prepare is a pytest skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "native" / "arm64-userland.sh"

# (qemu, sysroot) once prepared, or why it could not be; so a failing script runs once per session, not per test.
_prepared: tuple[Path, Path] | str | None = None


def _prepare() -> tuple[Path, Path] | str:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found: the emulated arm64 board needs apt to fetch qemu-user-static "
                "and Debian's arm64 python3.11 (a Debian-like host)")
    try:
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return f"{SCRIPT.name} took over 15 minutes fetching qemu-user-static and the arm64 packages with apt"
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"{SCRIPT.name} could not fetch qemu-user-static / the arm64 python3.11 with apt: {last[0]}"
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Path(found["QEMU"]), Path(found["SYSROOT"])


def arm64_userland() -> tuple[Path, Path]:
    """(qemu-aarch64-static, sysroot) as absolute paths; skips the calling test when this host cannot prepare them."""
    global _prepared
    if _prepared is None:
        _prepared = _prepare()
    if isinstance(_prepared, str):
        pytest.skip(_prepared)
    return _prepared


def guest_env() -> dict[str, str]:
    """The host's environment minus what would steer the guest's Python or pip to host files (PYTHONPATH, PIP_*)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}


def run_arm64(cpu: str, argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    """`argv` under `qemu-aarch64-static -cpu CPU -L SYSROOT`: absolute paths resolve inside the sysroot first, so
    /lib/ld-linux-aarch64.so.1 is the sysroot's; kwargs go to subprocess.run (env defaults to guest_env())."""
    qemu, sysroot = arm64_userland()
    kwargs.setdefault("env", guest_env())
    return subprocess.run([str(qemu), "-cpu", cpu, "-L", str(sysroot), *map(str, argv)], **kwargs)


def board_python(venv: Path) -> Path:
    """A launcher for `venv`'s python on the emulated board that also works when Python starts itself again
    (subprocess of sys.executable, as doctor does): without binfmt, qemu-user cannot exec an aarch64 binary, but
    the host runs this script, which starts qemu with argv[0] kept (so the venv is found). CPU and sysroot come
    from QEMU_CPU / QEMU_LD_PREFIX (run_board sets them)."""
    qemu, sysroot = arm64_userland()
    launcher = venv / "bin" / "python-board"
    launcher.write_text(f'#!/bin/sh\nexec "{qemu}" -0 "$0" "{sysroot}/usr/bin/python3.11" "$@"\n')
    launcher.chmod(0o755)
    return launcher


def run_board(cpu: str, python: Path, argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    """`python` (a board_python launcher) with argv on the emulated CPU; kwargs go to subprocess.run."""
    kwargs.setdefault("env", board_env(cpu))
    return subprocess.run([str(python), *map(str, argv)], **kwargs)


def board_env(cpu: str) -> dict[str, str]:
    _, sysroot = arm64_userland()
    return {**guest_env(), "QEMU_CPU": cpu, "QEMU_LD_PREFIX": str(sysroot)}
