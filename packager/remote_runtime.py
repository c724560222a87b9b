"""deploy --wheels: bring the device's runtime up to the wheelhouse's edgepack before installing a bundle.

The wheelhouse (`edgepack wheels`) is streamed to the device as a tar over the deploy's ssh connection and
installed offline into a venv there (`pip install --no-index --find-links`), when the device has no edgepack or an
older one. Nothing is compiled on the device.
"""

from __future__ import annotations

import re
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from packaging.version import InvalidVersion, Version

from .errors import PackagerError
from .ssh import Ssh

DEFAULT_VENV = ".edgepack/venv"


@dataclass(frozen=True)
class RuntimeResult:
    edgepack: str  # the device's edgepack command the deploy goes on with
    report: str  # what happened, one line


def wheelhouse_version(wheels: Path) -> Version:
    """The edgepack version a wheelhouse installs (from its edgepack wheel's file name)."""
    found = sorted(wheels.glob("edgepack-*.whl")) if wheels.is_dir() else []
    if not found:
        raise PackagerError(f"--wheels {wheels}: no edgepack wheel there (make one with edgepack wheels --board B -o "
                            f"{wheels})")
    try:
        return Version(found[-1].name.split("-")[1])
    except InvalidVersion:
        raise PackagerError(f"--wheels {wheels}: cannot read the version of {found[-1].name}") from None


def device_version(ssh: Ssh, edgepack: str) -> Version | None:
    """The version of `edgepack` on the device, None when there is none there."""
    result = ssh.run(f"{shlex.quote(edgepack)} --version")
    found = re.search(r"version ([0-9][^\s]*)", result.stdout)
    if result.returncode != 0 or not found:
        return None
    try:
        return Version(found.group(1))
    except InvalidVersion:
        return None


def ensure_runtime(ssh: Ssh, wheels: Path, edgepack: str, venv: str) -> RuntimeResult:
    """The device's edgepack at the wheelhouse's version or newer: `edgepack` as given, else the venv's from an
    earlier --wheels deploy, else installed now into `venv` (a path on the device, relative to the login's home)."""
    wanted = wheelhouse_version(wheels)
    in_venv = f"{venv}/bin/edgepack"
    for candidate in (edgepack, in_venv):
        have = device_version(ssh, candidate)
        if have is not None and have >= wanted:
            return RuntimeResult(candidate, f"runtime: edgepack {have} already on the device ({candidate})")
    remote_wheels = f"{venv}-wheels"
    _send_wheelhouse(ssh, wheels, remote_wheels)
    quoted_venv, quoted_wheels = shlex.quote(venv), shlex.quote(remote_wheels)
    ssh.checked(f"python3 -m venv {quoted_venv} && {quoted_venv}/bin/pip install --quiet --disable-pip-version-check "
                f"--no-index --find-links {quoted_wheels} --upgrade edgepack",
                f"installing the runtime from the wheelhouse into {venv} (the device needs python3 with venv)")
    size = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    return RuntimeResult(in_venv, f"runtime: installed edgepack {wanted} into {venv} from the wheelhouse "
                                  f"({len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB, offline)")


def _send_wheelhouse(ssh: Ssh, wheels: Path, remote: str) -> None:
    """The wheelhouse's wheels and record, as one tar stream unpacked on the device."""
    quoted = shlex.quote(remote)

    def write(stdin: BinaryIO) -> None:
        with tarfile.open(fileobj=stdin, mode="w|") as archive:
            for path in sorted(wheels.iterdir()):
                if path.is_file() and path.suffix in (".whl", ".json"):
                    archive.add(path, arcname=path.name)

    failure = ssh.feed(f"rm -rf {quoted} && mkdir -p {quoted} && tar -x -C {quoted}", write)
    if failure is not None:
        raise PackagerError(f"{ssh.target.destination}: sending the wheelhouse failed: {failure}")
