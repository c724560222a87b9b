"""edgepack deploy against a real OpenSSH server on 127.0.0.1: full, delta and resumed uploads, a refused bundle
leaving the device's store as it was, and destination errors. The "device" is this machine and this venv (the
server: tests/sshd.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import corrupt_new_blob, run_cli

from edgepack.packager.deploy import SshTarget, parse_dest, plan_delta
from edgepack.packager.errors import PackagerError
from edgepack.runtime.blobs_command import present_blobs
from edgepack.runtime.bundle_format import MANIFEST_NAME, Digest
from edgepack.runtime.store import Store, bundle_manifest

if TYPE_CHECKING:
    from sshd import Sshd

pytest_plugins = ["sshd"]  # the fixtures sshd and two_versions


def deploy(bundle: Path, dest: str, sshd: Sshd, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("deploy", str(bundle), dest, *sshd.options, "--remote-edgepack", sshd.edgepack, *extra)


def bytes_sent(result: subprocess.CompletedProcess) -> int:
    assert result.returncode == 0, result.stderr
    return int(re.search(r"sent ([\d,]+) bytes of", result.stdout).group(1).replace(",", ""))


def snapshot(root: Path) -> dict[str, tuple[object, int]]:
    """Every path under root: link target, file content or nothing (a folder), and mode."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None,
                                       p.lstat().st_mode) for p in root.rglob("*")}


def padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def expected_delta_size(bundle: Path, present: set[Digest]) -> int:
    """From the manifest alone: a 512-byte header and the padded data for manifest.json and each missing blob,
    then two zero blocks."""
    manifest = bundle_manifest(bundle)
    members = [len(manifest.to_json())] + [b.zsize for d, b in manifest.blobs.items() if d not in present]
    return sum(tarfile.BLOCKSIZE + padded(size) for size in members) + 2 * tarfile.BLOCKSIZE


def test_first_deploy_sends_the_whole_bundle_and_installs_it(sshd, tiny_bundle, tmp_path):
    store = tmp_path / "device" / "store"
    started = time.monotonic()
    result = deploy(tiny_bundle, sshd.url(store), sshd)
    seconds = time.monotonic() - started
    sent = bytes_sent(result)
    size = tiny_bundle.stat().st_size
    assert Store(store).manifest().name == "tiny"
    assert sent == expected_delta_size(tiny_bundle, set()) and size - 10240 < sent <= size
    assert not (store / ".incoming").exists()
    assert "already on the device" in result.stdout and "installed tiny v1" in result.stdout
    print(f"\nfirst deploy: sent {sent} of {size} bytes in {seconds:.2f}s")


