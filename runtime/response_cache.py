"""Response caches for deterministic requests: L1 in memory (LRU + TTL), L2 in a SQLite file (TTL)
that survives restarts.

The key is a sha256 over the model's content digest (its segments, and the adapter's), the agent, the
request kind, the exact prompt text and every sampling parameter, so a new release, another agent or
other settings never hit an old answer.
"""

from __future__ import annotations

import collections
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .schema import SchemaError, decode_json


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def cache_key(model_digest: str, agent: str, kind: str, prompt: str, sampling: dict[str, Any]) -> str:
    doc = json.dumps([model_digest, agent, kind, prompt, sampling], sort_keys=True, default=list)
    return hashlib.sha256(doc.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: Path | None, *, l1_entries: int = 256, l1_ttl: float = 120.0,
                 l2_ttl: float = 3600.0, clock: Any = time.time) -> None:
        self.l1_entries, self.l1_ttl, self.l2_ttl, self._clock = l1_entries, l1_ttl, l2_ttl, clock
        self._l1: collections.OrderedDict[str, tuple[float, CachedAnswer]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.warning: str | None = None  # set when the L2 file was damaged and set aside
        if path is not None and l2_ttl > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = _open(path)
            except sqlite3.DatabaseError as exc:  # not a database, or damaged: the cache is disposable
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                path.rename(aside)
                for suffix in ("-wal", "-shm"):  # its journal belongs to the damaged file, not the new one
                    path.with_name(path.name + suffix).unlink(missing_ok=True)
                self.warning = f"response cache {path} was unreadable ({exc}); moved to {aside.name}, starting empty"
                self._db = _open(path)

    def get(self, key: str) -> tuple[str | None, CachedAnswer | None]:
        """(level that hit: "l1" / "l2", or None; the answer)."""
        now = self._clock()
        with self._lock:
            entry = self._l1.get(key)
            if entry is not None:
                if entry[0] > now:
                    self._l1.move_to_end(key)
                    return "l1", entry[1]
                del self._l1[key]
            if self._db is None:
                return None, None
            try:
                row = self._db.execute("SELECT expires, answer FROM answers WHERE key = ?", (key,)).fetchone()
                if row is None or row[0] <= now:
                    return None, None
                answer = decode_json(row[1], CachedAnswer, "response cache")
            except (sqlite3.Error, SchemaError):  # a damaged row or file: a miss, and it goes
                self._forget(key)
                return None, None
            self._remember(key, answer, now)
            return "l2", answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        now = self._clock()
        with self._lock:
            self._remember(key, answer, now)
            if self._db is not None:
                try:
                    self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                                     (key, now + self.l2_ttl, json.dumps(asdict(answer))))
                    self._db.execute("DELETE FROM answers WHERE expires <= ?", (now,))
                except sqlite3.Error:  # disk full, file gone or damaged: keep serving from L1 alone
                    self.close()

    def _forget(self, key: str) -> None:
        try:
            self._db.execute("DELETE FROM answers WHERE key = ?", (key,))
        except sqlite3.Error:
            self.close()

    def _remember(self, key: str, answer: CachedAnswer, now: float) -> None:
        if self.l1_ttl <= 0 or self.l1_entries <= 0:
            return
        self._l1[key] = (now + self.l1_ttl, answer)
        self._l1.move_to_end(key)
        while len(self._l1) > self.l1_entries:
            self._l1.popitem(last=False)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, expires REAL NOT NULL, "
                   "answer TEXT NOT NULL)")
        db.execute("SELECT expires, answer FROM answers LIMIT 1").fetchall()
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db
