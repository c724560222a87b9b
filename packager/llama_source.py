"""llama.cpp's own files, from the installed llama-cpp-python's sdist: the llama.cpp it was built from.

Fetched with pip once into the user cache: the sdist itself (cross builds compile it) and unpacked parts of it
(converters, chat templates). Later calls find them there. Its Python converters run here, in a child process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import click

from .errors import PackagerError

# llama.cpp's Python converters (vendor/llama.cpp/ of the sdist): both scripts share conversion/ and gguf-py
CONVERTER_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_NEEDS = ("torch", "transformers", "safetensors")  # what every converter imports (the convert extra)


def cache_dir() -> Path:
    """$EDGEPACK_CACHE, else edgepack/ in the user's cache directory."""
    if os.environ.get("EDGEPACK_CACHE"):
        return Path(os.environ["EDGEPACK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepack"


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def sdist() -> Path:
    """The installed llama-cpp-python's sdist (.tar.gz), fetched once into the cache."""
    version = llama_cpp_version()
    folder = cache_dir() / "sdist"
    target = folder / f"llama_cpp_python-{version}.tar.gz"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"- fetching the llama-cpp-python {version} sdist into {folder}", err=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        spec = f"llama-cpp-python=={version}"
        # --no-binary for this package alone: ':all:' would also build pip's isolated build tools from source
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", spec]
        done = subprocess.run([*pip, "-d", work], capture_output=True, text=True)
        found = sorted(Path(work).glob("*.tar.gz"))
        if done.returncode != 0 or not found:
            raise PackagerError(f"could not fetch the {spec} sdist with pip: {last_line(done.stderr)}")
        found[0].rename(target)  # atomic: the cache never holds half a file
    return target


def llama_cpp_files(members: tuple[str, ...], *, check: str, suffix: str = "") -> Path:
    """A folder holding `members` (paths under vendor/llama.cpp/, files or folders) of the sdist, unpacked once
    into the cache (llama-cpp-python-<version><suffix>); `check`, one of the files, tells that a copy is there."""
    target = cache_dir() / f"llama-cpp-python-{llama_cpp_version()}{suffix}"
    if (target / check).is_file():
        return target
    source = sdist()
    click.echo(f"- unpacking llama.cpp's {check} into {target}", err=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        staged = Path(work) / "files"
        _unpack(source, staged, members, check)
        try:
            staged.rename(target)  # atomic: the cache never holds half a copy
        except OSError:
            if not (target / check).is_file():  # else another process unpacked it meanwhile
                raise
    return target


def _unpack(sdist_path: Path, into: Path, members: tuple[str, ...], check: str) -> None:
    """Only `members`: the rest of the sdist is llama.cpp's and ggml's C++ sources."""
    wanted = [PurePosixPath(m).parts for m in members]
    with tarfile.open(sdist_path) as archive:
        for member in archive:
            parts = PurePosixPath(member.name).parts  # <name>-<version>/vendor/llama.cpp/<path>
            path = parts[3:]
            if (not member.isfile() or len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or ".." in parts
                    or not any(path[: len(w)] == w for w in wanted)):
                continue
            destination = into.joinpath(*path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)
    if not (into / check).is_file():
        raise PackagerError(f"{sdist_path.name}: has no vendor/llama.cpp/{check}")


def run_converter(script: str, args: list[str], subject: Path, needs: tuple[str, ...] = ()) -> None:
    """Run llama.cpp's converter `script` (one of CONVERTER_FILES) with `args`, by this interpreter in a child
    process: the model is converted by the same llama.cpp that will load it. A failure is one PackagerError that
    names `subject` and the script's last error line."""
    missing = [name for name in (*CONVERTER_NEEDS, *needs) if importlib.util.find_spec(name) is None]
    if missing:
        raise PackagerError(f"{script} needs {', '.join(missing)} in this Python: pip install 'edgepack[convert]'")
    path = llama_cpp_files(CONVERTER_FILES, check=CONVERTER_FILES[0]) / script
    # The script's own gguf-py first: it may need keys newer than the installed gguf has.
    pythonpath = os.pathsep.join(filter(None, [str(path.parent / "gguf-py"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}  # sources are local: never ask the hub
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise PackagerError(f"{subject}: llama.cpp's {script} failed: {_logged(last_line(done.stderr))}")


def _logged(line: str) -> str:
    """A converter's log line without its logging prefix ('ERROR:hf-to-gguf:Model X is not supported')."""
    level, _, rest = line.partition(":")
    if level in ("ERROR", "WARNING", "CRITICAL") and ":" in rest:
        return rest.partition(":")[2].strip()
    return line


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
