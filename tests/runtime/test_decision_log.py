"""The decision log on a real file: records read back, rotation under the cap, concurrent appends, torn lines."""

from __future__ import annotations

import datetime
import json
import threading

from edgepack.runtime.decision_log import DecisionLog, log_files, read_log, record, rotated
from edgepack.runtime.decisions import Answer, Call, compare

WHEN = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def _record(i: int, agent: str = "planner"):
    live = Answer("", [Call("search", f'{{"q": "item {i:03d}"}}')], first_token=5)
    candidate = Answer("I don't know.", first_token=9)
    return record(agent, f"req-{i:03d}", live, candidate, compare(live, candidate), live_release="r1",
                  candidate_release="r2", now=WHEN)


def test_a_record_keeps_both_answers_and_the_comparison(tmp_path):
    path = tmp_path / "shadow" / "decisions.jsonl"
    with DecisionLog(path) as log:
        log.append(_record(1))
    [entry] = read_log(path)
    assert entry == _record(1)
    doc = json.loads(path.read_text())  # plain JSON a person (or jq) reads
    assert doc["time"] == "2025-03-01T12:00:00.000+00:00" and doc["request_id"] == "req-001"
    assert doc["live"]["tool_calls"] == [{"name": "search", "arguments": '{"q": "item 001"}'}]
    assert doc["candidate"]["text"] == "I don't know."
    assert doc["comparison"] == {"exact": False, "first_token": False, "tool_name": False, "tool_args": False,
                                 "json": None, "agrees": False}


def test_rotation_keeps_the_cap_and_the_newest_records(tmp_path):
    path = tmp_path / "decisions.jsonl"
    size = len(_line(tmp_path, 0))  # every record of this test has this size
    with DecisionLog(path, max_bytes=3 * size, backups=2) as log:
        for i in range(20):
            log.append(_record(i))
    assert log_files(path) == [rotated(path, 2), rotated(path, 1), path]
    assert not rotated(path, 3).exists()
    for file in log_files(path):
        assert file.stat().st_size <= 3 * size
    # 3 records a file: the last three files hold 12-14, 15-17 and 18-19
    assert [e.request_id for e in read_log(path)] == [f"req-{i:03d}" for i in range(12, 20)]


def test_no_backups_starts_the_file_over(tmp_path):
    path = tmp_path / "decisions.jsonl"
    with DecisionLog(path, max_bytes=1, backups=0) as log:  # a record larger than the cap is still written whole
        for i in range(3):
            log.append(_record(i))
    assert [e.request_id for e in read_log(path)] == ["req-002"] and log_files(path) == [path]


def test_concurrent_appends_interleave_whole_lines(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, max_bytes=50_000, backups=50)

    def worker(agent: str) -> None:
        for i in range(200):
            log.append(_record(i, agent))

    threads = [threading.Thread(target=worker, args=(f"agent{t}",)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    entries = list(read_log(path))
    assert len(entries) == 1600
    for t in range(8):
        assert [e.request_id for e in read_log(path, agent=f"agent{t}")] == [f"req-{i:03d}" for i in range(200)]
    assert all(line.endswith(b"\n") for f in log_files(path) for line in f.read_bytes().splitlines(keepends=True))


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_new_line(tmp_path):
    path = tmp_path / "decisions.jsonl"
    with DecisionLog(path) as log:
        log.append(_record(1))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 2])  # a crash in the middle of the second write
    assert [e.request_id for e in read_log(path)] == ["req-001"]
    with DecisionLog(path) as log:  # the server restarted
        log.append(_record(3))
    assert [e.request_id for e in read_log(path)] == ["req-001", "req-003"]


def test_reading_a_log_that_does_not_exist_gives_nothing(tmp_path):
    assert list(read_log(tmp_path / "none.jsonl")) == []


def _line(tmp_path, i: int) -> bytes:
    probe = tmp_path / "probe.jsonl"
    with DecisionLog(probe) as log:
        log.append(_record(i))
    data = probe.read_bytes()
    probe.unlink()
    return data
