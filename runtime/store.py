"""The device's content-addressed store: verified streaming install, atomic release switch, rollback.

Layout (docs/bundle-format.md):  DIR/blobs/sha256-<hex> (read-only), DIR/releases/<id>/manifest.json,
DIR/current and DIR/previous (symlinks into releases/), DIR/candidate while a release is on trial beside the current
one (docs/shadow.md), DIR/verdicts/<id>.json (the evidence a candidate was promoted or rejected on). An install stages
everything in a private directory and only moves it into place once every byte is verified, so a refused bundle
leaves the store exactly as it was; a killed command leaves the old state or the new one, and its debris is removed by
the next (docs/bundle-format.md, "Crash and power-loss safety").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from .bundle_format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_PAX_HEADER_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    BlobInfo,
    Digest,
    Manifest,
)
from .errors import EdgepackError
from .files import fsync_dir
from .memory import format_mib

_CHUNK = 1 << 20
STAGING_PREFIX = ".staging-"  # a locked command's scratch directory in DIR: debris once no command holds the lock
_LINK_TMP = ".{}.tmp"  # DIR/.current.tmp, DIR/.previous.tmp: a link being switched
INCOMING = ".incoming"  # where deploy uploads a bundle, resumably (no lock): no command here touches it
_MAX_ZSTD_WINDOW = 1 << 27  # 128 MiB: refuse frames that would make us allocate more


@dataclass(frozen=True)
class InstallResult:
    release: str
    manifest: Manifest
    blobs_written: int
    blobs_skipped: int
    bytes_written: int
    seconds: float
    already_current: bool
    candidate: bool = False  # installed as the candidate beside the current release


LINKS = ("current", "previous", "candidate")


class Store:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.releases = self.root / "releases"

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / str(digest)

    def has_blob(self, digest: Digest, blob: BlobInfo) -> bool:
        path = self.blob_path(digest)
        return path.is_file() and path.stat().st_size == blob.size

    def release_id(self, which: str = "current") -> str | None:
        link = self.root / which
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    def manifest(self, which: str = "current") -> Manifest:
        release = self.release_id(which)
        if release is None:
            raise EdgepackError(f"store {self.root}: no {which} release (run `edgepack install` first)")
        path = self.releases / release / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EdgepackError(f"store {self.root}: cannot read {path}: {exc.strerror}") from None
        return Manifest.from_json(data, str(path))

    def segment_paths(self, manifest: Manifest, model: str | None = None) -> list[Path]:
        """Paths of a model's segments, checked to be present with the declared size."""
        info = manifest.model(model)
        paths = []
        for digest in info.segments:
            if not self.has_blob(digest, manifest.blobs[digest]):
                raise EdgepackError(f"store {self.root}: blob {digest} of model {info.name!r} is missing")
            paths.append(self.blob_path(digest))
        return paths

    def adapter_paths(self, manifest: Manifest) -> dict[str, Path]:
        """Adapter name -> its GGUF in the store, checked to be present."""
        paths = {}
        for adapter in manifest.adapters:
            if not self.has_blob(adapter.digest, manifest.blobs[adapter.digest]):
                raise EdgepackError(f"store {self.root}: blob {adapter.digest} of adapter {adapter.name!r} is missing")
            paths[adapter.name] = self.blob_path(adapter.digest)
        return paths

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EdgepackError(f"store {self.root} is busy: another install, rollback or gc runs") from None
            self._clear_debris()
            yield
        finally:
            os.close(fd)

    def debris(self) -> list[Path]:
        """What a killed command leaves in DIR: staging directories and half-switched links. Only safe to remove
        while holding the lock (a running command owns its own)."""
        if not self.root.is_dir():
            return []
        links = {_LINK_TMP.format(link) for link in LINKS}
        return sorted(p for p in self.root.iterdir() if p.name.startswith(STAGING_PREFIX) or p.name in links)

    def _clear_debris(self) -> None:
        for path in self.debris():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))

    def install(self, bundle: Path | str, *, allow_downgrade: bool = False, candidate: bool = False) -> InstallResult:
        """Verify and install `bundle` as the current release (the old one becomes previous), or with `candidate`
        beside it as DIR/candidate, current and previous untouched (a candidate already there is replaced)."""
        bundle = Path(bundle)
        try:
            handle = open(bundle, "rb")
        except OSError as exc:
            raise EdgepackError(f"{bundle}: cannot open bundle: {exc.strerror}") from None
        created_root = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if created_root:
                fsync_dir(self.root.parent)
        except OSError as exc:
            raise EdgepackError(f"store {self.root}: cannot create: {exc.strerror}") from None
        try:
            with handle, self._locked():
                return self._install_locked(bundle, handle, allow_downgrade, candidate)
        except OSError as exc:  # the disk filled up (or failed) while writing: the release switch never happened
            if created_root:
                shutil.rmtree(self.root, ignore_errors=True)
            raise EdgepackError(f"store {self.root}: install stopped: {exc.strerror or exc}; the store "
                                "keeps the release it had") from None
        except BaseException:
            if created_root:
                shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _install_locked(self, bundle: Path, handle: BinaryIO, allow_downgrade: bool,
                        candidate: bool) -> InstallResult:
        started = time.monotonic()
        if candidate and self.release_id("current") is None:
            raise EdgepackError(f"store {self.root}: a candidate needs a current release to be compared with; "
                                "install it without --candidate")
        staging = self._staging()
        try:
            manifest, staged, skipped = _read_bundle(bundle, handle, staging, self, allow_downgrade)
            release = "r" + Digest.of_bytes(manifest.to_json()).short
            already_current = self.release_id("current") == release
            if candidate and already_current:
                raise EdgepackError(f"{bundle}: release {release} is already the current one; a candidate must "
                                    "differ from it")
            written = sum(manifest.blobs[d].size for d in staged)
            _fault("staged")
            self._commit(manifest, release, staging, staged, "candidate" if candidate else "current")
            _fault("committed")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return InstallResult(
            release, manifest, len(staged), skipped, written, time.monotonic() - started, already_current, candidate
        )

    def _commit(self, manifest: Manifest, release: str, staging: Path, staged: list[Digest],
                link: str = "current") -> None:
        if not (self.blobs.is_dir() and self.releases.is_dir()):
            self.blobs.mkdir(exist_ok=True)
            self.releases.mkdir(exist_ok=True)
            fsync_dir(self.root)
        for i, digest in enumerate(staged):
            os.replace(staging / str(digest), self.blob_path(digest))
            _fault(f"blob-{i}")
        fsync_dir(self.blobs)
        release_dir = self.releases / release
        if not _holds(release_dir / MANIFEST_NAME, manifest.to_json()):
            if release_dir.exists():  # damaged (a store an older edgepack's gc was killed in): set it aside
                os.replace(release_dir, staging / "damaged")
            tmp = staging / "release"
            tmp.mkdir()
            _write_synced(tmp / MANIFEST_NAME, manifest.to_json())
            fsync_dir(tmp)
            os.replace(tmp, release_dir)
            fsync_dir(self.releases)
            _fault("release-written")
        if link == "candidate":
            self._point("candidate", release)
            return
        current = self.release_id("current")
        if current == release:
            return
        if current is not None:
            self._point("previous", current)
            _fault("previous-switched")
        self._point("current", release)

    def _point(self, link: str, release: str) -> None:
        """Atomically make DIR/<link> point at releases/<release>."""
        tmp = self.root / _LINK_TMP.format(link)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path("releases") / release, tmp)
        fsync_dir(self.root)  # the new link durable before the rename publishes it
        _fault(f"{link}-tmp")
        os.replace(tmp, self.root / link)
        fsync_dir(self.root)

    def gc(self) -> tuple[list[str], int, int]:
        """Remove releases other than current, previous and candidate, and blobs those do not reference.

        Returns (releases removed, blobs removed, bytes freed)."""
        if not self.root.is_dir():
            raise EdgepackError(f"store {self.root} does not exist")
        with self._locked():
            links = {link: self.release_id(link) for link in LINKS}
            kept = {r for r in links.values() if r}
            referenced: set[str] = set()
            for link, release in links.items():
                if release:
                    referenced.update(str(d) for d in self.manifest(link).blobs)
            removed_releases = []
            if self.releases.is_dir():
                # Renamed out of releases/ whole before deletion: a kill midway never leaves half a release
                # there (an install of it again would trust the directory).
                trash = self._staging()
                for release in sorted(p for p in self.releases.iterdir() if p.name not in kept):
                    os.replace(release, trash / release.name)
                    removed_releases.append(release.name)
                fsync_dir(self.releases)
                _fault("gc-releases-moved")
                shutil.rmtree(trash)
            removed, freed = 0, 0
            if self.blobs.is_dir():
                for blob in sorted(self.blobs.iterdir()):
                    if blob.name not in referenced:
                        freed += blob.stat().st_size
                        blob.unlink()
                        removed += 1
                        _fault(f"gc-blob-{removed - 1}")
                fsync_dir(self.blobs)
            return removed_releases, removed, freed

    def promote(self, evidence: dict | None = None) -> tuple[str, str]:
        """The candidate becomes current, the current previous (for rollback); `evidence` is recorded in
        DIR/verdicts/. Returns (new current, new previous)."""
        return self._decide("promoted", evidence or {})

    def reject(self, evidence: dict | None = None) -> str:
        """Drop the candidate (its blobs stay until gc), recording why in DIR/verdicts/. Returns its release id."""
        return self._decide("rejected", evidence or {})[0]

    def _decide(self, verdict: str, evidence: dict) -> tuple[str, str]:
        if not self.root.is_dir():
            raise EdgepackError(f"store {self.root} does not exist")
        with self._locked():
            candidate, current = self.release_id("candidate"), self.release_id("current")
            if candidate is None or not (self.releases / candidate).is_dir():
                raise EdgepackError(f"store {self.root}: no candidate release (install one with --candidate)")
            record = {"release": candidate, "verdict": verdict, "against": current,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **evidence}
            verdicts = self.root / "verdicts"
            verdicts.mkdir(exist_ok=True)
            _write_synced(verdicts / f"{candidate}.json", (json.dumps(record, indent=2) + "\n").encode())
            fsync_dir(verdicts)
            if verdict == "promoted" and current != candidate:
                if current is not None:
                    self._point("previous", current)
                    _fault("promote-previous-switched")
                self._point("current", candidate)
                _fault("promote-current-switched")
            (self.root / "candidate").unlink()
            fsync_dir(self.root)
            return candidate, (current or "")

    def verdict(self, release: str) -> dict | None:
        """The recorded verdict on a release that was a candidate, if any."""
        path = self.root / "verdicts" / f"{release}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def rollback(self) -> tuple[str, str]:
        """Swap current and previous; returns (new current, new previous)."""
        if not self.root.is_dir():
            raise EdgepackError(f"store {self.root} does not exist")
        with self._locked():
            current, previous = self.release_id("current"), self.release_id("previous")
            if previous is None or not (self.releases / previous).is_dir():
                raise EdgepackError(f"store {self.root}: no previous release to roll back to")
            assert current is not None
            self._point("current", previous)
            _fault("rollback-current-switched")
            self._point("previous", current)
            return previous, current


