"""Signed bundles and the store's trust: keygen, build --sign, trust add/list/remove, and every refusal install
makes once a store trusts a key (unsigned, untrusted signer, manifest changed after signing, a signature over
another manifest), each one line, exit 1, the store unchanged; and the version rule (no downgrade, no other build
of the installed version, unless --allow-downgrade)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from conftest import build_bundle, run_cli
from store_snapshot import snapshot
from test_store import members, write_tar

from edgepack.runtime.bundle_format import MANIFEST_NAME, SIGNATURE_NAME


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs made by the real `edgepack keygen`: name -> private key path (public: + .pub)."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("alice", "bob"):
        done = run_cli("keygen", "-o", str(folder / name))
        assert done.returncode == 0, done.stderr
        made[name] = folder / name
    return made


def key_id(keys: dict[str, Path], name: str) -> str:
    from edgepack.runtime import signatures

    return signatures.key_id(signatures.load_public(Path(f"{keys[name]}.pub").read_bytes(), "test"))


@pytest.fixture(scope="module")
def bundles(tiny_gguf, keys, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("signed")

    def make(name: str, version: int, sign: str | None, **kwargs) -> Path:
        return build_bundle(tiny_gguf, out / f"{name}.edgepack", quant="Q8_0", name="tiny", bundle_version=version,
                            sign=keys[sign] if sign else None, **kwargs)

    return {
        "v1-alice": make("v1-alice", 1, "alice"),
        "v2-alice": make("v2-alice", 2, "alice"),
        "v2-alice-chatml": make("v2-alice-chatml", 2, "alice", chat_template="chatml"),
        "v3-bob": make("v3-bob", 3, "bob"),
        "v3-unsigned": make("v3-unsigned", 3, None),
    }


def install(bundle: Path, store: Path, *extra: str):
    return run_cli("install", str(bundle), "--store", str(store), *extra)


def trusting(tmp_path: Path, keys: dict[str, Path], *names: str) -> Path:
    store = tmp_path / "store"
    for name in names:
        done = run_cli("trust", "add", f"{keys[name]}.pub", "--store", str(store))
        assert done.returncode == 0, done.stderr
    return store


def refused(bundle: Path, store: Path, message: str, *extra: str) -> None:
    before = snapshot(store)
    done = install(bundle, store, *extra)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert snapshot(store) == before


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys):
    assert stat.S_IMODE(keys["alice"].stat().st_mode) == 0o600
    assert Path(f"{keys['alice']}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = keys["alice"].read_bytes()
    again = run_cli("keygen", "-o", str(keys["alice"]))
    assert again.returncode == 1 and "exists: keygen never overwrites a key" in again.stderr
    assert keys["alice"].read_bytes() == before


def test_a_signed_bundle_carries_its_signature_right_after_the_manifest(bundles):
    names = [info.name for info, _ in members(bundles["v1-alice"])]
    assert names[:2] == [MANIFEST_NAME, SIGNATURE_NAME]
    assert SIGNATURE_NAME not in [info.name for info, _ in members(bundles["v3-unsigned"])]


def test_a_store_that_trusts_no_key_installs_signed_and_unsigned_bundles(bundles, tmp_path):
    assert install(bundles["v3-unsigned"], tmp_path / "a").returncode == 0
    assert install(bundles["v1-alice"], tmp_path / "b").returncode == 0


def test_a_trusting_store_installs_what_its_keys_signed_and_lists_them(bundles, keys, tmp_path):
    store = trusting(tmp_path, keys, "alice")
    done = install(bundles["v1-alice"], store)
    assert done.returncode == 0 and "installed tiny v1" in done.stdout, done.stderr
    listed = run_cli("trust", "list", "--store", str(store))
    assert key_id(keys, "alice") in listed.stdout and key_id(keys, "bob") not in listed.stdout


def test_unsigned_and_untrusted_bundles_are_refused(bundles, keys, tmp_path):
    store = trusting(tmp_path, keys, "alice")
    assert install(bundles["v1-alice"], store).returncode == 0
    refused(bundles["v3-unsigned"], store, f"unsigned bundle refused: this store trusts {key_id(keys, 'alice')}")
    refused(bundles["v3-bob"], store, f"signed by {key_id(keys, 'bob')}, which this store does not trust")


def test_a_manifest_changed_after_signing_is_refused(bundles, keys, tmp_path):
    entries = members(bundles["v2-alice"])
    manifest = json.loads(entries[0][1])
    manifest["runtime"]["n_ctx"] = 16  # an innocent-looking edit; blobs untouched
    entries[0] = (entries[0][0], json.dumps(manifest).encode())
    changed = write_tar(tmp_path / "changed.edgepack", entries)
    store = trusting(tmp_path, keys, "alice")
    refused(changed, store, "the signature is over a different manifest")
    assert install(changed, tmp_path / "open-store").returncode == 0  # no trusted key: its digests still verify


def test_a_signature_lifted_from_another_bundle_is_refused(bundles, keys, tmp_path):
    target, donor = members(bundles["v2-alice-chatml"]), members(bundles["v1-alice"])
    target[1] = donor[1]
    store = trusting(tmp_path, keys, "alice")
    refused(write_tar(tmp_path / "lifted.edgepack", target), store, "the signature is over a different manifest")


def test_a_forged_signature_over_the_right_digest_does_not_verify(bundles, keys, tmp_path):
    entries = members(bundles["v2-alice"])
    forged = json.loads(entries[1][1])
    forged["signature"] = forged["signature"][:-4] + ("AAA=" if not forged["signature"].endswith("AAA=") else "BBB=")
    entries[1] = (entries[1][0], json.dumps(forged).encode())
    store = trusting(tmp_path, keys, "alice")
    refused(write_tar(tmp_path / "forged.edgepack", entries), store, "does not verify")
    entries[1] = (entries[1][0], b"not json")
    refused(write_tar(tmp_path / "garbage.edgepack", entries), store, "manifest.sig")


def test_rotation_two_trusted_keys_then_one_removed(bundles, keys, tmp_path):
    store = trusting(tmp_path, keys, "alice", "bob")
    assert install(bundles["v1-alice"], store).returncode == 0
    assert install(bundles["v3-bob"], store).returncode == 0
    removed = run_cli("trust", "remove", key_id(keys, "bob"), "--store", str(store))
    assert removed.returncode == 0, removed.stderr
    refused(bundles["v3-bob"], store, "which this store does not trust", "--allow-downgrade")
    hostile = run_cli("trust", "remove", "../../etc/passwd", "--store", str(store))
    assert hostile.returncode == 1 and "is not a key id" in hostile.stderr


def test_an_older_bundle_is_refused_unless_forced_and_the_same_one_again_is_a_no_op(bundles, tmp_path):
    store = tmp_path / "store"
    assert install(bundles["v2-alice"], store).returncode == 0
    refused(bundles["v1-alice"], store, "tiny v1 is older than the current release v2: refused (install "
                                        "--allow-downgrade to force it)")
    refused(bundles["v2-alice-chatml"], store, "tiny v2 is the same version as, but not the same bundle as, the "
                                               "current release v2")
    again = install(bundles["v2-alice"], store)
    assert again.returncode == 0 and "is already the current release" in again.stdout
    forced = install(bundles["v1-alice"], store, "--allow-downgrade")
    assert forced.returncode == 0 and "installed tiny v1" in forced.stdout
    # v2 is now the previous release: replaying v1's predecessor... and v2 itself go on being judged against it
    refused(bundles["v2-alice-chatml"], store, "the previous release v2")
    rolled = run_cli("rollback", "--store", str(store))
    assert rolled.returncode == 0  # rollback is a local decision, not an incoming bundle


def test_build_with_a_bad_key_fails_before_any_work(tiny_gguf, tmp_path):
    bad = tmp_path / "key"
    bad.write_text("not a key")
    done = run_cli("build", str(tiny_gguf), "-o", str(tmp_path / "x.edgepack"), "--sign", str(bad), "-q")
    assert done.returncode == 1 and "not an unencrypted PEM private key" in done.stderr
    assert not (tmp_path / "x.edgepack").exists()
