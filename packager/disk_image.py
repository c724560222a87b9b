"""A disk image's partitions, read and written without root and without mounting.

The partition table is read with util-linux's `sfdisk --json`, a FAT partition is written with mtools
(`-i IMAGE@@OFFSET`), an ext4 partition with e2fsprogs' debugfs (`IMAGE?offset=N`, the io option every e2fsprogs
tool accepts). None of them needs a loop device, a mount or privileges, so `edgepack flash` runs as any user.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import PackagerError

SECTOR = 512
_CHUNK = 4 << 20
_EXT_MAGIC_AT, _EXT_MAGIC = 1024 + 56, b"\x53\xef"
_FAT_TYPES_AT = ((0x52, b"FAT32   "), (0x36, b"FAT16   "), (0x36, b"FAT12   "))

TOOLS = {"sfdisk": "fdisk", "debugfs": "e2fsprogs", "resize2fs": "e2fsprogs", "e2fsck": "e2fsprogs",
         "dumpe2fs": "e2fsprogs", "mcopy": "mtools", "mmd": "mtools", "mdir": "mtools"}


def missing_tools() -> list[str]:
    """'tool (Debian package)' for each tool this module runs that is not on PATH (also /usr/sbin, /sbin)."""
    return [f"{tool} ({package})" for tool, package in TOOLS.items() if _which(tool) is None]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _run(args: list[str], what: str, stdin: str | None = None,
         ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    tool = _which(args[0])
    if tool is None:
        raise PackagerError(f"{what} needs {args[0]} ({TOOLS.get(args[0], 'not installed')}): install that package")
    done = subprocess.run([tool, *args[1:]], input=stdin, capture_output=True, text=True)
    if done.returncode not in ok:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise PackagerError(f"{what}: {args[0]} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes from the image's start
    size: int  # bytes
    type: str  # MBR type ("c", "83") or GPT type GUID
    name: str  # GPT partition name ("" on MBR)
    filesystem: str  # "ext4", "fat" or "" (probed from the superblock / boot sector)

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class PartitionTable:
    label: str  # "dos" or "gpt"
    partitions: tuple[Partition, ...]


def read_partitions(image: Path) -> PartitionTable:
    """The image's partition table, each partition's file system probed from its first bytes."""
    done = _run(["sfdisk", "--json", str(image)], f"{image.name}: reading the partition table")
    try:
        table = json.loads(done.stdout)["partitiontable"]
        if table.get("sectorsize", SECTOR) != SECTOR:
            raise PackagerError(f"{image.name}: sector size {table['sectorsize']} (only {SECTOR} is supported)")
        rows = table.get("partitions", [])
        partitions = tuple(
            Partition(_number(row["node"]), row["start"] * SECTOR, row["size"] * SECTOR, str(row["type"]).lower(),
                      row.get("name", ""), _probe(image, row["start"] * SECTOR)) for row in rows)
    except (ValueError, KeyError, TypeError) as exc:
        raise PackagerError(f"{image.name}: sfdisk gave an unreadable partition table ({exc})") from None
    return PartitionTable(table.get("label", ""), partitions)


def _number(node: str) -> int:
    digits = len(node) - len(node.rstrip("0123456789"))
    return int(node[-digits:])


def _probe(image: Path, start: int) -> str:
    with open(image, "rb") as f:
        f.seek(start)
        head = f.read(2048)
    if head[_EXT_MAGIC_AT:_EXT_MAGIC_AT + 2] == _EXT_MAGIC:
        return "ext4"  # ext2/3/4 share the magic; debugfs writes all three
    if head[510:512] == b"\x55\xaa" and any(head[at:at + 8] == magic for at, magic in _FAT_TYPES_AT):
        return "fat"
    return ""


def grow_partition(image: Path, table: PartitionTable, partition: Partition, new_image_size: int) -> Partition:
    """Grow the image file and its last partition to fill it (the file system is grown separately)."""
    if any(p.start > partition.start for p in table.partitions):
        raise PackagerError(f"{image.name}: partition {partition.number} is not the last one, so it cannot grow")
    with open(image, "r+b") as f:
        f.truncate(new_image_size)
    if table.label == "gpt":  # the backup GPT header must move to the new end first
        _run(["sfdisk", "--no-reread", "--relocate", "gpt-bak-std", str(image)], f"{image.name}: moving the GPT")
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(partition.number), str(image)],
         f"{image.name}: growing partition {partition.number}", stdin=", +\n")
    grown = next(p for p in read_partitions(image).partitions if p.number == partition.number)
    return grown


class Ext4:
    """One ext4 partition of an image, through debugfs. Paths are absolute paths inside the file system."""

    def __init__(self, image: Path, partition: Partition) -> None:
        self.image = image
        self.partition = partition
        self.device = f"{image}?offset={partition.start}"

    def free_bytes(self) -> int:
        fields = self._superblock()
        return int(fields["Free blocks"]) * int(fields["Block size"])

    def grow(self, scratch: Path) -> None:
        """Grow the file system to fill its (already grown) partition. resize2fs cannot do this in place with an
        offset: it truncates a regular file to the file system's new size, not counting the offset, which would cut
        off the image's end. So the partition is copied out, resized as a file of its own and copied back."""
        alone = scratch / "root.ext4"
        with open(self.image, "rb") as image, open(alone, "wb") as out:
            image.seek(self.partition.start)
            left = self.partition.size
            while left:
                chunk = image.read(min(_CHUNK, left))
                if not chunk:
                    raise PackagerError(f"{self.image.name}: partition {self.partition.number} ends past the image")
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), 1)  # a hole reads back as zeros
                else:
                    out.write(chunk)
                left -= len(chunk)
            out.truncate(self.partition.size)
        _run(["e2fsck", "-fp", str(alone)], f"{self.image.name}: checking ext4 before growing it",
             ok=(0, 1))  # 1: e2fsck fixed something harmless (an image saved without a clean unmount)
        _run(["resize2fs", str(alone)], f"{self.image.name}: growing ext4")
        with open(alone, "rb") as source, open(self.image, "r+b") as image:
            image.seek(self.partition.start)
            while chunk := source.read(_CHUNK):
                image.write(chunk)
        alone.unlink()

    def check(self) -> None:
        """e2fsck, read-only and forced: a clean file system or an error."""
        _run(["e2fsck", "-fn", self.device], f"{self.image.name}: checking the ext4 file system")

    def exists(self, path: str) -> bool:
        done = subprocess.run([_which("debugfs") or "debugfs", "-R", f"stat {_quote(path)}", self.device],
                              capture_output=True, text=True)
        return "File not found" not in done.stderr and done.returncode == 0 and "Inode:" in done.stdout

    def read(self, path: str) -> bytes:
        done = subprocess.run([_which("debugfs") or "debugfs", "-R", f"cat {_quote(path)}", self.device],
                              capture_output=True)
        if b"File not found" in done.stderr or done.returncode != 0:
            raise PackagerError(f"{self.image.name}: {path} is not in the ext4 file system")
        return done.stdout

    def run(self, commands: list[str], what: str) -> None:
        """debugfs -w with these commands; any message but its banner and inode allocations is an error
        (debugfs exits 0 even when a command fails)."""
        script = "\n".join(commands) + "\n"
        done = _run(["debugfs", "-w", "-f", "-", self.device], what, stdin=script)
        errors = [line for line in done.stderr.splitlines()
                  if line.strip() and not line.startswith(("debugfs ", "Allocated inode"))]
        if errors:
            raise PackagerError(f"{what}: debugfs: {errors[0].strip()}")

    def dump(self, path: str, destination: Path) -> None:
        """Copy a directory tree out (rdump keeps modes and symlinks), to read back what was written."""
        _run(["debugfs", "-R", f"rdump {_quote(path)} {_quote(str(destination))}", self.device],
             f"{self.image.name}: reading {path} back")

    def _superblock(self) -> dict[str, str]:
        done = _run(["dumpe2fs", "-h", self.device], f"{self.image.name}: reading the ext4 superblock")
        return {key.strip(): value.strip() for key, _, value in
                (line.partition(":") for line in done.stdout.splitlines()) if value}


class Fat:
    """One FAT partition of an image, through mtools. Paths are absolute ('/ssh')."""

    def __init__(self, image: Path, partition: Partition) -> None:
        self.image = image
        self.target = f"{image}@@{partition.start}"

    def write(self, path: str, data: bytes, scratch: Path) -> None:
        local = scratch / "fat-file"
        local.write_bytes(data)
        _run(["mcopy", "-o", "-i", self.target, str(local), "::" + path], f"{self.image.name}: writing {path} (FAT)")

    def read(self, path: str) -> bytes:
        tool = _which("mcopy") or "mcopy"
        done = subprocess.run([tool, "-n", "-i", self.target, "::" + path, "-"], capture_output=True)
        if done.returncode != 0:
            raise PackagerError(f"{self.image.name}: {path} is not in the FAT file system")
        return done.stdout


def _quote(path: str) -> str:
    """debugfs splits its command lines on blanks and takes double quotes around one argument."""
    if any(ch in path for ch in '"\n\r'):
        raise PackagerError(f"path {path!r}: quotes and line breaks cannot be written to the image")
    return f'"{path}"' if " " in path else path


def parents(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (the directories above a path, outermost first)."""
    return [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "/"]