def bundle_manifest(bundle: Path | str) -> Manifest:
    """Read only the manifest of a bundle archive (for inspect), without installing anything."""
    try:
        with open(bundle, "rb") as handle, _open_archive(handle, str(bundle)) as archive:
            return _read_manifest(archive, str(bundle))[0]
    except OSError as exc:
        raise EdgepackError(f"{bundle}: cannot open bundle: {exc.strerror or exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise EdgepackError(f"{bundle}: archive is truncated or corrupt ({exc})") from None


def _read_bundle(
    bundle: Path, handle: BinaryIO, staging: Path, store: Store, allow_downgrade: bool = False
) -> tuple[Manifest, list[Digest], int]:
    """Stream the archive: manifest first, its signature when there is one (checked against the store's trusted
    keys) and the version rule, then only the blobs it declares, each verified."""
    where = str(bundle)
    archive = _open_archive(handle, where)
    try:
        manifest, manifest_bytes = _read_manifest(archive, where)
        after = _next_member(archive, where)
        signature = None
        if after is not None and after.name == SIGNATURE_NAME:
            signature = _read_member(archive, after, where, MAX_SIGNATURE_BYTES)
            after = _next_member(archive, where)
        from . import signatures  # here: cryptography loads for installs, not for every command that opens a store

        signatures.verify(manifest_bytes, signature, signatures.trusted_keys(store.root), where)
        _check_version(manifest, store, allow_downgrade, where)
        _check_disk_space(manifest, store)
        expected = {d.member_name: (d, b) for d, b in manifest.blobs.items()}
        staged: list[Digest] = []
        skipped = 0
        seen: set[str] = set()
        for member in _members(archive, after, where):
            entry = expected.get(member.name)
            if entry is None or member.name in seen:
                kind = "duplicate" if member.name in seen else "unexpected"
                raise EdgepackError(f"{where}: {kind} archive member {member.name!r} refused")
            seen.add(member.name)
            digest, blob = entry
            if not member.isreg():
                raise EdgepackError(f"{where}: member {member.name!r} is a link or special file, refused")
            if member.size != blob.zsize:
                raise EdgepackError(
                    f"{where}: member {member.name!r} is {member.size} bytes, manifest declares {blob.zsize}"
                )
            if store.has_blob(digest, blob):
                skipped += 1
                continue
            source = archive.extractfile(member)
            assert source is not None
            _stage_blob(source, digest, blob, staging / str(digest), where)
            staged.append(digest)
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
        raise EdgepackError(f"{where}: archive is truncated or corrupt ({exc})") from None
    missing = [d for d, b in manifest.blobs.items() if d.member_name not in seen and not store.has_blob(d, b)]
    if missing:
        raise EdgepackError(
            f"{where}: {len(missing)} blob(s) neither in the bundle nor in the store, e.g. {missing[0]}"
            " (truncated bundle, or a delta whose base is not installed)"
        )
    return manifest, staged, skipped


class _BundleTarInfo(tarfile.TarInfo):
    """tarfile's header parser, held to what the bundle writer produces: ustar headers, a blob over 8 GiB with a
    small pax header ahead. GNU long names and sparse files are refused, and a pax header above
    MAX_PAX_HEADER_BYTES before tarfile reads it: CPython's parser lets a bad sparse map escape as ValueError,
    holds a whole extended header in memory, and takes quadratic time over a large pax header (CVE-2024-6232,
    fixed in Python 3.11.10 and 3.12.6; devices run older ones)."""

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        raise tarfile.SubsequentHeaderError("a GNU long name header, refused (bundles have none)")

    def _proc_sparse(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        raise tarfile.SubsequentHeaderError("a GNU sparse member, refused (bundles have none)")

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > MAX_PAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"a pax header of {self.size} bytes, refused (limit "
                                                f"{MAX_PAX_HEADER_BYTES})")
        return super()._proc_pax(archive)

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise tarfile.SubsequentHeaderError("a GNU sparse member, refused (bundles have none)")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


# What tarfile lets out of a hostile header besides its own errors: a pax header's undecodable charset
# (UnicodeDecodeError), a chain of extended headers it parses recursively (RecursionError).
_HEADER_ERRORS = (tarfile.TarError, EOFError, ValueError, RecursionError)


def _open_archive(handle: BinaryIO, where: str) -> tarfile.TarFile:
    """A streaming reader of the bundle at `handle` (it parses the first header at once)."""
    try:
        return tarfile.open(fileobj=handle, mode="r|", tarinfo=_BundleTarInfo)
    except _HEADER_ERRORS as exc:
        raise EdgepackError(f"{where}: not an edgepack bundle (unreadable archive: {_header_error(exc)})") from None


def _next_member(archive: tarfile.TarFile, where: str) -> tarfile.TarInfo | None:
    try:
        return archive.next()
    except _HEADER_ERRORS as exc:
        raise EdgepackError(f"{where}: archive is truncated or corrupt ({_header_error(exc)})") from None


def _header_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "extended headers chained too deep"
    return " ".join(str(exc).split()) or type(exc).__name__


def _members(archive: tarfile.TarFile, first: tarfile.TarInfo | None, where: str) -> Iterator[tarfile.TarInfo]:
    member = first
    while member is not None:
        yield member
        member = _next_member(archive, where)


def _read_manifest(archive: tarfile.TarFile, where: str) -> tuple[Manifest, bytes]:
    """The manifest and its exact bytes (what a signature covers)."""
    first = _next_member(archive, where)
    if first is None or first.name != MANIFEST_NAME:
        name = "nothing" if first is None else repr(first.name)
        raise EdgepackError(f"{where}: first archive member must be {MANIFEST_NAME}, found {name}")
    data = _read_member(archive, first, where, MAX_MANIFEST_BYTES)
    return Manifest.from_json(data, f"{where}: {MANIFEST_NAME}"), data


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, where: str, limit: int) -> bytes:
    if not member.isreg():
        raise EdgepackError(f"{where}: {member.name} is a link or special file, refused")
    if member.size > limit:
        raise EdgepackError(f"{where}: {member.name} is {member.size} bytes, limit {limit}")
    source = archive.extractfile(member)
    assert source is not None
    data = source.read()
    if len(data) != member.size:
        raise EdgepackError(f"{where}: archive is truncated inside {member.name}")
    return data


