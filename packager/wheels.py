"""edgepack wheels: a wheelhouse that installs the device runtime on a board offline, with no compiler there.

llama-cpp-python (llama.cpp inside) is cross-compiled for the board's CPU by native/build-board-wheel.sh with zig,
checked (ELF machine, libraries and glibc symbol versions it needs) and tagged manylinux_2_X for the board's pip;
the other dependencies are binary wheels fetched for the board's platform and Python, and edgepack is built as a
wheel. Cross-built wheels are cached by everything that goes into them, so a second call takes seconds.
"""

from __future__ import annotations

import email
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgepack.runtime.boards import BoardProfile, BuildTarget, load_board
from edgepack.runtime.files import sha256_file

from .errors import PackagerError
from .llama_source import cache_dir, last_line, llama_cpp_version, sdist

RECORD = "edgepack-wheels.json"
SCRIPT = Path(__file__).resolve().parents[1] / "native" / "build-board-wheel.sh"
JETSON_RECIPE = Path(__file__).resolve().parents[1] / "native" / "build-jetson-cuda-wheel.sh"
ELF_MACHINES = {"aarch64": "EM_AARCH64", "x86_64": "EM_X86_64"}
# What every glibc system has; anything else a library needs must ship inside the wheel.
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                    "ld-linux-aarch64.so.1", "ld-linux-x86-64.so.2"}
MANYLINUX_FLOOR = 17  # manylinux2014, the oldest glibc pip's aarch64 tags know
# The glibc zig links against, whatever the board: the oldest of the OSes boards run (JetPack 5 / Ubuntu 20.04,
# Debian 11), so one build serves them all; the wheel's tag then says what its libraries really need.
GLIBC_FLOOR = "2.31"


@dataclass(frozen=True)
class BuiltWheel:
    path: Path
    glibc_needed: str  # the newest GLIBC_x.y symbol version its libraries use
    inputs: dict[str, str]  # what went into it; the cache key is their digest
    build_seconds: float | None  # None: taken from the cache


def zig() -> tuple[Path, str]:
    """The zig compiler of PyPI's ziglang package and its version."""
    try:
        import ziglang
    except ImportError:
        raise PackagerError("edgepack wheels needs zig: pip install 'edgepack[host]' (the ziglang package)") from None
    binary = Path(ziglang.__file__).parent / "zig"
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=True).stdout.strip()
    return binary, version


def zig_cpu(build: BuildTarget) -> str:
    """zig's -mcpu for the board: the core named by -mtune, else the -march level (x86-64-v3); zig spells them
    cortex_a76 and x86_64_v3 and has no -march: the exact core implies its ISA and extensions (tests check they
    equal the profile's)."""
    return (build.mtune or build.march).replace("-", "_")


def build_target(board: BoardProfile) -> BuildTarget:
    if board.build is None:
        raise PackagerError(f"board {board.name} has no [build] target: edgepack wheels builds for "
                            "rpi4, rpi5 and jetson-orin-nano (see `edgepack boards`)")
    return board.build


