"""Write a .edgepack archive: manifest.json first, then one zstd frame per blob (bundle format v1)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from edgepack.runtime.bundle_format import MANIFEST_NAME, BlobInfo, Digest, Manifest

_CHUNK = 4 << 20


@dataclass(frozen=True)
class CompressedBlob:
    info: BlobInfo
    path: Path  # the .zst file in the work directory


def compress(
    source: Path, digest: Digest, work_dir: Path, level: int, progress: Callable[[int], None]
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
    return CompressedBlob(BlobInfo(digest, size, target.stat().st_size), target)


def write_archive(out: Path, manifest: Manifest, blobs: list[CompressedBlob], mtime: int) -> int:
    """Write atomically (temp file + rename); returns the archive size."""
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as archive:
        data = manifest.to_json()
        archive.addfile(_member(MANIFEST_NAME, len(data), mtime), io.BytesIO(data))
        for blob in blobs:
            with open(blob.path, "rb") as handle:
                archive.addfile(_member(blob.info.digest.member_name, blob.info.zsize, mtime), handle)
    os.replace(partial, out)
    return out.stat().st_size


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info