def _check_version(manifest: Manifest, store: Store, allow_downgrade: bool, where: str) -> None:
    """An incoming bundle must be newer than the store's releases of the same name (current and previous), so an
    old bundle cannot be replayed; the same version is fine only as the very same release (a no-op)."""
    if allow_downgrade:
        return
    release = "r" + Digest.of_bytes(manifest.to_json()).short
    for link in ("current", "previous"):
        installed_id = store.release_id(link)
        if installed_id is None or installed_id == release:
            continue
        installed = store.manifest(link)
        if installed.name != manifest.name or installed.bundle_version < manifest.bundle_version:
            continue
        older = "older than" if manifest.bundle_version < installed.bundle_version else "the same version as, but " \
                "not the same bundle as,"
        raise EdgepackError(f"{where}: {manifest.name} v{manifest.bundle_version} is {older} the {link} release "
                            f"v{installed.bundle_version}: refused (install --allow-downgrade to force it)")


def _check_disk_space(manifest: Manifest, store: Store) -> None:
    needed = sum(b.size for d, b in manifest.blobs.items() if not store.has_blob(d, b))
    free = shutil.disk_usage(store.root).free
    if needed > free:
        raise EdgepackError(
            f"store {store.root}: bundle needs {format_mib(needed, 1)}, only {format_mib(free, 1)} free"
        )


