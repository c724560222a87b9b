"""edgepack under systemd: units that systemd's own tools accept and rate as well sandboxed, the
sd_notify protocol over a real datagram socket, `edgepack unit`, and a real `serve` telling systemd
it is ready, alive and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import post_json, stop_server, wait_ready

from edgepack.packager.demo import free_port
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.sd_notify import notify, watchdog_interval, watchdog_loop
from edgepack.runtime.systemd_unit import default_executable, parse_memory_max, render_unit, unit_command

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")

# ---- units, checked by systemd-analyze ---------------------------------------------------------

UNIT_VARIANTS = {
    "defaults": {},
    "dedicated-user": {"user": "edgepack", "watchdog": 30, "memory_max": "1.5G", "serve_args": ["--slots", "4"]},
    "low-port-all-interfaces": {"host": "0.0.0.0", "port": 80, "user": "edgepack", "memory_max": "75%"},
    "specific-address": {"host": "192.168.1.20", "port": 8443, "restart_sec": 2.5, "start_timeout": 1800},
    "awkward-store-under-home": {"store": "/home/pi/my store 100% $HOME ;", "serve_args": ["--threads", "2"]},
    "user-unit": {"user_unit": True, "memory_max": "2GiB", "watchdog": 20, "store": "/home/pi/edgepack"},
}


def _render(variant: dict) -> str:
    options = dict(variant)
    return render_unit(Path(options.pop("store", "/var/lib/edgepack")), **options)


def _analyze(unit_dir: Path, *args: str, user: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if user:  # the user manager's lookups need a runtime directory
        runtime = unit_dir / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=unit_dir, env=env)


def _verify(unit_dir: Path, text: str, user: bool = False) -> subprocess.CompletedProcess:
    (unit_dir / "edgepack.service").write_text(text)
    return _analyze(unit_dir, "verify", "./edgepack.service", user=user)


def _exposure(unit_dir: Path, text: str, user: bool = False) -> float:
    (unit_dir / "edgepack.service").write_text(text)
    result = _analyze(unit_dir, "security", "--offline=yes", "--no-pager", "./edgepack.service", user=user)
    match = re.search(r"Overall exposure level for edgepack\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("variant", UNIT_VARIANTS.values(), ids=UNIT_VARIANTS.keys())
def test_units_pass_systemd_analyze_verify_without_a_warning(variant, tmp_path):
    result = _verify(tmp_path, _render(variant), user=variant.get("user_unit", False))
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_systemd_analyze
def test_verify_would_catch_what_systemd_rejects(tmp_path):
    """The check above is only worth something if systemd-analyze complains about bad lines."""
    unit = _render({}).replace("MemoryDenyWriteExecute=yes", "MemoryDenyWriteExecute=yes\nNoSuchSetting=1")
    assert "Unknown key 'NoSuchSetting'" in _verify(tmp_path, unit).stderr
    unit = _render({}).replace("TimeoutStopSec=30", "TimeoutStopSec=thirty")
    assert "thirty" in _verify(tmp_path, unit).stderr


@needs_systemd_analyze
def test_system_units_rate_ok_in_systemds_security_review(tmp_path):
    """systemd-analyze's exposure scale: 0 (locked down) to 10 (unprotected); under 2 is its "OK" band."""
    assert _exposure(tmp_path, _render({"user": "edgepack"})) < 2.0
    assert _exposure(tmp_path, _render({})) < 2.0  # root, but with an empty capability bounding set
    # A user unit gets only the sandboxing that needs no privileges (seccomp, no mount namespaces).
    assert _exposure(tmp_path, _render({"user_unit": True}), user=True) < 7.0


