"""Crash safety of the store, tested by killing: the real CLI (install, rollback, gc) is SIGKILLed at every named
fault point (EDGEPACK_FAULT, runtime/store.py's _fault) and at seeded random moments. After each kill doctor's
store and blobs checks do not fail, current is the old or the new release with every blob intact, and the next
command completes and leaves no debris. docs/bundle-format.md, "Crash and power-loss safety", lists the points.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_bundle, run_cli
from tiny_model import write_tiny_llama

from edgepack.runtime.bundle_format import Digest
from edgepack.runtime.doctor import check_blobs, check_store
from edgepack.runtime.doctor_checks import FAIL
from edgepack.runtime.store import Store, bundle_manifest

RANDOM_INSTALL_RUNS = 40
RANDOM_GC_RUNS = 12
RANDOM_ROLLBACK_RUNS = 12


class Releases:
    """Three versions of a tiny model, one blob per block: `old` (v1), `mid` (v2, blocks 0-1 changed) and
    `new` (v3, blocks 1-3 changed), so each install writes some blobs and skips others."""

    def __init__(self, root: Path) -> None:
        def bundle(name: str, version: int, changed: set[int], seed: int) -> Path:
            gguf = write_tiny_llama(root / f"{name}.gguf", changed_blocks=changed, changed_seed=seed)
            return build_bundle(gguf, root / f"{name}.edgepack", quant="Q8_0", name="tiny", bundle_version=version,
                                blocks_per_segment=1, no_eval=True, no_calibration=True)

        self.old, self.mid, self.new = bundle("old", 1, set(), 0), bundle("mid", 2, {0, 1}, 1), \
            bundle("new", 3, {1, 2, 3}, 2)

    def release(self, bundle: Path) -> str:
        return "r" + Digest.of_bytes(bundle_manifest(bundle).to_json()).short


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Releases:
    return Releases(tmp_path_factory.mktemp("crash-bundles"))


@pytest.fixture(scope="module")
def templates(releases, tmp_path_factory) -> dict[str, Path]:
    """Stores to copy before each kill: `two` (current mid, previous old) and `three` (new installed on top:
    current new, previous mid, old left for gc)."""
    base = tmp_path_factory.mktemp("crash-templates")
    two = Store(base / "two")
    two.install(releases.old)
    two.install(releases.mid)
    shutil.copytree(two.root, base / "three", symlinks=True)
    Store(base / "three").install(releases.new)
    return {"two": two.root, "three": base / "three"}


def fresh(template: Path, where: Path) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(template, where, symlinks=True)
    return where


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgepack.runtime.cli", *args]


def run_with_fault(args: list[str], point: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "EDGEPACK_FAULT": point})


def kill_after(args: list[str], delay: float) -> int:
    """Start the command, SIGKILL it after `delay` seconds (unless it finished); its exit status."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    return process.wait(timeout=60)


def duration(args: list[str], template: Path, where: Path) -> float:
    """Seconds the command takes to the end on a copy of the template (median of three)."""
    times = []
    for _ in range(3):
        fresh(template, where)
        started = time.monotonic()
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        times.append(time.monotonic() - started)
        assert done.returncode == 0, done.stderr
    return sorted(times)[1]


def assert_consistent(root: Path, allowed: set[str], where: str) -> None:
    """doctor's store and blobs checks do not fail; current is one of `allowed`, every blob of it intact."""
    store = Store(root)
    store_check, kept = check_store(store)
    blobs_check = check_blobs(store, kept)
    for check in (store_check, blobs_check):
        assert check.status != FAIL, f"{where}: doctor's {check.name} check fails: {check.summary}"
    assert store.release_id() in allowed, f"{where}: current is {store.release_id()}, expected one of {allowed}"
    for digest, blob in store.manifest().blobs.items():
        path = store.blob_path(digest)
        assert path.is_file() and path.stat().st_size == blob.size, f"{where}: blob {digest} missing or short"
        assert Digest.of_bytes(path.read_bytes()) == digest, f"{where}: blob {digest} damaged"


def assert_no_debris(root: Path, where: str) -> None:
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".incoming")
    assert not left, f"{where}: debris left after the next command: {left}"


def assert_recovers(root: Path, bundle: Path, release: str, where: str) -> None:
    """The next install of `bundle` completes, makes it current, and leaves a consistent store without debris."""
    done = run_cli("install", str(bundle), "--store", str(root), timeout=60)
    assert done.returncode == 0, f"{where}: the next install fails: {done.stderr}"
    assert_consistent(root, {release}, f"{where}, after the next install")
    assert_no_debris(root, f"{where}, after the next install")


def upload(root: Path, bundle: Path) -> Path:
    """The bundle where deploy puts it before the device's install: DIR/.incoming/<name>."""
    incoming = root / ".incoming"
    incoming.mkdir(exist_ok=True)
    return Path(shutil.copy(bundle, incoming / "delta.edgepack"))


def install_points(releases: Releases, templates: dict[str, Path]) -> list[str]:
    store = Store(templates["two"])
    written = [d for d, b in bundle_manifest(releases.new).blobs.items() if not store.has_blob(d, b)]
    return ["staged", *(f"blob-{i}" for i in range(len(written))), "release-written", "previous-tmp",
            "previous-switched", "current-tmp", "committed"]


