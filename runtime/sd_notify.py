"""The sd_notify protocol for `edgepack serve` under systemd: readiness, status and watchdog pings.

Stdlib only: the server imports this, never the unit writer (runtime/systemd_unit.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=...", "STOPPING=1", "WATCHDOG=1") to the service manager.

    False when not run by systemd (no $NOTIFY_SOCKET) or when the socket cannot take it; never raises,
    and never blocks: a full socket drops the message rather than stall the server.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
        return True
    except (OSError, ValueError):
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None when no watchdog is asked of us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = int(os.environ.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float, healthy: Callable[[], bool] = lambda: True,
                        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Ping the watchdog every `interval` seconds while `healthy()` holds; run it as a task on the server's
    event loop, so a stalled loop (or an unhealthy service) stops the pings and systemd restarts us."""
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await sleep(interval)