@needs_systemd_analyze
def test_an_executable_path_with_spaces_and_specifiers_reaches_systemd_intact(tmp_path):
    """verify fails unless the quoted ExecStart path unquotes to a file that exists."""
    odd = tmp_path / "bin dir 100% $HOME"
    odd.mkdir()
    (odd / "edgepack").symlink_to(default_executable())
    result = _verify(tmp_path, render_unit(Path("/var/lib/edgepack"), executable=odd / "edgepack"))
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_paths_systemd_would_refuse_are_refused_here():
    with pytest.raises(EdgepackError, match="quotes, backslashes"):  # "Executable name contains special characters"
        render_unit(Path("/var/lib/edgepack"), executable=Path("/opt/o'brien/bin/edgepack"))
    for store in ("var/lib/edgepack", "/var/lib/edge\npack"):
        with pytest.raises(EdgepackError, match="absolute path without control characters"):
            render_unit(Path(store))


def test_unit_shape():
    unit = _render({"user": "edgepack", "watchdog": 30, "memory_max": "3G", "serve_args": ["--slots", "4"]})
    lines = unit.splitlines()
    for line in ("Type=notify", "NotifyAccess=main", "User=edgepack", "WatchdogSec=30", "MemoryMax=3G",
                 "Restart=on-failure", "ReadWritePaths=/var/lib/edgepack", "WantedBy=multi-user.target",
                 "IPAddressDeny=any", "CapabilityBoundingSet=", "MemoryDenyWriteExecute=yes",
                 "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1"):
        assert line in lines
    assert f"ExecStart={default_executable()} serve --store /var/lib/edgepack --host 127.0.0.1 --port 8080 " \
           "--slots 4" in lines
    user_unit = _render({"user_unit": True})
    assert "WantedBy=default.target" in user_unit and "ProtectSystem" not in user_unit and "User=" not in user_unit


def test_protect_home_hides_home_only_when_nothing_edgepack_needs_lives_there(tmp_path):
    plain = tmp_path / "edgepack"
    plain.write_text("#!/usr/bin/python3\n")
    plain.chmod(0o755)
    assert "ProtectHome=yes" in render_unit(Path("/var/lib/edgepack"), executable=plain)
    assert "ProtectHome=read-only" in render_unit(Path("/home/pi/store"), executable=plain)
    in_home = tmp_path / "pyenv-edgepack"  # a venv whose interpreter is a pyenv build under /root or /home
    in_home.write_text("#!/root/.pyenv/versions/3.11.7/bin/python3\n")
    in_home.chmod(0o755)
    assert "ProtectHome=read-only" in render_unit(Path("/var/lib/edgepack"), executable=in_home)


def test_specific_address_waits_for_the_network():
    assert "After=network-online.target" in _render({"host": "10.0.0.5"})
    assert "After=network-online.target" not in _render({"host": "0.0.0.0"})
    assert "IPAddressDeny" not in _render({"host": "0.0.0.0"})  # reachable from the network on purpose


def test_low_port_keeps_only_the_bind_capability():
    unit = _render({"port": 80, "user": "edgepack"})
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit


@pytest.mark.parametrize(("text", "value"), [
    ("3G", "3G"), ("2.5GiB", "2560M"), ("512MB", "500000K"), ("1073741824", "1G"), ("1.5g", "1536M"),
    ("75%", "75%"), ("1048577 B", "1048577"),
])
def test_memory_sizes_become_what_systemd_reads(text, value):
    assert parse_memory_max(text) == value


@pytest.mark.parametrize("text", ["", "lots", "3X", "-1G", "0%", "150%", "x%", "100K", "1e9", "2T"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(EdgepackError, match="memory size"):
        parse_memory_max(text)


# ---- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    """A datagram socket bound where $NOTIFY_SOCKET points (a short path: AF_UNIX allows 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="ep-notify-")
    path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock
    shutil.rmtree(directory)


def test_notify_sends_the_message_byte_for_byte(notify_socket):
    message = "READY=1\nSTATUS=serving tiny, 2 threads: ünïcode"
    assert notify(message) is True
    assert notify_socket.recv(4096) == message.encode()


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"edgepack-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_or_with_a_broken_socket_is_false(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    for address in (str(tmp_path / "missing"), "relative/sock", "", "@", str(tmp_path)):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_us(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


def _received(sock: socket.socket, seconds: float) -> list[bytes]:
    messages, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096))
        except TimeoutError:
            break
    return messages


