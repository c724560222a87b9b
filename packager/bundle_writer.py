"""Write a .edgepack archive: manifest.json first, then one zstd frame per blob (bundle format v1)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.runtime import signatures
from edgepack.runtime.bundle_format import (
    MANIFEST_NAME,
    MEDIA_GGUF_SEGMENT,
    SIGNATURE_NAME,
    BlobInfo,
    Digest,
    Manifest,
)
from edgepack.runtime.files import fsync_dir

_CHUNK = 4 << 20
# USTAR caps a member at 8 GiB; PAX records a larger size in an extended header, as the format's 64 GiB blobs
# need (members that fit USTAR get the same plain header either way).
_TAR_FORMAT = tarfile.PAX_FORMAT


@dataclass(frozen=True)
class CompressedBlob:
    digest: Digest
    info: BlobInfo
    path: Path  # the .zst file in the work directory


def compress(
    source: Path, digest: Digest, work_dir: Path, level: int, progress: Callable[[int], None],
    media_type: str = MEDIA_GGUF_SEGMENT,
) -> CompressedBlob:
    """One zstd frame with content size and checksum, so the device can verify as it inflates."""
    target = work_dir / f"{digest}.zst"
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
    size = source.stat().st_size
    with (
        open(source, "rb") as src,
        open(target, "wb") as dst,
        compressor.stream_writer(dst, size=size, closefd=False) as writer,
    ):
        while chunk := src.read(_CHUNK):
            writer.write(chunk)
            progress(len(chunk))
    return CompressedBlob(digest, BlobInfo(size=size, zsize=target.stat().st_size, media_type=media_type), target)


def write_archive(out: Path, manifest: Manifest, blobs: list[CompressedBlob], mtime: int,
                  key: Ed25519PrivateKey | None = None) -> int:
    """Write atomically (temp file, fsync, rename, fsync the folder: a crash leaves the old bundle or the
    whole new one), signed by `key` when given; returns the archive size."""
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as file:
        with tarfile.open(fileobj=file, mode="w", format=_TAR_FORMAT) as archive:
            data = manifest.to_json()
            archive.addfile(_member(MANIFEST_NAME, len(data), mtime), io.BytesIO(data))
            if key is not None:
                signature = signatures.sign(data, key)
                archive.addfile(_member(SIGNATURE_NAME, len(signature), mtime), io.BytesIO(signature))
            for blob in blobs:
                with open(blob.path, "rb") as handle:
                    archive.addfile(_member(blob.digest.member_name, blob.info.zsize, mtime), handle)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, out)
    fsync_dir(out.parent)
    return out.stat().st_size


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info