def _stage_blob(source: BinaryIO, digest: Digest, blob: BlobInfo, target: Path, where: str) -> None:
    """Decompress one zstd frame into target, hashing as it goes and never beyond blob.size."""
    hasher = hashlib.sha256()
    written = 0
    decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
    with open(target, "wb") as out, decompressor.stream_reader(source, read_across_frames=False) as reader:
        try:
            while chunk := reader.read(_CHUNK):
                written += len(chunk)
                if written > blob.size:
                    raise EdgepackError(
                        f"{where}: blob {digest} decompresses beyond its declared {blob.size} bytes"
                    )
                hasher.update(chunk)
                out.write(chunk)
        except zstandard.ZstdError as exc:
            raise EdgepackError(f"{where}: blob {digest} is corrupt ({exc})") from None
        out.flush()
        os.fchmod(out.fileno(), 0o444)  # synced with the content, so a power cut cannot leave it writable
        os.fsync(out.fileno())
    if written != blob.size:
        raise EdgepackError(f"{where}: blob {digest} is {written} bytes, manifest declares {blob.size}")
    if hasher.hexdigest() != digest.hex:
        raise EdgepackError(f"{where}: blob {digest} is corrupt (sha256 {hasher.hexdigest()[:12]}...)")


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fault(point: str) -> None:
    """Test hook (tests/test_crash_safety.py): with EDGEPACK_FAULT=<point> in the environment, the process kills
    itself with SIGKILL here, as a power cut or the OOM killer would, so a test can stop it at an exact moment."""
    if os.environ.get("EDGEPACK_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