def _queued(sock: socket.socket) -> list[bytes]:
    """The datagrams already on the socket, without waiting."""
    messages = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(sock.recv(4096))
    return messages


class _Stop(Exception):
    pass


def test_watchdog_loop_pings_once_per_interval_while_healthy(notify_socket):
    """Four turns of the loop on a fake sleep (no waiting): a ping on each healthy turn, none on the unhealthy one."""
    health, slept = iter([True, True, False, True]), []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            raise _Stop

    with pytest.raises(_Stop):
        asyncio.run(watchdog_loop(7.5, healthy=lambda: next(health), sleep=sleep))
    assert slept == [7.5] * 4
    assert _queued(notify_socket) == [b"WATCHDOG=1"] * 3


# ---- `edgepack unit` ---------------------------------------------------------------------------


def directives(unit: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: section -> directive -> its values in order (comments and blank lines
    skipped; a directive given twice keeps both)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _assert_serves(unit: str, store: Path, serve_args: list[str], **service: str) -> None:
    """The unit runs `edgepack serve` on `store` with `serve_args`, as a notify service with these directives."""
    parsed = directives(unit)
    assert set(parsed) == {"Unit", "Service", "Install"}
    main = parsed["Service"]
    executable, *command = shlex.split(main["ExecStart"][0])
    assert Path(executable).name == "edgepack" and os.access(executable, os.X_OK)
    assert command == ["serve", "--store", str(store), "--host", "127.0.0.1", "--port", "8080", *serve_args]
    assert main["Type"] == ["notify"] and main["NotifyAccess"] == ["main"] and main["Restart"] == ["on-failure"]
    assert shlex.split(main["ReadWritePaths"][0]) == [str(store)]
    for key, value in service.items():
        assert main.get(key) == [value], (key, main.get(key))
    assert parsed["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_command_prints_the_unit(tmp_path):
    result = CliRunner().invoke(unit_command, ["--store", str(tmp_path), "--user", "edgepack", "--watchdog", "30",
                                               "--memory-max", "2GiB", "--", "--slots", "4", "--threads", "3"])
    assert result.exit_code == 0, result.output
    _assert_serves(result.stdout, tmp_path, ["--slots", "4", "--threads", "3"],
                   User="edgepack", WatchdogSec="30", MemoryMax="2G")
    if SYSTEMD_ANALYZE is not None:  # and systemd itself accepts every line
        (tmp_path / "unit").mkdir()
        verified = _verify(tmp_path / "unit", result.stdout)
        assert verified.returncode == 0 and verified.stderr == "", verified.stderr


def test_unit_command_writes_a_file_atomically(tmp_path, monkeypatch):
    store, out_dir = tmp_path / "store", tmp_path / "units"
    store.mkdir()
    out_dir.mkdir()
    (out_dir / "edgepack.service").write_text("old\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(unit_command, ["--store", "store", "-o", str(out_dir / "edgepack.service")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "systemctl daemon-reload && systemctl enable --now edgepack" in result.stderr
    written = out_dir / "edgepack.service"
    _assert_serves(written.read_text(), store.resolve(), [])  # a relative store becomes absolute
    assert "User" not in directives(written.read_text())["Service"]  # no --user: root, as systemd's default
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in out_dir.iterdir()) == ["edgepack.service"]  # no temporary file left
    if SYSTEMD_ANALYZE is not None:
        verified = _analyze(out_dir, "verify", "./edgepack.service")
        assert verified.returncode == 0 and verified.stderr == "", verified.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--store", "no/such/store"], "no/such/store is not a directory"),
    (["--store", "{tmp}", "--memory-max", "lots"], "Invalid value for '--memory-max'"),
    (["--store", "{tmp}", "--watchdog", "0"], "Invalid value for '--watchdog'"),
    (["--store", "{tmp}", "--user", "bad user"], "expected a user name"),
    (["--store", "{tmp}", "--user", "edgepack", "--user-unit"], "a user unit runs as its owner"),
    (["--store", "{tmp}", "--", "--port", "9000"], "set by the unit itself"),
    (["--store", "{tmp}", "-o", "{tmp}/missing/edgepack.service"], "cannot write"),
])
def test_unit_command_refuses_bad_input_in_one_line(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(unit_command, args)
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit)
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error")]) == 1


