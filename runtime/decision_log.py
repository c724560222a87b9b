"""The decision log: every disagreement between the live release and a candidate, both answers kept for a person.

JSON Lines, one record a line, appended by one write each; when the file would pass its size cap it is rotated
(log.jsonl -> log.jsonl.1 -> ... -> log.jsonl.K, the oldest dropped), so the log never holds more than (K + 1)
caps. A crash can leave a torn last line: the reader skips it, the next append starts on a fresh line.
"""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec

from .decisions import Answer, Comparison

MAX_BYTES = 16 * 1024 * 1024
BACKUPS = 4


class LoggedCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str


class LoggedAnswer(msgspec.Struct, frozen=True):
    text: str
    tool_calls: tuple[LoggedCall, ...] = ()
    first_token: int | str | None = None


class DecisionRecord(msgspec.Struct, frozen=True, kw_only=True):
    time: str  # UTC, ISO 8601
    agent: str
    request_id: str
    live_release: str | None = None
    candidate_release: str | None = None
    live: LoggedAnswer
    candidate: LoggedAnswer
    comparison: dict[str, bool | None]  # Comparison.fields()


def record(agent: str, request_id: str, live: Answer, candidate: Answer, comparison: Comparison, *,
           live_release: str | None = None, candidate_release: str | None = None,
           now: datetime.datetime | None = None) -> DecisionRecord:
    """The record of one compared request (the server logs those that disagree)."""
    when = (now or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="milliseconds")
    return DecisionRecord(time=when, agent=agent, request_id=request_id, live_release=live_release,
                          candidate_release=candidate_release, live=_logged(live), candidate=_logged(candidate),
                          comparison=comparison.fields())


def _logged(answer: Answer) -> LoggedAnswer:
    return LoggedAnswer(answer.text, tuple(LoggedCall(c.name, c.arguments) for c in answer.tool_calls),
                        answer.first_token)


class DecisionLog:
    """Appends records to `path`, rotating it past `max_bytes` and keeping `backups` older files. Thread-safe;
    one instance per file (the server's), since the lock is in this process."""

    def __init__(self, path: Path | str, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 fsync: bool = False) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"expected max_bytes >= 1 and backups >= 0, got {max_bytes} and {backups}")
        self.path = Path(path)
        self.max_bytes, self.backups, self.fsync = max_bytes, backups, fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def append(self, entry: DecisionRecord) -> None:
        line = msgspec.json.encode(entry) + b"\n"
        with self._lock:
            if self._fd is None:
                self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            assert self._fd is not None
            self._write(line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        if self._size and not _ends_with_newline(self.path, self._size):
            self._write(b"\n")  # after a torn line: the next record must start a line of its own

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:  # one write for a regular file; the loop only guards against a short one
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)
        self._size += len(data)

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        if self.backups == 0:
            self.path.unlink()
        else:
            for i in range(self.backups - 1, 0, -1):
                older = rotated(self.path, i)
                if older.exists():
                    os.replace(older, rotated(self.path, i + 1))
            os.replace(self.path, rotated(self.path, 1))
        self._open()


def rotated(path: Path, i: int) -> Path:
    """The i-th older file of the log at `path` (1 = the most recent)."""
    return path.with_name(f"{path.name}.{i}")


def log_files(path: Path | str) -> list[Path]:
    """The files of a log, oldest first."""
    path = Path(path)
    older = []
    i = 1
    while rotated(path, i).exists():
        older.append(rotated(path, i))
        i += 1
    return [*reversed(older), *([path] if path.exists() else [])]


def read_log(path: Path | str, *, agent: str | None = None) -> Iterator[DecisionRecord]:
    """The records of a log, oldest first (optionally one agent's). Lines that are not a whole record (a line torn
    by a crash) are skipped."""
    decoder = msgspec.json.Decoder(DecisionRecord)
    for file in log_files(path):
        try:
            lines = file.read_bytes().splitlines()
        except FileNotFoundError:  # rotated away while we read
            continue
        for line in lines:
            try:
                entry = decoder.decode(line)
            except msgspec.DecodeError:
                continue
            if agent is None or entry.agent == agent:
                yield entry


def _ends_with_newline(path: Path, size: int) -> bool:
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"
