"""Signed bundles: ed25519 keys, the signature of a manifest (bundle member `manifest.sig`), and the keys a store
trusts (DIR/trust/*.pub). The manifest names every blob's sha256, so signing its exact bytes covers the bundle.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) written and read by `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import EdgepackError
from .files import replace_atomically
from .schema import SchemaError, Strict, decode_json


class Signature(Strict):
    """The content of `manifest.sig`."""

    key: str  # key id of the signer: "ed25519:" + 16 hex of sha256(raw public key)
    manifest_sha256: str  # of the manifest bytes it signs: names what a mismatch is about
    signature: str  # base64 of the 64-byte ed25519 signature over the manifest bytes


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate(private_path: Path) -> str:
    """Write a new key pair: private_path (mode 0600) and private_path + '.pub'; returns the key id. Refuses to
    overwrite either file (a lost private key cannot be recovered)."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise EdgepackError(f"{path} exists: keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    replace_atomically(private_path, private_pem, mode=0o600)
    replace_atomically(public_path, public_pem, mode=0o644)
    return key_id(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise EdgepackError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise EdgepackError(f"{path}: not an unencrypted PEM private key (edgepack keygen writes one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgepackError(f"{path}: not an ed25519 key (edgepack keygen writes one)")
    return key


def load_public(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise EdgepackError(f"{where}: not a PEM public key (the KEY.pub that edgepack keygen writes)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgepackError(f"{where}: not an ed25519 public key")
    return key


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The `manifest.sig` member for these exact manifest bytes."""
    doc = Signature(key=key_id(key.public_key()), manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                    signature=base64.b64encode(key.sign(manifest_bytes)).decode())
    return msgspec.json.encode(doc)


def verify(manifest_bytes: bytes, signature: bytes | None, trusted: dict[str, Ed25519PublicKey], where: str) -> None:
    """Raise, in one line saying which, unless `signature` is a valid signature of these manifest bytes by a
    trusted key. Nothing is checked when the store trusts no key."""
    if not trusted:
        return
    if signature is None:
        raise EdgepackError(f"{where}: unsigned bundle refused: this store trusts {', '.join(sorted(trusted))}")
    try:
        doc = decode_json(signature, Signature, f"{where}: manifest.sig")
        raw = base64.b64decode(doc.signature, validate=True)
    except (SchemaError, ValueError) as exc:  # ValueError: binascii.Error, or a non-ASCII signature string
        raise EdgepackError(f"{where}: manifest.sig is not a signature ({exc})") from None
    public = trusted.get(doc.key)
    if public is None:
        raise EdgepackError(f"{where}: signed by {doc.key}, which this store does not trust "
                            f"(trusted: {', '.join(sorted(trusted))})")
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if doc.manifest_sha256 != actual:
        raise EdgepackError(f"{where}: the signature is over a different manifest (signed sha256 "
                            f"{doc.manifest_sha256[:16]}..., this one {actual[:16]}...)")
    try:
        public.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise EdgepackError(f"{where}: the signature by {doc.key} does not verify: the manifest or its "
                            "signature was changed after signing") from None


# ---- the keys a store trusts ---------------------------------------------------------------------


def trust_dir(store_root: Path) -> Path:
    return store_root / "trust"


def trusted_keys(store_root: Path) -> dict[str, Ed25519PublicKey]:
    """Key id -> key of every DIR/trust/*.pub."""
    folder = trust_dir(store_root)
    if not folder.is_dir():
        return {}
    keys = {}
    for path in sorted(folder.glob("*.pub")):
        key = load_public(path.read_bytes(), str(path))
        keys[key_id(key)] = key
    return keys


def add_trusted(store_root: Path, public_path: Path) -> str:
    try:
        data = public_path.read_bytes()
    except OSError as exc:
        raise EdgepackError(f"{public_path}: cannot read: {exc.strerror}") from None
    key = load_public(data, str(public_path))
    kid = key_id(key)
    folder = trust_dir(store_root)
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(folder / f"{kid.replace(':', '-')}.pub", data, mode=0o644)
    return kid


def remove_trusted(store_root: Path, kid: str) -> None:
    if not re.fullmatch(r"ed25519:[0-9a-f]{16}", kid):
        raise EdgepackError(f"{kid!r} is not a key id (ed25519: and 16 hex digits, as edgepack trust list shows)")
    path = trust_dir(store_root) / f"{kid.replace(':', '-')}.pub"
    if not path.is_file():
        raise EdgepackError(f"store {store_root} does not trust {kid} (edgepack trust list)")
    os.unlink(path)