# ---- a real server under a (stand-in) service manager --------------------------------------------


def _serve(store: Path, notify_path: str, env: dict[str, str] | None = None,
           preexec_fn=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgepack.runtime.cli", "serve", "--store", str(store), "--port", str(port),
         "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}, preexec_fn=preexec_fn,
    )
    return process, f"http://127.0.0.1:{port}"


def _health_status(base: str) -> int:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for(sock: socket.socket, wanted: bytes, process: subprocess.Popen, seconds: float = 60,
              count: int = 1) -> list[bytes]:
    """Datagrams until `count` of them hold the line `wanted`; fails once the server has exited or after
    `seconds` (a deadline for a loaded machine, not a measurement)."""
    messages, deadline = [], time.monotonic() + seconds
    while True:
        exited = process.poll() is not None  # what it sent before exiting is still queued on the socket
        messages += _received(sock, 0.5)
        if sum(wanted in m.split(b"\n") for m in messages) >= count:
            return messages
        if exited or time.monotonic() > deadline:
            pytest.fail(f"no {wanted!r} from serve; got {messages}")


def test_serve_reports_ready_once_healthy_and_stopping_at_shutdown(served_store, notify_socket):
    process, base = _serve(served_store, os.environ["NOTIFY_SOCKET"])
    try:
        wait_ready(base, process)
        messages = _wait_for(notify_socket, b"READY=1", process)
        assert _health_status(base) == 200  # READY=1 never comes before /health says ok
        assert not any(b"WATCHDOG=1" in m for m in messages)  # no watchdog was asked for
        process.send_signal(signal.SIGTERM)
        _wait_for(notify_socket, b"STOPPING=1", process, seconds=30)
    finally:
        stop_server(process)


def test_serve_pings_the_watchdog_systemd_asks_for(served_store, notify_socket):
    process, base = _serve(served_store, os.environ["NOTIFY_SOCKET"], {"WATCHDOG_USEC": "400000"})
    try:
        wait_ready(base, process)
        _wait_for(notify_socket, b"READY=1", process)
        pings = _wait_for(notify_socket, b"WATCHDOG=1", process, count=3)  # every 0.2 s, however busy the machine
        assert set(pings) == {b"WATCHDOG=1"}
    finally:
        stop_server(process)


# ---- MemoryDenyWriteExecute= does not break llama.cpp ----------------------------------------------

PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux 6.3+: the kernel's own form of MemoryDenyWriteExecute=


def _deny_write_execute() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


def _kernel_denies_write_execute() -> bool:
    """Whether PR_SET_MDWE works here and really refuses a writable+executable mapping (tried in a child)."""
    probe = (
        "import ctypes, mmap, sys\n"
        f"if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n    sys.exit(2)\n"
        "try:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not hasattr(mmap, "PROT_EXEC") or sys.platform != "linux", reason="Linux only")
def test_serve_generates_with_write_execute_memory_denied(served_store):
    """What MemoryDenyWriteExecute=yes in the unit relies on: nothing in serve (Python, ctypes callbacks,
    llama.cpp's CPU kernels) needs memory that is writable and executable."""
    if not _kernel_denies_write_execute():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    process, base = _serve(served_store, "", preexec_fn=_deny_write_execute)
    try:
        wait_ready(base, process)
        status, body = post_json(base + "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 8,
                                                            "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    finally:
        stop_server(process)
