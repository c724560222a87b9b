"""The Ansible role edgepack_deploy (packager/ansible/) run by ansible-playbook against a real OpenSSH server on
127.0.0.1: two inventory hosts (aliases of this machine, each with its own store) get a bundle, then only the delta
of the next version; a corrupted bundle fails the first host and the rollout stops before the second. Also
`edgepack delta` and `edgepack ansible-roles`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import corrupt_new_blob, run_cli

from edgepack.packager.deploy import ANSIBLE_ROLES, plan_delta
from edgepack.runtime.store import Store, bundle_manifest

if TYPE_CHECKING:
    from sshd import Sshd

pytest_plugins = ["sshd"]  # the fixtures sshd and two_versions

PLAYBOOK = ANSIBLE_ROLES.parent / "deploy.yml"
HOSTS = ("board-a", "board-b")
REPORT = re.compile(r"edgepack (\S+): (\S+) v(\d+): sent (\d+) bytes of a (\d+)-byte bundle .*?; device: ([^\"]*)")


@pytest.fixture(scope="module")
def ansible_playbook() -> str:
    if importlib.util.find_spec("ansible") is None:
        pytest.skip("Ansible missing: pip install ansible-core (in the test extra)")
    found = Path(sys.executable).parent / "ansible-playbook"
    if not found.exists():
        found = Path(shutil.which("ansible-playbook") or "")
    if not found.is_file():
        pytest.skip("ansible-playbook not found beside this Python or on PATH: pip install ansible-core")
    return str(found)


def write_inventory(path: Path, sshd: Sshd, stores: dict[str, Path]) -> Path:
    """Two hosts that are this machine: the same address and port, each with its own store."""
    group = {
        "hosts": {host: {"edgepack_store": str(store)} for host, store in stores.items()},
        "vars": {
            "ansible_host": "127.0.0.1", "ansible_port": sshd.port, "ansible_user": sshd.user,
            "ansible_ssh_private_key_file": str(sshd.client_key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": sys.executable,
            "edgepack_remote": sshd.edgepack, "edgepack_controller": sshd.edgepack,
        },
    }
    path.write_text(json.dumps({"all": {"children": {"edgepack": group}}}))  # JSON is YAML
    return path


def ansible_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_LOCALHOST_WARNING": "0", "LC_ALL": "C.UTF-8",
            # ssh's connection multiplexer should not outlive the test by a minute
            "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=2s"}


def play(ansible_playbook: str, inventory: Path, bundle: Path, tmp_path: Path, playbook: Path = PLAYBOOK
         ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([ansible_playbook, "-i", str(inventory), str(playbook), "-e", f"edgepack_bundle={bundle}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ansible_env(tmp_path))
    return result, time.monotonic() - started


def reports(result: subprocess.CompletedProcess) -> dict[str, tuple[int, int, str]]:
    """host -> (bytes sent, bundle size, the device's install line), from the role's report lines."""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return {m[1]: (int(m[4]), int(m[5]), m[6]) for m in REPORT.finditer(result.stdout)}


def snapshot(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}


def test_a_fleet_gets_the_bundle_then_only_the_delta(ansible_playbook, sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    stores = {host: tmp_path / host / "store" for host in HOSTS}
    inventory = write_inventory(tmp_path / "inventory.yml", sshd, stores)

    first, first_seconds = play(ansible_playbook, inventory, v1, tmp_path)
    full = plan_delta(v1, {}).size
    assert reports(first) == {host: (full, v1.stat().st_size, reports(first)[host][2]) for host in HOSTS}
    for host, store in stores.items():
        assert Store(store).manifest().bundle_version == 1
        assert "installed tiny v1" in reports(first)[host][2]
        assert not (store / ".incoming").exists()

    second, second_seconds = play(ansible_playbook, inventory, v2, tmp_path)
    old_blobs = {d: b.size for d, b in bundle_manifest(v1).blobs.items()}
    delta = plan_delta(v2, old_blobs)
    assert len(delta.sent_blobs) == 1 and delta.size < v2.stat().st_size / 2
    for host, store in stores.items():
        sent, size, device = reports(second)[host]
        assert (sent, size) == (delta.size, v2.stat().st_size)
        assert "installed tiny v2" in device and "1 blob(s) written" in device
        assert Store(store).manifest().bundle_version == 2 and Store(store).release_id("previous")
        assert not (store / ".incoming").exists()
    assert re.search(r"board-b\s+: ok=\d+\s+changed=[1-9]", second.stdout)

    again, _ = play(ansible_playbook, inventory, v2, tmp_path)
    for host in HOSTS:
        assert reports(again)[host][0] == plan_delta(v2, {d: b.size for d, b in bundle_manifest(v2).blobs.items()}).size
        assert "tiny v2 is already the current release" in reports(again)[host][2]
    assert "ok: [board-a]" in again.stdout.split("Install it with the device's edgepack")[1].split("TASK")[0]
    assert not list(Path(tmp_path).glob("edgepack-*"))  # the controller's temp folders are removed
    print(f"\nansible, 2 hosts, serial 1: v1 sent {full} of {v1.stat().st_size} bytes per host in {first_seconds:.1f}s;"
          f" v2 sent {delta.size} of {v2.stat().st_size} bytes per host in {second_seconds:.1f}s")


def test_a_refused_bundle_stops_the_rollout_before_the_next_host(ansible_playbook, sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    stores = {host: Store(tmp_path / host / "store") for host in HOSTS}
    for store in stores.values():
        store.install(v1)
    missing = corrupt_new_blob(v1, v2, tmp_path / "hostile.edgepack")
    before = {host: snapshot(store.root) for host, store in stores.items()}
    inventory = write_inventory(tmp_path / "inventory.yml", sshd, {h: s.root for h, s in stores.items()})

    result, _ = play(ansible_playbook, inventory, tmp_path / "hostile.edgepack", tmp_path)
    assert result.returncode != 0
    assert re.search(rf"board-a: the device refused the bundle: .*{missing}", result.stdout)
    assert "[board-b]" not in result.stdout  # never touched: not even asked for its blobs
    assert {host: snapshot(store.root) for host, store in stores.items()} == before


def test_ansible_roles_prints_the_roles_path(ansible_playbook, tmp_path):
    printed = run_cli("ansible-roles")
    assert printed.returncode == 0, printed.stderr
    roles = Path(printed.stdout.strip())
    assert (roles / "edgepack_deploy" / "tasks" / "main.yml").is_file()
    (tmp_path / "site.yml").write_text("- hosts: all\n  gather_facts: false\n  roles: [edgepack_deploy]\n")
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(roles)}
    check = subprocess.run([ansible_playbook, "--syntax-check", "-i", "localhost,", "site.yml"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_delta_writes_what_deploy_would_send(two_versions, tmp_path):
    v1, v2 = two_versions
    have = tmp_path / "have.json"
    have.write_text(json.dumps({"edgepack": "0.1.0", "blobs": {str(d): b.size for d, b in
                                                                bundle_manifest(v1).blobs.items()}}))
    result = run_cli("delta", str(v2), "--have", str(have), "-o", str(tmp_path / "delta.edgepack"))
    assert result.returncode == 0, result.stderr
    delta = plan_delta(v2, {d: b.size for d, b in bundle_manifest(v1).blobs.items()})
    assert (tmp_path / "delta.edgepack").read_bytes() == b"".join(delta.chunks())
    assert f"{delta.size:,} bytes of a {v2.stat().st_size:,}-byte bundle" in result.stdout
    assert "1 blob(s) carried, " in result.stdout
    store = Store(tmp_path / "store")
    store.install(v1)
    store.install(tmp_path / "delta.edgepack")
    assert store.manifest().bundle_version == 2


def test_delta_refuses_a_bad_listing_in_one_line(tiny_bundle, tmp_path):
    (tmp_path / "have.json").write_text('{"edgepack": "0.1.0", "blobs": {"sha256-nothex": 1}}')
    result = run_cli("delta", str(tiny_bundle), "--have", str(tmp_path / "have.json"), "-o", str(tmp_path / "d"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--have " in result.stderr and "sha256-nothex" in result.stderr
    result = run_cli("delta", str(tiny_bundle), "--have", "-", "-o", str(tiny_bundle))
    assert result.returncode == 1 and "that is the bundle itself" in result.stderr
