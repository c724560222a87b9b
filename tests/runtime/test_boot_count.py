"""Boot counting: a release whose server is killed before it has run stably, start after start, is abandoned by
serve itself at the next start (back on the previous release); a start that became stable resets the count."""

from __future__ import annotations

import json
import signal
import time

from conftest import build_bundle, serving, start_server, wait_ready

from edgepack.runtime.store import Store


def crash_after_ready(store, *flags: str) -> str:
    process, base = start_server(store, "--warmup", "none", *flags)
    wait_ready(base, process)
    process.send_signal(signal.SIGKILL)  # as an OOM kill or a crash would
    _, stderr = process.communicate(timeout=30)
    return stderr


def test_a_release_that_keeps_dying_is_abandoned_at_the_next_start(tiny_gguf, tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    good = store.release_id()
    v2 = build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny", bundle_version=2,
                      chat_template="chatml")
    trial = store.install(v2).release
    for _ in range(2):
        assert "did not run stably" not in crash_after_ready(store.root, "--max-unstable-starts", "2")
        assert store.release_id() == trial
    stderr = crash_after_ready(store.root, "--max-unstable-starts", "2")
    assert f"release {trial} did not run stably in its last 2 starts: rolled back to {good}" in stderr
    assert store.release_id() == good
    assert json.loads((store.root / "starts.json").read_text())["abandoned"] == trial


def test_a_start_that_ran_stably_resets_the_count(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    process, base = start_server(store.root, "--warmup", "none", "--stable-after", "0.5")
    try:
        wait_ready(base, process)
        deadline = time.monotonic() + 20
        while json.loads((store.root / "starts.json").read_text())["starts"] != 0:
            assert time.monotonic() < deadline, "the count was never reset"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)


def test_clean_stops_do_not_count(tiny_gguf, tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    trial = store.install(build_bundle(tiny_gguf, tmp_path / "v2.edgepack", quant="Q8_0", name="tiny",
                                       bundle_version=2, chat_template="chatml")).release
    for _ in range(3):
        with serving(store.root, "--warmup", "none", "--max-unstable-starts", "1"):
            pass
    assert store.release_id() == trial
    assert json.loads((store.root / "starts.json").read_text())["starts"] == 0
