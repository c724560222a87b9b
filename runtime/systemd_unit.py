"""The systemd service unit `edgepack unit` writes for `edgepack serve`, hardened as far as llama.cpp on
the CPU allows (the protocol the running server speaks is in runtime/sd_notify.py).

Device side: stdlib, click and runtime/memory.py, no llama.cpp. docs/systemd.md explains each line of the unit.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import click

from . import __version__
from .auth import CREDENTIAL_NAME, is_loopback
from .cli_common import store_option
from .errors import EdgepackError
from .files import replace_atomically
from .memory import parse_size

UNIT_NAME = "edgepack.service"
DEFAULT_START_TIMEOUT = 900.0  # seconds: a big model on an SD card loads and warms up before READY=1
DEFAULT_RESTART_SEC = 5.0

# Directories ProtectHome= hides; also where a pyenv/venv interpreter may live (e.g. /root/.pyenv).
_HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
# Options the unit sets itself; passing them again after `--` would contradict it.
_OWN_SERVE_OPTIONS = ("--store", "--host", "--port")
# Words systemd's command-line parser takes as they are (no quotes, escapes, specifiers or variables).
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# systemd refuses an executable path holding these ("Executable name contains special characters").
_UNSAFE_EXECUTABLE = re.compile(r"[\"'\\\x00-\x1f\x7f]")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]+")


def parse_memory_max(text: str) -> str:
    """'3G', '2.5GiB', '512MB', '1073741824', '75%' -> the MemoryMax= value systemd reads as that size.

    Sizes read as everywhere in edgepack (runtime/memory.py: K/M/G and KiB/MiB/GiB binary, KB/MB/GB
    decimal); a percentage is of the machine's physical memory, as systemd reads it.
    """
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise EdgepackError(f"memory size {text!r}: a share must be above 0% and at most 100%")
        return f"{share:g}%"
    try:
        size = parse_size(text)
    except EdgepackError:
        raise EdgepackError(f"memory size {text!r}: expected a size (3G, 2.5GiB, 512MB, bytes) or a share "
                            "of the machine's memory (75%)") from None
    if size < 1 << 20:
        raise EdgepackError(f"memory size {text!r}: under 1 MiB, no model could load")
    return _systemd_size(size)


def _systemd_size(size: int) -> str:
    """Bytes in the largest binary unit that divides them exactly (2147483648 -> '2G')."""
    for suffix, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def default_executable() -> Path:
    """The `edgepack` script of this installation: next to the interpreter (a venv), else on $PATH."""
    beside = Path(sys.executable).parent / "edgepack"
    if beside.is_file() and os.access(beside, os.X_OK):
        return Path(os.path.abspath(beside))
    found = shutil.which("edgepack")
    if found is None:
        raise EdgepackError("cannot find the edgepack executable next to Python or on PATH; pass --executable")
    return Path(os.path.abspath(found))


def render_unit(
    store: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    serve_args: tuple[str, ...] | list[str] = (),
    user: str | None = None,
    memory_max: str | None = None,
    watchdog: float | None = None,
    restart_sec: float = DEFAULT_RESTART_SEC,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    executable: Path | None = None,
    user_unit: bool = False,
    api_key_file: Path | None = None,
) -> str:
    """A systemd service unit that runs `edgepack serve` for `store` (an absolute path).

    `user_unit` renders one for the per-user manager (`systemctl --user`): no User=, and only the
    sandboxing that works without privileges. `api_key_file` is handed to serve as a systemd credential
    (LoadCredential=): systemd reads it before dropping privileges, so it may stay readable by root alone.
    Raises EdgepackError on input systemd could not honour.
    """
    executable = executable or default_executable()
    _check_unit_inputs(store, executable, user, user_unit, serve_args)
    if api_key_file is not None:
        _check_key_file(api_key_file)
    args = ["serve", "--store", str(store), "--host", host, "--port", str(port), *serve_args]
    loopback = is_loopback(host)
    unit = _unit_section(store, host, loopback, user_unit)
    service = [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join([_executable_word(executable), *map(_argument_word, args)]),
        "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        *([f"User={user}"] if user else []),
        *([f"LoadCredential={CREDENTIAL_NAME}:{_escape_specifiers(str(api_key_file))}"] if api_key_file else []),
        "Restart=on-failure",
        f"RestartSec={_seconds(restart_sec)}",
        f"TimeoutStartSec={_seconds(start_timeout)}",
        "TimeoutStopSec=30",
        *([f"WatchdogSec={_seconds(watchdog)}"] if watchdog else []),
        *([f"MemoryMax={parse_memory_max(memory_max)}"] if memory_max else []),
        "",
        *_sandbox(store, executable, port, loopback, user is not None, user_unit),
    ]
    install = ["WantedBy=" + ("default.target" if user_unit else "multi-user.target")]
    header = [
        f"# {UNIT_NAME}, written by `edgepack unit` (edgepack {__version__}); see docs/systemd.md.",
        "# Regenerate it rather than edit it; put local changes in a drop-in (systemctl edit edgepack).",
    ]
    return "\n".join(header + ["", "[Unit]", *unit, "", "[Service]", *service, "", "[Install]", *install]) + "\n"


def _check_unit_inputs(store: Path, executable: Path, user: str | None, user_unit: bool,
                       serve_args: tuple[str, ...] | list[str]) -> None:
    if not store.is_absolute() or re.search(r"[\x00-\x1f\x7f]", str(store)):
        raise EdgepackError(f"store {str(store)!r}: the unit needs an absolute path without control characters")
    if not executable.is_absolute():
        raise EdgepackError(f"executable {executable}: the unit needs an absolute path")
    if _UNSAFE_EXECUTABLE.search(str(executable)):
        raise EdgepackError(f"executable {executable}: systemd refuses a path with quotes, backslashes or control "
                            "characters; install edgepack elsewhere")
    if user is not None and (user_unit or not _USER_NAME.fullmatch(user)):
        raise EdgepackError(f"user {user!r}: " + ("a user unit runs as its owner" if user_unit else
                                                  "expected a user name or numeric id"))
    for arg in serve_args:
        if arg.split("=", 1)[0] in _OWN_SERVE_OPTIONS:
            raise EdgepackError(f"serve argument {arg}: set by the unit itself; use edgepack unit's own option")


def _check_key_file(path: Path) -> None:
    if not path.is_absolute() or re.search(r"[\s\"'\\\x00-\x1f\x7f]", str(path)):
        raise EdgepackError(f"API key file {str(path)!r}: the unit needs an absolute path without spaces, quotes, "
                            "backslashes or control characters")


def _unit_section(store: Path, host: str, loopback: bool, user_unit: bool) -> list[str]:
    lines = [f"Description=edgepack LLM server ({_escape_specifiers(str(store))})"]
    if not user_unit:  # the user manager has no network targets to order against
        lines += _network_ordering(host, loopback)
    # A bundle that cannot load fails every start: give up after 5 tries in 10 minutes instead of looping.
    return lines + ["StartLimitIntervalSec=600", "StartLimitBurst=5"]


def _network_ordering(host: str, loopback: bool) -> list[str]:
    """Binding a loopback or wildcard address needs no configured interface; a specific address does."""
    if loopback or host in ("0.0.0.0", "::", ""):
        return ["After=network.target"]
    return ["Wants=network-online.target", "After=network-online.target"]


def _sandbox(store: Path, executable: Path, port: int, loopback: bool, has_user: bool, user_unit: bool) -> list[str]:
    """Hardening that llama.cpp on the CPU survives: it mmaps the store's blobs read-only, JITs nothing,
    and reads /proc/cpuinfo, /proc/meminfo and /sys/devices/system/cpu for the thread plan and metrics."""
    lines = [
        "# Sandbox (docs/systemd.md explains each line).",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
    ]
    if user_unit:  # everything below needs privileges (mount namespaces, capabilities, BPF)
        return lines
    low_port = ["CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE"]
    lines += low_port if port < 1024 else ["CapabilityBoundingSet="]
    lines += [
        "ProtectSystem=strict",
        f"ReadWritePaths={_argument_word(str(store), variables=False)}",
        "ProtectHome=" + ("read-only" if _needs_home(store, executable) else "yes"),
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateIPC=yes",
        "PrivateMounts=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
    ]
    if has_user:
        lines.append("RemoveIPC=yes")
    if loopback:
        lines += ["IPAddressAllow=localhost", "IPAddressDeny=any"]
    return lines


def _needs_home(store: Path, executable: Path) -> bool:
    """Whether the store, the executable or its interpreter lives under /home, /root or /run/user, which
    ProtectHome=yes would hide (ProtectHome=read-only keeps them readable; ReadWritePaths= the store writable)."""
    paths = [store, executable, executable.resolve()]
    interpreter = _shebang(executable)
    if interpreter is not None:
        paths += [interpreter, interpreter.resolve()]
    return any(path.is_relative_to(home) for path in paths for home in _HOME_DIRS)


def _shebang(executable: Path) -> Path | None:
    try:
        with open(executable, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words and words[0].startswith("/") else None


def _seconds(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:g}s"


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _executable_word(path: Path) -> str:
    """The command word: systemd expands specifiers in it but no $variables."""
    text = _escape_specifiers(str(path))
    return text if _PLAIN_WORD.fullmatch(str(path)) else f'"{text}"'


def _argument_word(arg: str, variables: bool = True) -> str:
    """One word of systemd's command-line syntax that unquotes to exactly `arg` (systemd.syntax(7)):
    whole-word double quotes with C escapes, %% for specifiers, $$ where $variables are expanded."""
    text = _escape_specifiers(arg)
    if variables:
        text = text.replace("$", "$$")
    if _PLAIN_WORD.fullmatch(arg):
        return text
    escaped = "".join(_c_escape(ch) for ch in text)
    return f'"{escaped}"'


def _c_escape(ch: str) -> str:
    if ch in ('"', "\\"):
        return "\\" + ch
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02x}"
    return ch


# ---- `edgepack unit` -------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename: readers never see half a unit."""
    try:
        replace_atomically(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise EdgepackError(f"cannot write {path}: {exc.strerror or exc}") from None


def _absolute_store(value: Path) -> Path:
    if not value.is_dir():
        raise click.BadParameter(f"{value} is not a directory; install a bundle first (edgepack install "
                                 f"BUNDLE --store {value})", param_hint="'--store'")
    return value.resolve()


def _memory_max(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return parse_memory_max(value) if value is not None else None
    except EdgepackError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("unit")
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address serve binds.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--user", help="Run as this existing system user (recommended; default root).")
@click.option("--user-unit", is_flag=True, help="A unit for your own user manager (systemctl --user).")
@click.option("--memory-max", callback=_memory_max, help="MemoryMax= of the service, e.g. 3G, 2.5GiB or 75%.")
@click.option("--watchdog", type=click.FloatRange(1), help="WatchdogSec=: restart if the server stops answering.")
@click.option("--restart-sec", default=DEFAULT_RESTART_SEC, show_default=True, type=click.FloatRange(0),
              help="Seconds before a restart after a failure.")
@click.option("--start-timeout", default=DEFAULT_START_TIMEOUT, show_default=True, type=click.FloatRange(1),
              help="Seconds loading and warm-up may take before systemd gives up.")
@click.option("--executable", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The edgepack executable to run (default: this installation's).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Require API keys: systemd hands this file (one key a line) to serve as the credential "
                   f"{CREDENTIAL_NAME} (LoadCredential=); it may be readable by root only.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the unit to this file (atomically) instead of standard output.")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def unit_command(store_dir: Path, host: str, port: int, user: str | None, user_unit: bool, memory_max: str | None,
                 watchdog: float | None, restart_sec: float, start_timeout: float, executable: Path | None,
                 api_key_file: Path | None, output: Path | None, serve_args: tuple[str, ...]) -> None:
    """Print a hardened systemd unit that runs `edgepack serve` for the store.

    Arguments after `--` go to serve (e.g. `-- --slots 4 --threads 3`). Then, as root:
    `edgepack unit --store DIR --user edgepack -o /etc/systemd/system/edgepack.service`,
    `systemctl daemon-reload`, `systemctl enable --now edgepack`. See docs/systemd.md.
    """
    store_dir = _absolute_store(store_dir)
    try:
        text = render_unit(store_dir, host=host, port=port, serve_args=serve_args, user=user, memory_max=memory_max,
                           watchdog=watchdog, restart_sec=restart_sec, start_timeout=start_timeout,
                           executable=Path(os.path.abspath(executable)) if executable else None, user_unit=user_unit,
                           api_key_file=api_key_file)
        if output is None:
            click.echo(text, nl=False)
            return
        write_atomically(output, text)
    except EdgepackError as exc:
        raise click.ClickException(str(exc)) from None
    manager = "systemctl --user" if user_unit else "systemctl"
    click.echo(f"wrote {output}; next: {manager} daemon-reload && {manager} enable --now {output.stem}", err=True)
