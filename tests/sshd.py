"""For the deploy tests (test_deploy.py, test_ansible.py): a real OpenSSH server on 127.0.0.1 (an ephemeral port,
an ephemeral host key, one generated client key; the "device" is this machine and this venv) and two versions of a
bundle to send through it. Test modules load it with `pytest_plugins = ["sshd"]` and import nothing else from it
(that would import it before pytest can rewrite its asserts)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_bundle
from tiny_model import write_tiny_llama

from edgepack.packager.demo import free_port

SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class Sshd:
    port: int
    root: Path  # the server's folder: keys, known_hosts, config, log
    user: str = pwd.getpwuid(os.getuid()).pw_name
    edgepack: str = str(Path(sys.executable).parent / "edgepack")  # the device's edgepack: this venv's

    @property
    def client_key(self) -> Path:
        return self.root / "client"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def options(self) -> tuple[str, ...]:
        """deploy's command-line ssh options: the client key and this server's host key."""
        return ("-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "--identity", str(self.client_key))

    def url(self, store: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{store}"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Iterator[Sshd]:
    """sshd -D on an ephemeral port with an ephemeral host key, accepting one generated client key."""
    if not SSHD.exists():
        pytest.skip("OpenSSH server missing: install the Debian package openssh-server (.ci/run does)")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "client.pub", root / "authorized_keys")
    port = free_port()
    server = Sshd(port, root)
    server.known_hosts.write_text(f"[127.0.0.1]:{port} {(root / 'host.pub').read_text()}")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
    )
    with open(root / "sshd.log", "wb") as log:  # a file, not a pipe nobody reads while it fills
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stderr=log)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile="
                              f"{server.known_hosts}", "-i", str(server.client_key), "-p", str(port),
                              f"{server.user}@127.0.0.1", "true"], capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"sshd did not start: {(root / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory) -> tuple[Path, Path]:
    """v1 and v2 of one model whose v2 retrained one block: one of its block segments differs."""
    root = tmp_path_factory.mktemp("versions")
    base = write_tiny_llama(root / "base.gguf", n_layer=8)
    tuned = write_tiny_llama(root / "tuned.gguf", n_layer=8, changed_blocks={3})
    options = {"quant": "Q8_0", "name": "tiny", "blocks_per_segment": 2, "no_eval": True}
    return (build_bundle(base, root / "v1.edgepack", **options),
            build_bundle(tuned, root / "v2.edgepack", bundle_version=2, **options))
