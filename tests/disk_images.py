"""Synthetic disk images with the partition roles of Raspberry Pi OS (MBR: FAT32 bootfs, then the ext4 rootfs) and
of the Jetson SD image (GPT, the ext4 root named APP last), made with sfdisk, mkfs.vfat and mkfs.ext4 in files (no
root). Used by tests/packager/test_flash.py and bench/bench_heal.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

MiB = 1 << 20
BOOT_START = 8192  # Raspberry Pi OS: bootfs from 4 MiB


def tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def run_tool(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([tool(args[0]), *args[1:]], input=stdin, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr}")
    return done.stdout


def _os_tree(where: Path) -> Path:
    """The slice of a Debian root file system that first boot touches."""
    etc = where / "etc"
    (etc / "systemd/system/multi-user.target.wants").mkdir(parents=True)
    for folder in ("var/lib", "opt", "home"):
        (where / folder).mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    (etc / "hostname").write_text("raspberrypi\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost\n127.0.1.1\traspberrypi\n")
    return where


def make_pi_image(path: Path, root_mib: int, boot_mib: int = 64, filler: Path | None = None) -> int:
    """A Raspberry Pi OS-shaped image (`filler`: a file put in the root, standing for the OS's own files); returns
    the root partition's byte offset."""
    boot_sectors = boot_mib * 2048
    root_start = BOOT_START + boot_sectors
    size = root_start * 512 + root_mib * MiB
    with open(path, "wb") as f:
        f.truncate(size)
    table = f"label: dos\nunit: sectors\n{BOOT_START},{boot_sectors},c\n{root_start},,83\n"
    run_tool("sfdisk", "-q", str(path), stdin=table)
    run_tool("mkfs.vfat", "-F", "32", "-n", "BOOTFS", "--offset", str(BOOT_START), str(path), str(boot_sectors // 2))
    tree = _os_tree(path.parent / f"{path.name}.tree")
    if filler is not None:
        shutil.copy(filler, tree / "usr-standin")
    run_tool("mkfs.ext4", "-q", "-b", "4096", "-L", "rootfs", "-d", str(tree),
             "-E", f"offset={root_start * 512}", str(path), str(root_mib * MiB // 4096))
    return root_start * 512


def make_jetson_image(path: Path, root_mib: int) -> int:
    """A Jetson SD image's shape: GPT, small raw partitions first, the ext4 root named APP last."""
    root_start = 2048 + 3 * 2048
    with open(path, "wb") as f:
        f.truncate(root_start * 512 + root_mib * MiB + MiB)
    linux = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    rows = [(2048 + i * 2048, 2048, name) for i, name in enumerate(("mb1", "cpu-bootloader", "esp"))]
    rows.append((root_start, root_mib * 2048, "APP"))
    table = "label: gpt\nunit: sectors\n" + "".join(
        f"start={start}, size={size}, type={linux}, name={name}\n" for start, size, name in rows)
    run_tool("sfdisk", "-q", str(path), stdin=table)
    run_tool("mkfs.ext4", "-q", "-b", "4096", "-L", "APP", "-d", str(_os_tree(path.parent / f"{path.name}.tree")),
             "-E", f"offset={root_start * 512}", str(path), str(root_mib * MiB // 4096))
    return root_start * 512


