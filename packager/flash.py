"""`edgepack flash`: a stock OS image (Raspberry Pi OS, the Jetson SD image) made into one that boots into a serving
agent, written without root and without mounting (packager/disk_image.py), then read back and compared.

Into the image's ext4 root: the store with the bundle installed (/var/lib/edgepack/store), the wheelhouse
(/opt/edgepack/wheelhouse), edgepack.service, and a one-shot first-boot unit that installs the runtime offline, creates
the service user and enables the service (packager/data/edgepack-firstboot.sh). Into the FAT boot partition, where
there is one: `ssh` when a key is given (Raspberry Pi OS then enables sshd). docs/boards.md has the details.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgepack.runtime.auth import load_api_keys
from edgepack.runtime.boards import BoardProfile
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store
from edgepack.runtime.systemd_unit import render_unit

from .disk_image import Ext4, Fat, Partition, PartitionTable, grow_partition, parents, read_partitions
from .errors import PackagerError

STORE = "/var/lib/edgepack/store"
HOME = "/opt/edgepack"
UNITS = "/etc/systemd/system"
FIRSTBOOT_UNIT = "edgepack-firstboot.service"
SERVICE_USER = "edgepack"
API_KEYS = "/etc/edgepack/api-keys"
_OURS = ("/var/lib/edgepack", HOME)  # the trees flash creates (refused when the image has them already)
_MiB = 1 << 20
_SLACK = 64 * _MiB  # kept free in the root file system beyond what is written (logs, the venv: ~100 MiB more)
_VENV_ESTIMATE = 160 * _MiB  # the runtime venv the first boot creates (llama.cpp, numpy, onnxruntime, ...)
_HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_CHUNK = 4 * _MiB


@dataclass(frozen=True)
class FlashOptions:
    board: BoardProfile
    image: Path  # .img, .img.xz or a .zip with one .img
    bundle: Path
    wheels: Path
    ssh_key: Path | None = None
    ssh_user: str = "admin"
    hostname: str | None = None
    trust: Path | None = None  # a public key the store trusts from now on (updates must be signed by it)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key_file: Path | None = None  # copied to API_KEYS (root only), handed to serve as a systemd credential


@dataclass(frozen=True)
class FlashResult:
    image_bytes: int
    release: str
    root: Partition
    boot: Partition | None
    files: int
    bytes_written: int
    grown_by: int
    seconds: float


@dataclass(frozen=True)
class _Entry:
    """One thing written into the ext4 root: a file (source), a directory (source None, target None) or a link."""
    path: str
    mode: int
    source: Path | None = None
    target: str | None = None


def flash_image(options: FlashOptions, output: Path, log: Callable[[str], None] = lambda _: None) -> FlashResult:
    """Write the flashed image to `output` (published by rename only once it has been read back and verified)."""
    started = time.monotonic()
    _check_inputs(options)
    output.parent.mkdir(parents=True, exist_ok=True)
    # everything happens in a scratch folder beside the output (the same file system, for the final rename); the
    # copy keeps the stock image's name, so that messages name the image the user gave
    with tempfile.TemporaryDirectory(prefix=".edgepack-flash-", dir=output.parent) as scratch_name:
        scratch = Path(scratch_name)
        log(f"installing {options.bundle.name} into the image's store")
        store = Store(scratch / "store")
        if options.trust:
            from edgepack.runtime.signatures import add_trusted  # cryptography: only when a key is given

            add_trusted(store.root, options.trust)
        installed = store.install(options.bundle)
        log(f"copying {options.image.name}")
        partial = scratch / "image" / options.image.name.removesuffix(".xz").removesuffix(".zip")
        partial.parent.mkdir()
        _copy_image(options.image, partial)
        result = _write_into(partial, options, store, installed.release, scratch, log)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, output)
    return FlashResult(output.stat().st_size, installed.release, result[0], result[1], result[2], result[3],
                       result[4], time.monotonic() - started)


def _write_into(image: Path, options: FlashOptions, store: Store, release: str, scratch: Path,
                log: Callable[[str], None]) -> tuple[Partition, Partition | None, int, int, int]:
    table = read_partitions(image)
    root, boot = _roles(image, table)
    ext4 = Ext4(image, root)
    for taken in _OURS:
        if ext4.exists(taken):
            raise PackagerError(f"{options.image.name}: {taken} already exists in the root file system: flash a stock "
                                "image, not one that was flashed before")
    entries = _entries(options, store, release, scratch, ext4)
    needed = sum(_allocated(e) for e in entries) + _VENV_ESTIMATE + _SLACK
    grown_by = 0
    free = ext4.free_bytes()
    if free < needed:
        grown_by = -(-(needed - free) // _MiB) * _MiB
        log(f"growing the root partition by {grown_by // _MiB} MiB (it has {free // _MiB} MiB free)")
        root = grow_partition(image, table, root, image.stat().st_size + grown_by)
        ext4 = Ext4(image, root)
        ext4.grow(scratch)
    log(f"writing {len(entries)} files and folders into partition {root.number} (ext4)")
    ext4.run(_debugfs_commands(entries, ext4), f"{image.name}: writing the root file system")
    fat_files = {"/ssh": b""} if options.ssh_key and boot else {}
    if boot:
        fat = Fat(image, boot)
        for path, data in fat_files.items():
            fat.write(path, data, scratch)
    log("reading everything back")
    _verify(ext4, entries, scratch / "readback")
    if boot:
        for path, data in fat_files.items():
            if fat.read(path) != data:
                raise PackagerError(f"{image.name}: {path} on the boot partition reads back different")
    files = [e for e in entries if e.source is not None]
    return root, boot, len(files) + len(fat_files), sum(e.source.stat().st_size for e in files), grown_by


def _check_inputs(options: FlashOptions) -> None:
    if not options.image.is_file():
        raise PackagerError(f"--image {options.image}: no such file")
    wheels = sorted(options.wheels.glob("*.whl")) if options.wheels.is_dir() else []
    names = {w.name.split("-", 1)[0].lower() for w in wheels}
    for needed in ("edgepack", "pip", "llama_cpp_python"):
        if needed not in names:
            raise PackagerError(f"--wheels {options.wheels}: no {needed} wheel (make the folder with "
                                f"`edgepack wheels --board {options.board.name}`)")
    record = options.wheels / "edgepack-wheels.json"
    if record.is_file():
        try:
            board = json.loads(record.read_text()).get("board")
        except (ValueError, AttributeError):
            raise PackagerError(f"{record}: not a wheelhouse record (invalid JSON)") from None
        if board != options.board.name:
            raise PackagerError(f"--wheels {options.wheels}: built for {board}, not {options.board.name}")
    if options.hostname is not None and not _HOSTNAME.fullmatch(options.hostname):
        raise PackagerError(f"--hostname {options.hostname!r}: use 1-63 lowercase letters, digits and '-' "
                            "(not first or last)")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", options.ssh_user):
        raise PackagerError(f"--ssh-user {options.ssh_user!r}: not a valid Linux user name")
    if options.api_key_file is not None:
        try:
            load_api_keys(options.api_key_file, environ={})  # the server's own reading: a file it refuses, refused
        except EdgepackError as exc:
            raise PackagerError(f"--api-key-file: {exc}") from None
    if options.ssh_key is not None:
        try:
            text = options.ssh_key.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PackagerError(f"--ssh-key {options.ssh_key}: cannot read: {exc}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or not all(re.match(r"(ssh-|ecdsa-|sk-)\S+ [A-Za-z0-9+/=]+", line) for line in lines):
            raise PackagerError(f"--ssh-key {options.ssh_key}: not an OpenSSH public key (ssh-ed25519 AAAA...)")


def _roles(image: Path, table: PartitionTable) -> tuple[Partition, Partition | None]:
    """The root file system (the ext4 partition: GPT name APP on the Jetson image, else the largest) and the FAT
    boot partition (Raspberry Pi OS's bootfs; the Jetson image has none edgepack writes)."""
    ext4 = [p for p in table.partitions if p.filesystem == "ext4"]
    if not ext4:
        raise PackagerError(f"{image.name}: no ext4 partition: not a Raspberry Pi OS or Jetson image")
    named = [p for p in ext4 if p.name == "APP"]
    root = named[0] if named else max(ext4, key=lambda p: p.size)
    fat = [p for p in table.partitions if p.filesystem == "fat"]
    return root, (fat[0] if fat else None)


def _entries(options: FlashOptions, store: Store, release: str, scratch: Path, ext4: Ext4) -> list[_Entry]:
    entries = [_Entry(d, 0o755) for d in parents(STORE) + parents(HOME + "/wheelhouse")
               + parents(UNITS + "/multi-user.target.wants/x")]
    entries += list(_tree(store.root, STORE))
    entries += list(_tree(options.wheels, HOME + "/wheelhouse", only=lambda p: p.suffix in (".whl", ".json")))
    texts = scratch / "texts"
    texts.mkdir()

    def text(path: str, content: str | bytes, mode: int = 0o644) -> None:
        local = texts / path.strip("/").replace("/", "__")
        local.write_bytes(content.encode() if isinstance(content, str) else content)
        entries.append(_Entry(path, mode, local))

    data = resources.files("edgepack.packager") / "data"
    text(HOME + "/firstboot.sh", (data / "edgepack-firstboot.sh").read_bytes(), 0o755)
    text(f"{UNITS}/{FIRSTBOOT_UNIT}", (data / FIRSTBOOT_UNIT).read_bytes())
    entries.append(_Entry(f"{UNITS}/multi-user.target.wants/{FIRSTBOOT_UNIT}", 0o777,
                          target=f"{UNITS}/{FIRSTBOOT_UNIT}"))
    text(f"{UNITS}/edgepack.service", _service_unit(options))
    record = {"board": options.board.name, "bundle": options.bundle.name, "release": release,
              "flashed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "store": STORE,
              "host": options.host, "port": options.port}
    text(HOME + "/flash.json", json.dumps(record, indent=2) + "\n")
    if options.ssh_key:
        text(HOME + "/authorized_keys", options.ssh_key.read_bytes(), 0o600)
        text(HOME + "/ssh-user", options.ssh_user + "\n")
    if options.api_key_file:
        entries.append(_Entry("/etc/edgepack", 0o755))
        text(API_KEYS, options.api_key_file.read_bytes(), 0o600)
    if options.hostname:
        text("/etc/hostname", options.hostname + "\n")
        hosts = ext4.read("/etc/hosts").decode(errors="replace") if ext4.exists("/etc/hosts") else ""
        text("/etc/hosts", _hosts_with(hosts, options.hostname))
    return entries


def _service_unit(options: FlashOptions) -> str:
    try:
        return render_unit(Path(STORE), host=options.host, port=options.port, user=SERVICE_USER,
                           executable=Path(HOME + "/venv/bin/edgepack"), serve_args=["--board", options.board.name],
                           api_key_file=Path(API_KEYS) if options.api_key_file else None)
    except EdgepackError as exc:
        raise PackagerError(f"the service unit: {exc}") from None


def _hosts_with(hosts: str, hostname: str) -> str:
    """/etc/hosts with 127.0.1.1 naming the new host (Debian's convention for the machine's own name)."""
    lines = [line for line in hosts.splitlines() if not line.startswith("127.0.1.1")]
    if not any(line.startswith("127.0.0.1") for line in lines):
        lines.insert(0, "127.0.0.1\tlocalhost")
    return "\n".join([*lines, f"127.0.1.1\t{hostname}"]) + "\n"


def _tree(local: Path, remote: str, only: Callable[[Path], bool] = lambda _: True) -> Iterator[_Entry]:
    yield _Entry(remote, 0o755)
    for path in sorted(local.rglob("*")):
        where = remote + "/" + path.relative_to(local).as_posix()
        if path.is_symlink():
            yield _Entry(where, 0o777, target=os.readlink(path))
        elif path.is_dir():
            yield _Entry(where, 0o755)
        elif only(path):
            yield _Entry(where, stat.S_IMODE(path.stat().st_mode), path)


def _allocated(entry: _Entry) -> int:
    return -(-entry.source.stat().st_size // 4096) * 4096 + 4096 if entry.source else 4096


def _debugfs_commands(entries: list[_Entry], ext4: Ext4) -> list[str]:
    commands = []
    for entry in entries:
        path = _q(entry.path)
        if entry.source is None and entry.target is None:
            if not entry.path.startswith(_OURS) and ext4.exists(entry.path):
                continue  # /var, /var/lib, /etc/systemd/system...: the OS's own, left as they are
            commands.append(f"mkdir {path}")
        elif entry.target is not None:
            commands.append(f"symlink {path} {_q(entry.target)}")
            continue  # a symlink's mode and owner are not used
        else:
            if entry.path in ("/etc/hostname", "/etc/hosts") and ext4.exists(entry.path):
                commands.append(f"rm {path}")
            commands.append(f"write {_q(str(entry.source))} {path}")
        commands += [f"sif {path} mode 0{(stat.S_IFDIR if entry.source is None else stat.S_IFREG) | entry.mode:o}",
                     f"sif {path} uid 0", f"sif {path} gid 0"]
    return commands


def _q(path: str) -> str:
    if any(ch in path for ch in ' "\n\r\t'):
        raise PackagerError(f"path {path!r}: blanks and quotes cannot be written with debugfs")
    return path


def _verify(ext4: Ext4, entries: list[_Entry], readback: Path) -> None:
    """Read the written trees back out of the image and compare every file, mode and link; then e2fsck."""
    ext4.check()
    for top in _OURS:
        into = readback / top.strip("/").rsplit("/", 1)[0]
        into.mkdir(parents=True)
        ext4.dump(top, into)
    for entry in entries:
        if entry.path.startswith(_OURS):
            got = readback / entry.path.strip("/")
            ok = (os.readlink(got) == entry.target if entry.target is not None else
                  got.is_dir() if entry.source is None else
                  stat.S_IMODE(got.stat().st_mode) == entry.mode and _sha256(got) == _sha256(entry.source))
        elif entry.target is not None:
            ok = ext4.exists(entry.path)
        elif entry.source is not None:
            ok = ext4.read(entry.path) == entry.source.read_bytes()
        else:
            ok = ext4.exists(entry.path)
        if not ok:
            raise PackagerError(f"{ext4.image.name}: {entry.path} reads back different from what was written")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_image(source: Path, destination: Path) -> None:
    """Copy (or decompress .xz / unzip a one-image .zip) the stock image, sparse; a damaged archive is one line."""
    try:
        with _open_image(source) as reader, open(destination, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                if chunk.count(0) == len(chunk):
                    writer.seek(len(chunk), 1)  # sparse: an OS image is mostly empty space
                else:
                    writer.write(chunk)
            writer.truncate()
    except (lzma.LZMAError, zipfile.BadZipFile, EOFError) as exc:
        raise PackagerError(f"--image {source}: damaged archive ({exc})") from None
    except OSError as exc:
        raise PackagerError(f"--image {source}: {exc.strerror or exc}") from None


def _open_image(source: Path):  # noqa: ANN202 - a binary reader
    if source.suffix == ".xz":
        return lzma.open(source)
    if source.suffix == ".zip":
        archive = zipfile.ZipFile(source)
        images = [n for n in archive.namelist() if n.endswith(".img")]
        if len(images) != 1:
            raise PackagerError(f"--image {source}: the archive holds {len(images)} .img files, not one")
        return archive.open(images[0])
    return open(source, "rb")


def copy_to_device(image: Path, device: Path) -> float:
    """Write the verified image to a block device, flush it, read it back and compare. Returns seconds."""
    started = time.monotonic()
    size = image.stat().st_size
    try:
        fd = os.open(device, os.O_WRONLY | os.O_EXCL)  # O_EXCL on a block device: EBUSY while it is mounted
    except OSError as exc:
        raise PackagerError(f"--device {device}: cannot open for writing: {exc.strerror}") from None
    try:
        with open(image, "rb") as f:
            while chunk := f.read(_CHUNK):
                os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    wanted = _sha256(image)
    digest = hashlib.sha256()
    with open(device, "rb") as f:
        left = size
        while left and (chunk := f.read(min(_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    if digest.hexdigest() != wanted:
        raise PackagerError(f"--device {device}: what was written reads back different (a failing card?)")
    return time.monotonic() - started


def check_device(device: Path, image_bytes: int | None = None) -> None:
    """Refuse what is not a whole, unused block device: not a block device, mounted (it or any partition),
    holding the running system's root, or smaller than the image."""
    try:
        st = os.stat(device)
    except OSError as exc:
        raise PackagerError(f"--device {device}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise PackagerError(f"--device {device}: not a block device")
    name = Path(os.path.realpath(device)).name
    sys_block = Path("/sys/class/block") / name
    family = {name} | {p.name for p in sys_block.iterdir() if (p / "partition").exists()} if sys_block.exists() \
        else {name}
    numbers = {_dev_number(n) for n in family} - {None}
    root_number = _mount_numbers().get("/")
    if root_number in numbers or _disk_of(root_number) in numbers:
        raise PackagerError(f"--device {device}: the running system's root file system is on it")
    mounted = sorted(point for point, number in _mount_numbers().items() if number in numbers)
    if mounted:
        raise PackagerError(f"--device {device}: mounted at {mounted[0]}: unmount it first")
    if image_bytes is not None:
        size = int((sys_block / "size").read_text()) * 512 if (sys_block / "size").exists() else 0
        if size and size < image_bytes:
            raise PackagerError(f"--device {device}: {size // _MiB} MiB, smaller than the image "
                                f"({image_bytes // _MiB} MiB)")


def _dev_number(name: str) -> str | None:
    path = Path("/sys/class/block") / name / "dev"
    return path.read_text().strip() if path.exists() else None


def _disk_of(number: str | None) -> str | None:
    """The whole disk's major:minor for a partition's (a disk's own for a disk)."""
    if number is None:
        return None
    link = Path("/sys/dev/block") / number
    if not link.exists():
        return None
    resolved = link.resolve()
    parent = resolved.parent / "dev"
    return parent.read_text().strip() if (resolved / "partition").exists() and parent.exists() else number


def _mount_numbers() -> dict[str, str]:
    """Mount point -> major:minor of its device, from /proc/self/mountinfo."""
    numbers = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            numbers[fields[4]] = fields[2]
    return numbers
