"""Boot counting for what a health check cannot see: a release whose server keeps dying (a crash, an OOM kill, the
watchdog) before it has run stably is abandoned by `serve` itself at its next start, as RAUC and balena count
boots in the bootloader. The counter lives in the store (DIR/starts.json): each start of a release adds one; a
server that has been up `stable_after` seconds, or that stops cleanly (SIGTERM), resets it. At `limit` unstable
starts, serve rolls the store back to the previous release before loading anything.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .files import replace_atomically
from .store import Store

RECORD = "starts.json"


def _read(root: Path) -> dict:
    try:
        doc = json.loads((root / RECORD).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def on_start(store: Store, limit: int) -> str | None:
    """Count this start of the current release; when it is the limit-th start in a row that did not become stable
    and there is a previous release, roll back to it and say so (the message), else None."""
    release = store.release_id()
    doc = _read(store.root)
    starts = doc.get("starts", 0) + 1 if doc.get("release") == release else 1
    previous = store.release_id("previous")
    if starts > limit and previous is not None:
        store.rollback()
        replace_atomically(store.root / RECORD, json.dumps({"release": previous, "starts": 1,
                                                            "abandoned": release}).encode())
        return (f"release {release} did not run stably in its last {limit} starts: rolled back to {previous} "
                f"(the previous release)")
    replace_atomically(store.root / RECORD, json.dumps({"release": release, "starts": starts}).encode())
    return None


def reset(store: Store, release: str | None) -> None:
    """The release ran stably (or stopped cleanly): its count starts again from zero."""
    if release is not None and store.release_id() == release:
        replace_atomically(store.root / RECORD, json.dumps({"release": release, "starts": 0}).encode())


def mark_stable_after(store: Store, seconds: float) -> threading.Timer:
    """Reset the count once the server has run `seconds` (the timer is a daemon: a dying server never fires it)."""
    timer = threading.Timer(seconds, reset, (store, store.release_id()))
    timer.daemon = True
    timer.start()
    return timer
