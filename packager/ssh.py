"""Commands on a device over the system's OpenSSH client: the target (ssh://user@host:port/store) and one
multiplexed connection per deploy. A leaf: deploy and remote_runtime both build on it."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import PackagerError


@dataclass(frozen=True)
class SshTarget:
    host: str
    path: str  # the store directory on the device, absolute
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"ssh://{self.user + '@' if self.user else ''}{host}{port}{self.path}"


class Ssh:
    """Commands on one device through the system's `ssh`, over one multiplexed connection (ControlMaster): one
    handshake per deploy, whatever the user's ssh config, agent, jump hosts and known_hosts say otherwise."""

    def __init__(self, target: SshTarget, identity: Path | None, options: tuple[str, ...]) -> None:
        self.target = target
        # ssh takes the first value it sees for an option: the user's -o first, our defaults after.
        args = ["ssh"]
        for option in options:
            args += ["-o", option]
        args += ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=15",
                 "-o", "ServerAliveCountMax=4"]
        if identity is not None:
            args += ["-i", str(identity)]
        if target.port is not None:
            args += ["-p", str(target.port)]
        self._args = args
        self._control: tempfile.TemporaryDirectory[str] | None = None

    def _command(self, *extra: str) -> list[str]:
        assert self._control is not None, "use Ssh as a context manager"
        return [*self._args, "-o", f"ControlPath={self._control.name}/c", *extra]

    def __enter__(self) -> Ssh:
        self._control = tempfile.TemporaryDirectory(prefix="edgepack-ssh-")
        # -f: background once authenticated, holding the connection for the commands that follow. Its output goes
        # to a file: a pipe would stay open as long as the master lives.
        log = Path(self._control.name) / "master.log"
        with open(log, "wb") as out:
            code = subprocess.run(self._command("-o", "ControlMaster=yes", "-f", "-N", "--", self.target.destination),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
        if code != 0:
            reason = _last_line(log.read_text(errors="replace")) or f"ssh exited with status {code}"
            self._control.cleanup()
            raise PackagerError(f"cannot connect to {self.target.destination}: {reason}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._control is not None
        subprocess.run(self._command("-O", "exit", "--", self.target.destination), stdin=subprocess.DEVNULL,
                       capture_output=True)
        self._control.cleanup()

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command("-o", "ControlMaster=no", "--", self.target.destination, command),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)

    def feed(self, command: str, write: Callable[[BinaryIO], None]) -> str | None:
        """Run `command` with `write` filling its stdin; None when it succeeded, else the device's reason (a
        dropped connection ends `write` early: the caller tells from what it wrote how far it got)."""
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                self._command("-o", "ControlMaster=no", "--", self.target.destination, command),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
            assert process.stdin is not None
            try:
                write(process.stdin)
                process.stdin.close()
            except BrokenPipeError:
                pass
            code = process.wait()
            if code == 0:
                return None
            errors.seek(0)
            return last_line(errors.read().decode(errors="replace")) or f"exit status {code}"

    def checked(self, command: str, what: str) -> str:
        """Run `command`; its stdout, or PackagerError with the device's one-line reason."""
        result = self.run(command)
        if result.returncode != 0:
            raise PackagerError(f"{self.target.destination}: {what} failed: {reason(result)}")
        return result.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else ""


def _reason(result: subprocess.CompletedProcess[str]) -> str:
    return _last_line(result.stderr) or _last_line(result.stdout) or f"exit status {result.returncode}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else ""


def reason(result: subprocess.CompletedProcess[str]) -> str:
    """The device's one-line reason for a failed command."""
    return last_line(result.stderr) or last_line(result.stdout) or f"exit status {result.returncode}"
