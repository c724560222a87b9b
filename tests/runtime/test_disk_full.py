"""Disk full during install, on a real small file system: a tmpfs mounted for the test (this needs root; where
mounting is not allowed the test skips and says so). One clear line, the store as it was, and the next install
succeeds once there is room."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import build_bundle, run_cli
from store_snapshot import snapshot

from edgepack.runtime.store import Store


@pytest.fixture()
def small_disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def grow(disk: Path, size: str, inodes: int = 100_000) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size},nr_inodes={inodes}", str(disk)], check=True)


def test_a_full_disk_refuses_the_install_in_one_line_and_keeps_the_store(tiny_gguf, tiny_bundle, small_disk,
                                                                         tmp_path):
    store = small_disk / "store"
    assert run_cli("install", str(tiny_bundle), "--store", str(store)).returncode == 0
    good = Store(store).release_id()
    before = snapshot(store)
    other = build_bundle(tiny_gguf, tmp_path / "q4.edgepack", quant="Q4_0", name="tiny", bundle_version=2)

    full = run_cli("install", str(other), "--store", str(store))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
    assert "only 1.1 MiB free" in lines[0] or "No space left on device" in lines[0], lines[0]
    assert snapshot(store) == before and Store(store).release_id() == good
    assert not list(store.glob(".staging-*")), "the failed install's scratch is gone"

    grow(small_disk, "16m")
    again = run_cli("install", str(other), "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert Store(store).release_id() != good and Store(store).release_id("previous") == good


def test_a_first_install_on_a_full_disk_leaves_no_release(tiny_bundle, small_disk):
    grow(small_disk, "1m")
    store = small_disk / "store"
    full = run_cli("install", str(tiny_bundle), "--store", str(store))
    assert full.returncode == 1 and len(full.stderr.strip().splitlines()) == 1, full.stderr
    assert Store(store).release_id() is None and not list(store.glob(".staging-*"))
    grow(small_disk, "16m")
    assert run_cli("install", str(tiny_bundle), "--store", str(store)).returncode == 0


def test_running_out_in_the_middle_of_the_install_keeps_the_store(tiny_gguf, tiny_bundle, small_disk, tmp_path):
    """Room enough by the byte count the install checks first, but no inodes left half way: a real ENOSPC from
    the kernel in the middle of writing."""
    store = small_disk / "store"
    assert run_cli("install", str(tiny_bundle), "--store", str(store)).returncode == 0
    good = Store(store).release_id()
    other = build_bundle(tiny_gguf, tmp_path / "q4.edgepack", quant="Q4_0", name="tiny", bundle_version=2)
    used = sum(1 for _ in small_disk.rglob("*")) + 1
    grow(small_disk, "16m", inodes=used + 2)
    before = snapshot(store)
    full = run_cli("install", str(other), "--store", str(store))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
    assert "No space left on device" in lines[0], lines[0]
    assert snapshot(store) == before and Store(store).release_id() == good
    grow(small_disk, "16m")
    again = run_cli("install", str(other), "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert not list(store.glob(".staging-*"))