def llama_wheel(board: BoardProfile, *, jobs: int = 2, log=None) -> BuiltWheel:  # noqa: ANN001 - a text stream
    """The cross-built llama-cpp-python wheel for `board`, from the cache or built now."""
    build = build_target(board)
    zig_binary, zig_version = zig()
    source = sdist()
    inputs = {
        "llama_cpp_python": llama_cpp_version(),
        "sdist_sha256": sha256_file(source),
        "llama_cpp_commit": llama_cpp_commit(source),
        "compiler": f"zig {zig_version}",
        "target": f"{build.target}.{GLIBC_FLOOR}",
        "cflags": f"-mcpu={zig_cpu(build)}",
        "recipe_sha256": sha256_file(SCRIPT),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / "board-wheels" / key
    if (cached / "inputs.json").is_file():
        wheel = next(cached.glob("*.whl"))
        return BuiltWheel(wheel, json.loads((cached / "inputs.json").read_text())["glibc_needed"], inputs, None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as work:
        out = Path(work) / "out"
        env = {**os.environ, "SDIST": str(source), "ZIG": str(zig_binary), "TARGET": build.target,
               "GLIBC": GLIBC_FLOOR, "MCPU": zig_cpu(build), "OUT": str(out), "PYTHON": sys.executable,
               "JOBS": str(jobs)}
        started = time.monotonic()
        done = subprocess.run(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=log or subprocess.PIPE,
                              text=True)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise PackagerError(f"cross-building llama-cpp-python for {board.name} failed: "
                                f"{last_line(done.stderr or '(see the log above)')}")
        built = next(out.glob("*.whl"))
        glibc_needed = check_libraries(built, board)
        tagged = retag(built, platform_tag(build.target, glibc_needed))
        staged = Path(work) / "cache"
        staged.mkdir()
        tagged.rename(staged / tagged.name)
        (staged / "inputs.json").write_text(json.dumps({**inputs, "glibc_needed": glibc_needed}, indent=2))
        staged.rename(cached)  # atomic: a cache entry is whole or absent
    return BuiltWheel(next(cached.glob("*.whl")), glibc_needed, inputs, seconds)


def llama_cpp_commit(source: Path) -> str:
    """The llama.cpp commit the sdist vendors: its git submodule's HEAD, which the sdist carries."""
    name = f"llama_cpp_python-{llama_cpp_version()}/.git/modules/vendor/llama.cpp/HEAD"
    with tarfile.open(source) as archive:
        try:
            head = archive.extractfile(name)
        except KeyError:
            return "unknown"
        text = head.read().decode().strip() if head else ""
    return text if re.fullmatch(r"[0-9a-f]{40}", text) else "unknown"


def check_libraries(wheel: Path, board: BoardProfile) -> str:
    """Check every shared library in `wheel` is for the board's CPU and needs only what the board's OS has (its
    glibc version or older, and the C library's own .so files); return the newest GLIBC symbol version needed."""
    build = build_target(board)
    machine = ELF_MACHINES[build.target.split("-")[0]]
    newest = (2, MANYLINUX_FLOOR)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        shipped = {Path(n).name for n in names}
        for name in names:
            with archive.open(name) as raw, tempfile.TemporaryFile() as copy:
                shutil.copyfileobj(raw, copy)
                elf = ELFFile(copy)
                if elf["e_machine"] != machine:
                    raise PackagerError(f"{wheel.name}: {name} is built for {elf['e_machine']}, not {machine}")
                for needed in _needed(elf):
                    if needed not in shipped and needed not in SYSTEM_LIBRARIES:
                        raise PackagerError(f"{wheel.name}: {name} needs {needed}, which a board may not have")
                for version in _glibc_versions(elf):
                    newest = max(newest, version)
    if newest > tuple(int(p) for p in build.glibc.split(".")):
        raise PackagerError(f"{wheel.name}: needs glibc {newest[0]}.{newest[1]}; {board.name}'s OS has {build.glibc}")
    return f"{newest[0]}.{newest[1]}"


def _needed(elf: ELFFile) -> list[str]:
    dynamic = elf.get_section_by_name(".dynamic")
    return [tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"] if dynamic else []


def _glibc_versions(elf: ELFFile) -> list[tuple[int, int]]:
    section = elf.get_section_by_name(".gnu.version_r")
    if section is None:
        return []
    found = []
    for _, auxiliaries in section.iter_versions():
        for aux in auxiliaries:
            match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", aux.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2))))
    return found


def platform_tag(target: str, glibc: str) -> str:
    return f"manylinux_{glibc.replace('.', '_')}_{target.split('-')[0]}"


def retag(wheel: Path, tag: str) -> Path:
    """The wheel renamed and its WHEEL metadata rewritten for `tag` (pypa's `wheel tags`, which fixes RECORD)."""
    done = subprocess.run([sys.executable, "-m", "wheel", "tags", "--platform-tag", tag, "--remove", str(wheel)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PackagerError(f"could not tag {wheel.name} as {tag}: {last_line(done.stderr)}")
    return wheel.parent / done.stdout.strip().splitlines()[-1]


def platform_tags(target: str, glibc: str) -> list[str]:
    """What pip on a board with this glibc accepts: every manylinux_2_Y up to it (pip download takes them as a
    list: it does not widen one --platform by itself)."""
    arch = target.split("-")[0]
    top = int(glibc.split(".")[1])
    return [f"manylinux_2_{minor}_{arch}" for minor in range(top, MANYLINUX_FLOOR - 1, -1)] + [f"manylinux2014_{arch}"]


def project_root() -> Path:
    """edgepack's source tree, which its own wheel is built from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise PackagerError("edgepack wheels builds edgepack's own wheel from its source tree: install edgepack "
                            "from a checkout (pip install -e .)")
    return root


def fetch_dependencies(out: Path, board: BoardProfile, python: str) -> None:
    """Put edgepack's wheel and, for the board's platform and Python, binary wheels of everything it needs into
    `out` (which already holds the cross-built llama-cpp-python).

    pip resolves the set, but it evaluates environment markers for this interpreter, not the board's (pip
    download --python-version does not apply to them): a board on Python 3.10 needs tomli and exceptiongroup,
    which a 3.11 laptop's pip leaves out. So the wheels' own requirements are then read back, their markers
    evaluated for the board, and whatever is missing is fetched, until nothing is: an offline install from `out`
    is complete."""
    build = build_target(board)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(project_root())],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PackagerError(f"could not build edgepack's wheel: {last_line(done.stderr)}")
    # pip itself: a board whose python3 lacks ensurepip (Ubuntu without python3-venv) makes the venv --without-pip
    # and runs pip from its wheel (`edgepack flash`'s first boot does)
    wanted = [f"edgepack=={importlib.metadata.version('edgepack')}", "pip"]
    environment = board_environment(build, python)
    while wanted:
        _download(out, board, python, wanted)
        wanted = missing_requirements(out, environment)


def _download(out: Path, board: BoardProfile, python: str, requirements: list[str]) -> None:
    build = build_target(board)
    abi = "cp" + python.replace(".", "")
    platforms = [arg for tag in platform_tags(build.target, build.glibc) for arg in ("--platform", tag)]
    pip = [sys.executable, "-m", "pip", "download", "--only-binary", ":all:", *platforms, "--python-version", python,
           "--implementation", "cp", "--abi", abi, "--find-links", str(out), "-d", str(out), *requirements]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0:
        raise PackagerError(f"could not fetch the runtime's wheels for {board.name} (Python {python}): "
                            f"{last_line(done.stderr)}")


def board_environment(build: BuildTarget, python: str) -> dict[str, str]:
    """PEP 508 marker values of the board's CPython (what its pip would evaluate)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_machine": build.target.split("-")[0],
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_release": "",
            "platform_version": "", "implementation_version": f"{python}.0", "extra": ""}


def missing_requirements(out: Path, environment: dict[str, str]) -> list[str]:
    """Requirements of the wheels in `out` that apply on the board and that no wheel in `out` provides."""
    present = {}
    requires: list[Requirement] = []
    for wheel in out.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.message_from_bytes(archive.read(name))
        present[canonicalize_name(metadata["Name"])] = metadata["Version"]
        requires += [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    missing = []
    for requirement in requires:
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name not in present and str(requirement) not in missing:
            missing.append(str(requirement.name) + str(requirement.specifier))
    return sorted(set(missing))


def build_wheelhouse(board_name: str, out: Path, python: str | None = None, *, jobs: int = 2,
                     log=None) -> dict:  # noqa: ANN001 - a text stream
    """Write the wheelhouse for `board_name` into `out` and return its record (also written as RECORD there)."""
    board = load_board(board_name)
    build = build_target(board)
    python = python or build.python
    if not re.fullmatch(r"3\.(1[0-9]|[0-9])", python) or int(python.split(".")[1]) < 10:
        raise PackagerError(f"--python {python}: the runtime supports Python 3.10 or newer (e.g. 3.11)")
    if out.exists() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise PackagerError(f"{out}: not empty and not a wheelhouse (no {RECORD}): name a new or empty folder")
    llama = llama_wheel(board, jobs=jobs, log=log)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()  # an earlier build's (another board's, another Python's) must not be picked by pip
    shutil.copy2(llama.path, out / llama.path.name)
    fetch_dependencies(out, board, python)
    if build.cuda_architectures:
        _add_cuda_recipe(out)
    wheels = sorted(out.glob("*.whl"))
    record = {
        "board": board.name,
        "python": python,
        "platform": platform_tag(build.target, llama.glibc_needed),
        "glibc_needed": llama.glibc_needed,
        "board_glibc": build.glibc,
        "llama_cpp": llama.inputs | {"cmake": _cmake_flags()},
        "cuda": ({"architectures": build.cuda_architectures, "recipe": "jetson-cuda/build-jetson-cuda-wheel.sh"}
                 if build.cuda_architectures else None),
        "build_seconds": round(llama.build_seconds, 1) if llama.build_seconds is not None else None,
        "wheels": [{"file": w.name, "size": w.stat().st_size, "sha256": sha256_file(w)} for w in wheels],
        "size": sum(w.stat().st_size for w in wheels),
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _cmake_flags() -> str:
    """The cmake switches the recipe sets, read from the recipe itself so the record cannot drift from it."""
    text = SCRIPT.read_text()
    return " ".join(re.findall(r"-D(?!CMAKE_TOOLCHAIN_FILE)[A-Z_]+=\w+", text))


def _add_cuda_recipe(out: Path) -> None:
    """The Jetson's CUDA build happens on the Jetson (no CUDA cross compiler here): ship its recipe and the sdist
    in a subfolder, where pip's --find-links does not look."""
    folder = out / "jetson-cuda"
    folder.mkdir(exist_ok=True)
    shutil.copy2(JETSON_RECIPE, folder / JETSON_RECIPE.name)
    shutil.copy2(sdist(), folder / sdist().name)


def summary(record: dict) -> list[str]:
    lines = [f"wheelhouse for {record['board']} (Python {record['python']}, {record['platform']}): "
             f"{len(record['wheels'])} wheels, {record['size'] / 2**20:.1f} MiB"]
    llama = record["llama_cpp"]
    built = (f"built in {record['build_seconds']:.0f} s" if record["build_seconds"] is not None
             else "from the cache")
    lines.append(f"llama-cpp-python {llama['llama_cpp_python']} (llama.cpp {llama['llama_cpp_commit']}), "
                 f"{llama['compiler']} {llama['cflags']} for {llama['target']}, {built}")
    if record["cuda"]:
        lines.append(f"CUDA (sm_{record['cuda']['architectures']}): build it on the board with "
                     f"{record['cuda']['recipe']} (docs/boards.md)")
    lines.append("on the board: pip install --no-index --find-links DIR edgepack")
    return lines
