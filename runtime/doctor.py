"""`edgepack doctor`: what a person runs first on a new board, and what support asks for. One line per check
(ok, warn, fail, skip), or --json; exit 1 when any check fails. The machine's checks are in doctor_checks.py;
the store's and the systemd unit's are here. docs/doctor.md explains each check.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import signal
import subprocess
import sys
from pathlib import Path

import click

from .boards import board_memory_gib
from .bundle_format import Digest, Manifest
from .cli_common import format_table
from .doctor_checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    System,
    check_board,
    check_cpu,
    check_disk,
    check_jetson,
    check_memory,
    check_thermal,
    check_threads,
    check_throttling,
    compare_simd,
    cpu_flags,
)
from .errors import EdgepackError
from .local_config import read_local_config
from .memory import format_mib
from .store import INCOMING, Store
from .systemd_unit import UNIT_NAME

_UNIT_PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "SubState", "Result", "ExecMainStatus",
                    "WatchdogUSec", "NRestarts")


# ---- the store -------------------------------------------------------------------------------


def check_store(store: Store) -> tuple[Check, list[Manifest]]:
    """Releases, current and previous, and whether each has every blob it needs at its size; with the readable
    manifests of current and previous (current first). What an interrupted command left is a warning: harmless,
    and the next install, rollback or gc removes it (docs/bundle-format.md, crash safety)."""
    check, kept = _check_releases(store)
    debris = [p.name for p in store.debris()]
    incoming = store.root / INCOMING
    uploads = sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []
    notes = [f"left by an interrupted (or a running) install, rollback or gc: {', '.join(debris)}; the next one "
             "removes it"] if debris else []
    notes += [f"uploads of an interrupted (or a running) deploy in {INCOMING}/: {', '.join(uploads)}; the same "
              f"deploy resumes them, rm them to drop them"] if uploads else []
    if not notes:
        return check, kept
    details = {**check.details, "debris": debris, "uploads": uploads}
    status = WARN if check.status == OK else check.status
    return Check("store", status, "; ".join([check.summary, *notes]), details), kept


def _check_releases(store: Store) -> tuple[Check, list[Manifest]]:
    if not store.root.is_dir():
        return Check("store", FAIL, f"{store.root} does not exist (edgepack install BUNDLE --store DIR)"), []
    releases = sorted(p.name for p in store.releases.iterdir()) if store.releases.is_dir() else []
    current, previous = store.release_id("current"), store.release_id("previous")
    details: dict[str, object] = {"releases": releases, "current": current, "previous": previous}
    if current is None:
        return Check("store", FAIL, f"{store.root} has no current release (edgepack install BUNDLE)", details), []
    try:
        manifest = store.manifest("current")
        read_local_config(store)  # serve refuses a bad local.json: so does doctor
    except EdgepackError as exc:
        return Check("store", FAIL, str(exc), details), []
    missing = [str(d) for d, b in manifest.blobs.items() if not store.has_blob(d, b)]
    details["missing"] = missing
    what = f"current {current} is {manifest.name} v{manifest.bundle_version} ({manifest.board or 'host'} board)"
    if missing:
        return Check("store", FAIL, f"{what}, but {len(missing)} of its blobs are missing or of the wrong size: "
                                    f"{', '.join(missing)}; install the bundle again", details), [manifest]
    summary = f"{what}, all {len(manifest.blobs)} blobs present; {len(releases)} release(s)"
    if previous is None:
        return Check("store", OK, summary + ", no previous", details), [manifest]
    try:
        before = store.manifest("previous")
    except EdgepackError as exc:
        return Check("store", WARN, f"{summary}; previous {previous}: {exc} (rollback would fail)", details), \
            [manifest]
    lost = [str(d) for d, b in before.blobs.items() if not store.has_blob(d, b)]
    details["previous_missing"] = lost
    if lost:
        return Check("store", WARN, f"{summary}; previous {previous} misses {len(lost)} blob(s), rollback would "
                                    "fail", details), [manifest, before]
    return Check("store", OK, f"{summary}, previous {previous} ({before.name} v{before.bundle_version}) complete",
                 details), [manifest, before]


def blob_matches(path: Path, digest: Digest) -> bool:
    """Whether the file's sha256 is `digest`, hashed through a read-only map (no copy of a big blob in memory)."""
    with open(path, "rb") as handle:
        if path.stat().st_size == 0:
            return Digest.of_bytes(b"") == digest
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return Digest.of_bytes(data) == digest  # type: ignore[arg-type]  # any buffer hashes


def check_blobs(store: Store, kept: list[Manifest]) -> Check:
    """Every file under DIR/blobs re-hashed against its name; what gc would free (blobs current and previous
    do not use)."""
    if not store.blobs.is_dir():
        return Check("blobs", SKIP if not store.root.is_dir() else WARN, f"no {store.blobs}")
    used = {d for manifest in kept for d in manifest.blobs}
    damaged, stray, count, unused, total = [], [], 0, 0, 0
    for path in sorted(store.blobs.iterdir()):
        try:
            digest = Digest.parse(path.name)
        except EdgepackError:
            stray.append(path.name)
            continue
        size = path.stat().st_size
        count, total = count + 1, total + size
        try:
            intact = blob_matches(path, digest)
        except OSError:
            intact = False
        if not intact:
            damaged.append(path.name)
        elif digest not in used:
            unused += size
    details = {"blobs": count, "bytes": total, "damaged": damaged, "stray": stray, "unused_bytes": unused}
    summary = f"{count} blobs ({format_mib(total, 1)}) re-hashed"
    if damaged:
        return Check("blobs", FAIL, f"{summary}: {len(damaged)} do not match their sha256: {', '.join(damaged)}; "
                                    "delete them (rm -f) and install the bundle again", details)
    notes = [f"{format_mib(unused, 1)} used by neither current nor previous (edgepack gc frees it)"] if unused else []
    notes += [f"files that are not blobs: {', '.join(stray)}"] if stray else []
    return Check("blobs", WARN if stray else OK, "; ".join([summary + ", all intact", *notes]), details)


