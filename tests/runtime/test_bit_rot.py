"""A blob damaged on disk after its install (bit rot on an SD card): serve refuses to load it, by name, and doctor
finds it; nothing is answered from damaged weights."""

from __future__ import annotations

import json
import os

from conftest import free_port, post_json, run_cli, serving

from edgepack.runtime.store import Store


def rot(store: Store) -> str:
    """Flip one bit in the middle of the current model's largest segment, in place (mtime kept, as rot would)."""
    manifest = store.manifest()
    digest = max(manifest.models[0].segments, key=lambda d: manifest.blobs[d].size)
    path = store.blob_path(digest)
    stat = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return str(digest)


def test_a_rotten_blob_is_refused_at_load_by_name_and_found_by_doctor(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    digest = rot(store)
    with serving(store.root, "--threads", "1") as base:
        status, doc = post_json(f"{base}/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 503 and doc["error"]["code"] == "load_failed", doc
        assert f"blob {digest} of model 'tiny' is damaged on disk" in doc["error"]["message"]
        status, doc = post_json(f"{base}/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert status == 503, "a second request is refused too, not served from the damaged file"
    report = json.loads(run_cli("doctor", "--store", str(store.root), "--json").stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["blobs"]["status"] == "fail" and digest in json.dumps(checks["blobs"]), checks["blobs"]


def test_preload_refuses_to_start_on_a_rotten_blob(tiny_bundle, tmp_path):
    store = Store(tmp_path / "store")
    store.install(tiny_bundle)
    digest = rot(store)
    done = run_cli("serve", "--store", str(store.root), "--port", str(free_port()), "--preload", timeout=120)
    assert done.returncode != 0 and f"blob {digest} of model 'tiny' is damaged on disk" in done.stderr, done.stderr