def test_install_killed_at_each_fault_point(releases, templates, tmp_path):
    before, after = releases.release(releases.mid), releases.release(releases.new)
    points = install_points(releases, templates)
    assert len(points) >= 9  # three blobs written
    for point in points:
        root = fresh(templates["two"], tmp_path / "store")
        bundle = upload(root, releases.new)
        done = run_with_fault(command("install", str(bundle), "--store", str(root)), point)
        assert done.returncode == -signal.SIGKILL, f"{point}: not killed there ({done.returncode}, {done.stderr})"
        assert_consistent(root, {before, after}, f"install killed at {point}")
        assert bundle.read_bytes() == releases.new.read_bytes(), f"{point}: the upload in .incoming/ changed"
        assert_recovers(root, bundle, after, f"install killed at {point}")
        assert Store(root).release_id("previous") == before, f"{point}: previous is not the release before"


def test_doctor_command_passes_after_a_kill(releases, templates, tmp_path):
    """The real `edgepack doctor --json` on a store whose install was killed midway (debris left)."""
    root = fresh(templates["two"], tmp_path / "store")
    done = run_with_fault(command("install", str(releases.new), "--store", str(root)), "blob-0")
    assert done.returncode == -signal.SIGKILL
    report = json.loads(run_cli("doctor", "--store", str(root), "--json", timeout=120).stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["store"]["status"] != FAIL and checks["blobs"]["status"] != FAIL, checks
    assert checks["store"]["status"] == "warn" and "the next one removes it" in checks["store"]["summary"]
    assert checks["store"]["details"]["debris"][0].startswith(".staging-")


def test_a_half_deleted_release_is_written_again(releases, templates, tmp_path):
    """What a kill inside an older edgepack's gc could leave (releases/<id>/ without its manifest): installing that
    release again writes it whole instead of trusting the directory."""
    root = fresh(templates["three"], tmp_path / "store")
    old = releases.release(releases.old)
    (root / "releases" / old / "manifest.json").unlink()
    done = run_cli("install", str(releases.old), "--store", str(root), "--allow-downgrade", timeout=60)
    assert done.returncode == 0, done.stderr
    assert_consistent(root, {old}, "a half-deleted release installed again")
    assert_no_debris(root, "a half-deleted release installed again")


def test_gc_killed_at_each_fault_point(releases, templates, tmp_path):
    current = releases.release(releases.new)
    store = Store(templates["three"])
    referenced = set(store.manifest("current").blobs) | set(store.manifest("previous").blobs)
    garbage = [p for p in store.blobs.iterdir() if Digest.parse(p.name) not in referenced]
    assert garbage
    for point in ["gc-releases-moved", *(f"gc-blob-{i}" for i in range(len(garbage)))]:
        root = fresh(templates["three"], tmp_path / "store")
        done = run_with_fault(command("gc", "--store", str(root)), point)
        assert done.returncode == -signal.SIGKILL, f"{point}: not killed there ({done.returncode}, {done.stderr})"
        assert_gc_recovers(root, releases, current, f"gc killed at {point}")


def assert_gc_recovers(root: Path, releases: Releases, current: str, where: str) -> None:
    """Consistent after the kill; the next gc completes; the collected old release installs again whole."""
    assert_consistent(root, {current}, where)
    done = run_cli("gc", "--store", str(root), timeout=60)
    assert done.returncode == 0, f"{where}: the next gc fails: {done.stderr}"
    assert_no_debris(root, f"{where}, after the next gc")
    assert_recovers(root, releases.new, current, where)
    done = run_cli("install", str(releases.old), "--store", str(root), "--allow-downgrade", timeout=60)
    assert done.returncode == 0, f"{where}: reinstalling the collected release fails: {done.stderr}"
    assert_consistent(root, {releases.release(releases.old)}, f"{where}, the collected release reinstalled")


def test_rollback_killed_at_each_fault_point(releases, templates, tmp_path):
    before, after = releases.release(releases.new), releases.release(releases.mid)
    for point in ["current-tmp", "rollback-current-switched", "previous-tmp"]:
        root = fresh(templates["three"], tmp_path / "store")
        done = run_with_fault(command("rollback", "--store", str(root)), point)
        assert done.returncode == -signal.SIGKILL, f"{point}: not killed there ({done.returncode}, {done.stderr})"
        assert_consistent(root, {before, after}, f"rollback killed at {point}")
        assert_recovers(root, releases.new, before, f"rollback killed at {point}")


@pytest.mark.parametrize("which", ["install", "gc", "rollback"])
def test_killed_at_random_moments(which, releases, templates, tmp_path):
    rng = random.Random(f"crash-{which}")
    root = tmp_path / "store"
    template = templates["two" if which == "install" else "three"]
    if which == "install":  # from where deploy uploads it; each run's copy of the template carries it
        template = fresh(template, tmp_path / "template")
        upload(template, releases.new)
    runs = {"install": RANDOM_INSTALL_RUNS, "gc": RANDOM_GC_RUNS, "rollback": RANDOM_ROLLBACK_RUNS}[which]
    args = {"install": ["install", str(root / ".incoming" / "delta.edgepack")], "gc": ["gc"],
            "rollback": ["rollback"]}[which]
    args = command(*args, "--store", str(root))
    full = duration(args, template, root)
    statuses = []
    for run in range(runs):
        fresh(template, root)
        delay = rng.uniform(0, full)
        status = kill_after(args, delay)
        statuses.append(status)
        where = f"{which} killed after {delay:.3f}s of {full:.3f}s (run {run})"
        if which == "install":
            assert_consistent(root, {releases.release(releases.mid), releases.release(releases.new)}, where)
            assert_recovers(root, root / ".incoming" / "delta.edgepack", releases.release(releases.new), where)
        elif which == "gc":
            assert_gc_recovers(root, releases, releases.release(releases.new), where)
        else:
            assert_consistent(root, {releases.release(releases.new), releases.release(releases.mid)}, where)
            assert_recovers(root, releases.new, releases.release(releases.new), where)
    assert statuses.count(-signal.SIGKILL) >= runs // 2, f"most runs should be killed midway: {statuses}"
