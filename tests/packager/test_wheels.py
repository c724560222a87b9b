"""edgepack wheels, the fast part: zig's flags give each board exactly its SIMD, the libraries' check refuses what a
board cannot load (another CPU, a library the board may lack, a glibc newer than its OS's), the platform tags and
the retagged wheel pip accepts, and the command's one-line refusals. The cross-build itself and the emulated board
are tests/test_emulated_board.py (slow)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest

from edgepack.packager import wheels
from edgepack.packager.errors import PackagerError
from edgepack.runtime.boards import list_boards, load_board

pytest.importorskip("ziglang", reason="edgepack wheels compiles with zig: pip install 'edgepack[host]'")
ARM_BOARDS = sorted(b.name for b in list_boards() if b.arch == "aarch64")
# What each SIMD name of a profile makes the compiler define (ACLE feature macros).
ACLE = {"neon": "__ARM_NEON", "dotprod": "__ARM_FEATURE_DOTPROD", "fp16": "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC",
        "i8mm": "__ARM_FEATURE_MATMUL_INT8", "sve": "__ARM_FEATURE_SVE"}


def zig_cc(*args: str) -> subprocess.CompletedProcess:
    zig, _ = wheels.zig()
    return subprocess.run([str(zig), "cc", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ARM_BOARDS)
def test_zigs_cpu_for_the_board_enables_exactly_its_simd(name):
    board = load_board(name)
    done = zig_cc("-target", f"{board.build.target}.{wheels.GLIBC_FLOOR}", f"-mcpu={wheels.zig_cpu(board.build)}",
                  "-dM", "-E", "-x", "c", "/dev/null")
    assert done.returncode == 0, done.stderr
    defined = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    assert {simd for simd, macro in ACLE.items() if macro in defined} == set(board.simd)


def library(tmp_path: Path, name: str, source: str, target: str, *link: str) -> Path:
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    out = tmp_path / name
    done = zig_cc("-target", target, "-shared", "-fPIC", "-o", str(out), str(c), *link)
    assert done.returncode == 0, done.stderr
    return out


def wheel_of(tmp_path: Path, *libraries: Path) -> Path:
    path = tmp_path / "demo-1.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for lib in libraries:
            archive.write(lib, f"demo/lib/{lib.name}")
    return path


PLAIN = "#include <string.h>\nsize_t f(const char *s) { return strlen(s); }\n"
# pthread_create is versioned GLIBC_2.34 in the glibc that moved libpthread into libc; strlcpy appeared in 2.38.
THREADS = "#include <pthread.h>\nint f(pthread_t *t, void *(*g)(void *)) { return pthread_create(t, 0, g, 0); }\n"
STRLCPY = "#include <string.h>\nsize_t f(char *d, const char *s) { return strlcpy(d, s, 4); }\n"
CALLER = "#include <stddef.h>\nsize_t f(char *d, const char *s);\nsize_t g(char *d) { return f(d, \"x\"); }\n"


def readelf_glibc(*libraries: Path) -> str:
    """The newest GLIBC_x.y binutils' readelf lists among the libraries' needed versions (the independent view)."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf not found (Debian package binutils)")
    text = subprocess.run(["readelf", "-V", *map(str, libraries)], capture_output=True, text=True, check=True).stdout
    return max(set(re.findall(r"Name: GLIBC_(2\.\d+)", text)), key=lambda v: int(v.split(".")[1]))


def test_a_library_needing_only_the_c_library_passes_with_the_glibc_it_really_needs(tmp_path):
    rpi5 = load_board("rpi5")
    plain = library(tmp_path, "libplain.so", PLAIN, "aarch64-linux-gnu.2.31")
    threads = library(tmp_path, "libthreads.so", THREADS, "aarch64-linux-gnu.2.36")
    assert wheels.check_libraries(wheel_of(tmp_path, plain), rpi5) == readelf_glibc(plain)
    assert wheels.check_libraries(wheel_of(tmp_path, plain, threads), rpi5) == readelf_glibc(plain, threads)


