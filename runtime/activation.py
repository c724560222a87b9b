"""install --activate: a new release is a trial until it proves healthy, else the store goes back.

Healthy means: `edgepack serve` on the release, with this device's memory budget, loads every model (--preload),
answers /health, and every agent (or model, in a bundle without agents) answers one short greedy chat request, all
within the timeout. The check runs in a child server on a loopback port, so a release that crashes takes only the
child down. A failed release is rolled back to the previous one and the failure recorded in DIR/activation.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from .auth import KEYS_VARIABLE
from .files import replace_atomically
from .store import Store

RECORD = "activation.json"
_SYSLOG = "/dev/log"


@dataclass(frozen=True)
class Activation:
    release: str
    healthy: bool
    reason: str  # what failed, or what was checked
    seconds: float
    rolled_back_to: str | None = None
    at: float = 0.0


def health_check(store: Store, timeout: float, memory_budget: str | None) -> str | None:
    """Run the current release in a child server and smoke-test it: None when healthy, else why not."""
    manifest = store.manifest()
    names = [a.name for a in manifest.agents] or [m.name for m in manifest.models]
    port = _free_port()
    command = [sys.executable, "-m", "edgepack.runtime.cli", "serve", "--store", str(store.root), "--host",
               "127.0.0.1", "--port", str(port), "--preload", "--warmup", "none", "--no-warm-state", "--no-cache"]
    if memory_budget:
        command += ["--memory-budget", memory_budget]
    deadline = time.monotonic() + timeout
    # the child answers only this check, on loopback: no API keys (the shell's or a service's would lock it out)
    env = {k: v for k, v in os.environ.items() if k not in (KEYS_VARIABLE, "CREDENTIALS_DIRECTORY")}
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env) as server:
        try:
            base = f"http://127.0.0.1:{port}"
            failure = _wait_healthy(base, server, deadline)
            for name in names if failure is None else ():
                failure = _smoke(base, name, deadline)
                if failure:
                    break
            return failure
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def activate(store: Store, timeout: float, memory_budget: str | None, service: str | None = None,
             service_url: str = "http://127.0.0.1:8080") -> Activation:
    """Health-check the current release; with `service` (a systemd unit), then restart it on the release and wait
    until it is healthy at `service_url`. On failure roll back to the previous release (and restart the service on
    it). The outcome is recorded in DIR/activation.json and the system log (the journal)."""
    started = time.monotonic()
    deadline = started + timeout
    release = store.release_id()
    assert release is not None
    failure = health_check(store, timeout, memory_budget)
    if failure is None and service:
        failure = restart_service(service, service_url, deadline)
    rolled_back = None
    if failure is not None and store.release_id("previous") is not None:
        rolled_back, _ = store.rollback()
        if service:
            again = restart_service(service, service_url, time.monotonic() + timeout)
            failure += f"; {service} back on {rolled_back}" if again is None else f"; {again} on {rolled_back} too"
    checked = "models loaded, /health ok, every agent answered" + (f", {service} restarted on it" if service else "")
    outcome = Activation(release, failure is None, failure or checked, time.monotonic() - started, rolled_back,
                         time.time())
    replace_atomically(store.root / RECORD, json.dumps(asdict(outcome), indent=2).encode() + b"\n")
    _journal(outcome)
    return outcome


def restart_service(unit: str, url: str, deadline: float) -> str | None:
    """`systemctl restart UNIT`, then wait until systemd calls it active and its /health answers: None, else why
    not. (Not run by the suite: this machine has no systemd as PID 1; docs/operations.md.)"""
    done = subprocess.run(["systemctl", "restart", unit], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"systemctl restart {unit} failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
    while time.monotonic() < deadline:
        state = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
        if state == "failed":
            return f"{unit} failed after its restart"
        if state == "active":
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return None
        time.sleep(0.5)
    return f"{unit} was not healthy at {url} within the health timeout"


def _journal(outcome: Activation) -> None:
    """One line in the system log (journald reads /dev/log), for a board's operator: `journalctl -t edgepack`."""
    if not os.path.exists(_SYSLOG):
        return
    handler = logging.handlers.SysLogHandler(_SYSLOG)
    handler.ident = "edgepack: "
    level = logging.INFO if outcome.healthy else logging.ERROR
    text = (f"activated {outcome.release}: healthy in {outcome.seconds:.1f}s" if outcome.healthy else
            f"release {outcome.release} failed its health check: {outcome.reason}; "
            f"rolled back to {outcome.rolled_back_to}")
    with contextlib.suppress(OSError):
        handler.emit(logging.LogRecord("edgepack", level, __file__, 0, text, None, None))
    handler.close()


def _wait_healthy(base: str, server: subprocess.Popen, deadline: float) -> str | None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = (server.stderr.read() if server.stderr else "").strip().splitlines()
            return f"the server exited ({_status(server.returncode)}): {lines[-1] if lines else 'no message'}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return "not healthy within the health timeout"


def _smoke(base: str, name: str, deadline: float) -> str | None:
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        return f"{name} answered {exc.code}: {detail[:200]}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{name} did not answer: {exc}"
    if not doc.get("choices"):
        return f"{name} answered without a choice"
    return None


def _status(code: int | None) -> str:
    return f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