def test_delta_deploy_sends_only_the_missing_blobs(sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    store = tmp_path / "store"
    assert bytes_sent(deploy(v1, sshd.url(store), sshd))
    started = time.monotonic()
    result = deploy(v2, sshd.url(store), sshd)
    seconds = time.monotonic() - started
    sent = bytes_sent(result)
    old, new = bundle_manifest(v1), bundle_manifest(v2)
    missing = set(new.blobs) - set(old.blobs)
    assert 1 <= len(missing) < len(new.blobs)
    assert sent == expected_delta_size(v2, set(old.blobs)) < v2.stat().st_size / 2
    assert Store(store).manifest().bundle_version == 2 and Store(store).release_id("previous")
    assert f"{len(missing)} blob(s) sent, {len(new.blobs) - len(missing)} already on the device" in result.stdout
    print(f"\ndelta deploy: sent {sent} of {v2.stat().st_size} bytes in {seconds:.2f}s")


def test_deploy_candidate_sends_the_delta_and_leaves_the_current_release(sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    store = tmp_path / "store"
    assert bytes_sent(deploy(v1, sshd.url(store), sshd))
    current = Store(store).release_id()
    result = deploy(v2, sshd.url(store), sshd, "--candidate")
    assert bytes_sent(result) == expected_delta_size(v2, set(bundle_manifest(v1).blobs))
    assert Store(store).release_id() == current and Store(store).release_id("previous") is None
    assert Store(store).manifest("candidate").bundle_version == 2
    assert "as candidate" in result.stdout


def test_an_interrupted_upload_resumes_with_the_remaining_bytes(sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    store = Store(tmp_path / "store")
    store.install(v1)
    # What a dropped connection leaves on the device: a prefix of the delta under its final name.
    delta = plan_delta(v2, present_blobs(store))
    whole = delta.write(tmp_path / delta.name).read_bytes()
    assert len(whole) == delta.size == expected_delta_size(v2, set(bundle_manifest(v1).blobs))
    with tarfile.open(tmp_path / delta.name) as archive:
        assert archive.getnames()[0] == MANIFEST_NAME
        assert {m.name for m in archive.getmembers()[1:]} == {d.member_name for d in delta.sent_blobs}
    (store.root / ".incoming").mkdir()
    (store.root / ".incoming" / delta.name).write_bytes(whole[: len(whole) // 2])
    result = deploy(v2, sshd.url(store.root), sshd)
    assert bytes_sent(result) == len(whole) - len(whole) // 2
    assert f"resumed: {len(whole) // 2:,} of the delta's {len(whole):,} bytes" in result.stdout
    assert store.manifest().bundle_version == 2
    assert not (store.root / ".incoming").exists()


def test_a_corrupted_bundle_is_refused_by_the_device_and_its_store_is_unchanged(sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    store = Store(tmp_path / "store")
    store.install(v1)
    missing = corrupt_new_blob(v1, v2, tmp_path / "hostile.edgepack")
    before = snapshot(store.root)
    result = deploy(tmp_path / "hostile.edgepack", sshd.url(store.root), sshd)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "the device refused the bundle" in result.stderr and str(missing) in result.stderr
    assert snapshot(store.root) == before


def test_device_failures_are_one_line(sshd, tiny_bundle, tmp_path):
    result = run_cli("deploy", str(tiny_bundle), sshd.url(tmp_path / "s"), *sshd.options,
                     "--remote-edgepack", "/nonexistent/edgepack")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "--remote-edgepack" in result.stderr
    result = run_cli("deploy", str(tiny_bundle), sshd.url(tmp_path / "s"), "-o", "BatchMode=yes",
                     "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/dev/null",
                     "--remote-edgepack", sshd.edgepack)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"cannot connect to {sshd.user}@127.0.0.1" in result.stderr
    assert "Host key verification failed" in result.stderr


def test_blobs_lists_the_store_and_an_absent_store_holds_nothing(tiny_bundle, tmp_path):
    absent = run_cli("blobs", "--store", str(tmp_path / "absent"))
    assert absent.returncode == 0, absent.stderr
    assert json.loads(absent.stdout)["blobs"] == {} and not (tmp_path / "absent").exists()
    Store(tmp_path / "store").install(tiny_bundle)
    listing = json.loads(run_cli("blobs", "--store", str(tmp_path / "store")).stdout)
    assert listing["blobs"] == {str(d): b.size for d, b in bundle_manifest(tiny_bundle).blobs.items()}


def test_a_local_destination_installs_directly(tiny_bundle, tmp_path):
    result = run_cli("deploy", str(tiny_bundle), str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert Store(tmp_path / "store").manifest().name == "tiny"


@pytest.mark.parametrize(("dest", "message"), [
    ("ftp://host/store", "unsupported scheme 'ftp://'"),
    ("ssh://host", "no store path"),
    ("ssh://host/", "no store path"),
    ("ssh:///store", "no host"),
    ("ssh://host:99999/store", "port is not a number"),
    ("ssh://user:secret@host/store", "password in the URL is refused"),
])
def test_bad_destinations_are_refused_with_one_line(dest, message):
    with pytest.raises(PackagerError, match=re.escape(message)):
        parse_dest(dest)


def test_destinations_parse():
    assert parse_dest("ssh://pi@board.local:2222/var/lib/edgepack/") == SshTarget(
        host="board.local", path="/var/lib/edgepack", user="pi", port=2222)
    assert parse_dest("ssh://board/srv/store", port=22) == SshTarget(host="board", path="/srv/store", port=22)
    assert parse_dest("relative/store") == Path("relative/store")


def test_a_bad_destination_on_the_command_line_is_one_line(tiny_bundle):
    result = run_cli("deploy", str(tiny_bundle), "http://board/store")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: deploy destination 'http://board/store': unsupported scheme 'http://': expected "
        "ssh://[user@]host[:port]/absolute/store/path or a local store directory"]


def test_a_downgrade_needs_allow_downgrade_on_the_device_too(sshd, two_versions, tmp_path):
    v1, v2 = two_versions
    store = Store(tmp_path / "store")
    store.install(v2)
    refused = deploy(v1, sshd.url(store.root), sshd)
    assert refused.returncode == 1 and "--allow-downgrade" in refused.stderr
    assert store.manifest().bundle_version == 2
    assert bytes_sent(deploy(v1, sshd.url(store.root), sshd, "--allow-downgrade")) == expected_delta_size(
        v1, set(bundle_manifest(v2).blobs))
    assert store.manifest().bundle_version == 1


def test_deploy_activate_has_the_device_health_check_the_release(sshd, tiny_bundle, tmp_path):
    done = deploy(tiny_bundle, sshd.url(tmp_path / "store"), sshd, "--activate", "--health-timeout", "60")
    assert done.returncode == 0, done.stderr
    assert "device: activated r" in done.stdout and "healthy in" in done.stdout
    assert json.loads((tmp_path / "store" / "activation.json").read_text())["healthy"] is True


def test_deploy_activate_with_a_service_the_device_cannot_restart_fails_in_one_line(sshd, tiny_bundle, tmp_path):
    """--service reaches the device's install: its real systemctl cannot restart the unit here (no systemd as PID 1,
    or no such unit), so the release fails its activation; with no earlier release there is nothing to go back to."""
    done = deploy(tiny_bundle, sshd.url(tmp_path / "store"), sshd, "--activate", "--health-timeout", "60",
                  "--service", "edgepack-no-such-unit")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "the device refused the bundle" in lines[0] and "systemctl restart edgepack-no-such-unit" in lines[0]
    assert "no previous release to go back to" in lines[0]
    assert json.loads((tmp_path / "store" / "activation.json").read_text())["healthy"] is False