def test_libraries_a_board_cannot_load_are_refused_by_name(tmp_path):
    rpi5 = load_board("rpi5")
    x86 = library(tmp_path, "libx86.so", PLAIN, "x86_64-linux-gnu.2.31")
    with pytest.raises(PackagerError, match="libx86.so is built for EM_X86_64, not EM_AARCH64"):
        wheels.check_libraries(wheel_of(tmp_path, x86), rpi5)
    newer = library(tmp_path, "libnew.so", STRLCPY, "aarch64-linux-gnu.2.38")
    with pytest.raises(PackagerError, match="needs glibc 2.38; rpi5's OS has 2.36"):
        wheels.check_libraries(wheel_of(tmp_path, newer), rpi5)
    foreign = library(tmp_path, "libforeign.so", CALLER, "aarch64-linux-gnu.2.31", f"-L{tmp_path}", "-lnew")
    with pytest.raises(PackagerError, match="libforeign.so needs libnew.so, which a board may not have"):
        wheels.check_libraries(wheel_of(tmp_path, foreign), rpi5)
    shipped = library(tmp_path, "libnew.so", STRLCPY.replace("strlcpy(d, s, 4)", "strlen(s)"), "aarch64-linux-gnu.2.31")
    assert wheels.check_libraries(wheel_of(tmp_path, foreign, shipped), rpi5) == readelf_glibc(foreign, shipped)


def test_the_retagged_wheel_carries_the_boards_platform_tag(tmp_path):
    built = wheel_of(tmp_path, library(tmp_path, "libplain.so", PLAIN, "aarch64-linux-gnu.2.31"))
    metadata = {"demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n",
                "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"}
    with zipfile.ZipFile(built, "a") as archive:  # what `wheel tags` reads and rewrites, with a valid RECORD
        for name, data in metadata.items():
            archive.writestr(name, data)
        lines = [f"{name},sha256={urlsafe_b64encode(hashlib.sha256(archive.read(name)).digest()).rstrip(b'=').decode()}"
                 f",{archive.getinfo(name).file_size}" for name in archive.namelist()]
        archive.writestr("demo-1.0.dist-info/RECORD", "\n".join([*lines, "demo-1.0.dist-info/RECORD,,"]) + "\n")
    tagged = wheels.retag(built, wheels.platform_tag("aarch64-linux-gnu", "2.17"))
    assert tagged.name == "demo-1.0-py3-none-manylinux_2_17_aarch64.whl" and not built.exists()
    with zipfile.ZipFile(tagged) as archive:
        assert "Tag: py3-none-manylinux_2_17_aarch64" in archive.read("demo-1.0.dist-info/WHEEL").decode()


def test_the_platforms_pip_downloads_for_are_every_manylinux_up_to_the_boards_glibc():
    tags = wheels.platform_tags("aarch64-linux-gnu", "2.20")
    assert tags == ["manylinux_2_20_aarch64", "manylinux_2_19_aarch64", "manylinux_2_18_aarch64",
                    "manylinux_2_17_aarch64", "manylinux2014_aarch64"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "wheels", *args], capture_output=True,
                          text=True, timeout=120)


def test_the_command_refuses_what_it_cannot_build_in_one_line(tmp_path):
    for args, message in (
        (("--board", "host"), "board host has no [build] target"),
        (("--board", "pi9"), "unknown board 'pi9'"),
        (("--board", "rpi5", "--python", "3.8"), "--python 3.8: the runtime supports Python 3.10 or newer"),
    ):
        done = cli(*args, "-o", str(tmp_path / "out"))
        assert done.returncode == 1 and done.stderr.startswith(f"Error: {message}"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    done = cli("--board", "rpi5", "-o", str(tmp_path / "mine"))
    assert done.returncode == 1 and "not empty and not a wheelhouse" in done.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