# ---- the systemd unit --------------------------------------------------------------------------


def check_unit(system: System) -> Check:
    result = system.command("systemctl", "show", UNIT_NAME, "--property=" + ",".join(_UNIT_PROPERTIES))
    if result is None:
        return Check("unit", SKIP, "systemctl not on PATH: no systemd to run edgepack as a service")
    status, output = result
    if status != 0:
        return Check("unit", SKIP, f"systemctl cannot answer: {output.splitlines()[0] if output else status}")
    props = dict(line.partition("=")[::2] for line in output.splitlines())
    if props.get("LoadState") == "not-found":
        return Check("unit", SKIP, f"{UNIT_NAME} is not installed (edgepack unit writes one, docs/systemd.md)", props)
    watchdog = props.get("WatchdogUSec", "0")
    summary = (f"{UNIT_NAME} {props.get('UnitFileState', '?')}, {props.get('ActiveState', '?')} "
               f"({props.get('SubState', '?')}), last exit status {props.get('ExecMainStatus', '?')}, restarts "
               f"{props.get('NRestarts', '?')}, watchdog {'off' if watchdog in ('0', 'infinity') else watchdog}")
    if props.get("ActiveState") == "failed":
        return Check("unit", FAIL, f"{summary}: see journalctl -u {UNIT_NAME}", props)
    if props.get("ActiveState") != "active":
        return Check("unit", WARN, f"{summary}: not running", props)
    return Check("unit", OK, summary, props)


# ---- all together --------------------------------------------------------------------------------


# Run in a child: a llama.cpp built for another CPU dies with SIGILL as soon as it loads, and doctor must live
# to say so.
_PROBE = """
import json, llama_cpp
from edgepack.runtime import llama
version = llama.version()  # initialises llama.cpp with its log routed away from the terminal
print(json.dumps([llama_cpp.llama_print_system_info().decode(errors="replace"),
                  bool(llama_cpp.llama_supports_gpu_offload()), version]))
"""


def llama_build() -> tuple[str, bool, str] | str:
    """(llama_print_system_info() text, whether the build can offload to a GPU, its version), or why the
    installed llama.cpp could not even load here."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "loading llama.cpp took over 120 s"
    if done.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        return ("the installed llama.cpp stops with SIGILL (illegal instruction) as soon as it loads: it was built "
                "for a CPU with instructions this one lacks")
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return f"the installed llama.cpp does not load: {lines[-1]}"
    info, gpu, version = json.loads(done.stdout.strip().splitlines()[-1])
    return info, gpu, version


def serve_threads(store: Store, manifest: Manifest) -> tuple[int, str]:
    """The threads serve resolves for the current release on this machine, and where the number comes from."""
    from .serve_config import resolve_config

    local = read_local_config(store)
    threads = resolve_config(manifest, local=local, gpu_layers=0).threads  # 0: no need to load llama.cpp
    if "threads" in local:
        return threads, "local.json, from edgepack tune"
    if manifest.runtime.threads:
        return threads, f"the bundle's board default {manifest.runtime.threads}, capped at the core plan"
    return threads, "the core plan"


def run_checks(system: System, store_dir: Path | None, build: tuple[str, bool, str] | str) -> list[Check]:
    board, profile = check_board(system)
    store = Store(store_dir) if store_dir is not None else None
    if store is None:
        store_check, kept = Check("store", SKIP, "no --store given"), []
    else:
        store_check, kept = check_store(store)
    current = kept[0] if kept else None
    threads = serve_threads(store, current) if store and current and system.live else None
    weights = max((sum(current.blobs[d].size for d in m.segments) for m in current.models), default=0) \
        if current else 0
    if isinstance(build, str):
        flags = sorted(cpu_flags(system))
        simd, gpu = Check("simd", FAIL, f"{build}; install the runtime built for this board (edgepack wheels)",
                          {"cpu": flags}), False
    else:
        info, gpu, version = build
        simd = compare_simd(cpu_flags(system), info)
        simd = dataclasses.replace(simd, summary=f"{simd.summary} [{version}]")
    return [
        board,
        check_cpu(system, profile),
        check_threads(system, threads),
        simd,
        check_memory(system, board_memory_gib(current.board) if current else None, weights),
        check_disk(store.root if store else None,
                   sum(b.size for b in current.blobs.values()) if current else 0),
        check_thermal(system),
        check_throttling(system, profile),
        check_jetson(system, profile, gpu),
        store_check,
        check_blobs(store, kept) if store is not None else Check("blobs", SKIP, "no --store given"),
        check_unit(system),
    ]


def render(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL, SKIP)}
    table = format_table([("STATUS", "CHECK", "RESULT")] + [(c.status, c.name, c.summary) for c in checks])
    return table + "\n" + ", ".join(f"{n} {s}" for s, n in counts.items())


@click.command("doctor")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also check this store: every blob re-hashed, the releases complete.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: one entry per check.")
def doctor_command(store_dir: Path | None, as_json: bool) -> None:
    """Check this device for serving: board, CPU and SIMD against the llama.cpp build, memory, disk, heat,
    power, Jetson, the store and the systemd unit. Exit status 1 when any check fails (warnings do not)."""
    checks = run_checks(System(), store_dir, llama_build())
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        worst = FAIL if failed else WARN if any(c.status == WARN for c in checks) else OK
        click.echo(json.dumps({"status": worst, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        click.echo(render(checks))
    if failed:
        sys.exit(1)
