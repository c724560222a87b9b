"""A release's local.json: what `edgepack tune` measured on this device and `serve` starts from.

It sits next to the release's manifest (DIR/releases/<id>/local.json), so it follows a rollback and a new
release starts from the defaults again. Read and written here only; docs/tuning.md describes the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import EdgepackError
from .files import replace_atomically
from .schema import SchemaError, Strict, decode_json
from .store import Store

LOCAL_CONFIG = "local.json"
LOCAL_CONFIG_FORMAT = 1
MAX_LOCAL_CONFIG_BYTES = 1 << 20
# n_batch never below the most slots: the scheduler puts one token of every generating slot in a batch.
LIMITS = {"threads": (1, 1024), "slots": (1, 64), "n_batch": (64, 16384), "threads_batch": (1, 1024)}  # flags too
_HINT = "delete it or re-run `edgepack tune`"


_Threads = Annotated[int, msgspec.Meta(ge=LIMITS["threads"][0], le=LIMITS["threads"][1])]
_Slots = Annotated[int, msgspec.Meta(ge=LIMITS["slots"][0], le=LIMITS["slots"][1])]
_Batch = Annotated[int, msgspec.Meta(ge=LIMITS["n_batch"][0], le=LIMITS["n_batch"][1])]


class LocalConfig(Strict):
    """local.json's schema: the tuned settings (any subset) and what was measured to choose them."""

    format: Literal[1] = LOCAL_CONFIG_FORMAT
    threads: _Threads | None = None
    slots: _Slots | None = None
    n_batch: _Batch | None = None
    threads_batch: _Threads | None = None
    measured: dict[str, Any] = {}


def local_config_path(store: Store, release_id: str | None = None) -> Path:
    """DIR/releases/<id>/local.json of the given release (default: the current one)."""
    release = release_id or store.release_id("current")
    if release is None:
        raise EdgepackError(f"store {store.root}: no current release (run `edgepack install` first)")
    release_dir = store.releases / release
    if not release_dir.is_dir():
        raise EdgepackError(f"store {store.root}: release {release} does not exist")
    return release_dir / LOCAL_CONFIG


def read_local_config(store: Store, release_id: str | None = None) -> dict[str, int]:
    """The tuned {"threads", "slots", "n_batch"} (any subset) of a release; {} when it has no local.json.

    Anything else in the file's place (a link, garbage, wrong types or ranges) is refused, never ignored."""
    path = local_config_path(store, release_id)
    data = _read_regular_file(path)
    return {} if data is None else parse_local_config(data, str(path))


def parse_local_config(data: bytes, where: str) -> dict[str, int]:
    """The settings a local.json sets, validated by its schema (LocalConfig)."""
    try:
        config = decode_json(data, LocalConfig, where)
    except SchemaError as exc:
        raise EdgepackError(f"{exc}; {_HINT}") from None
    return {key: value for key in LIMITS if (value := getattr(config, key)) is not None}


def write_local_config(store: Store, values: dict[str, int], results: list[dict[str, Any]], *,
                       release_id: str | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Atomically replace the release's local.json with `values`, recording what was measured and where."""
    path = local_config_path(store, release_id)
    doc: dict[str, Any] = {"format": LOCAL_CONFIG_FORMAT, **{k: values[k] for k in LIMITS if k in values}}
    doc["measured"] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "allowed_cpus": len(os.sched_getaffinity(0)),
        "llama_cpp": _llama_version(),
        **(settings or {}),
        "results": results,
    }
    data = (json.dumps(doc, indent=2) + "\n").encode()
    parse_local_config(data, str(path))  # never write what read_local_config would refuse
    try:
        replace_atomically(path, data)
    except OSError as exc:
        raise EdgepackError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def check_writable(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise EdgepackError(f"{path}: cannot write: is a directory (delete it)")
    if not os.access(path.parent, os.W_OK):
        raise EdgepackError(f"{path}: cannot write: {path.parent} is not writable")


def _read_regular_file(path: Path) -> bytes | None:
    """The bytes of a plain file (no link followed, size capped), or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EdgepackError(f"{path}: is a symbolic link, refused; {_HINT}") from None
        raise EdgepackError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EdgepackError(f"{path}: not a regular file, refused; {_HINT}")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_LOCAL_CONFIG_BYTES + 1)
    if len(data) > MAX_LOCAL_CONFIG_BYTES:
        raise EdgepackError(f"{path}: larger than {MAX_LOCAL_CONFIG_BYTES} bytes, refused; {_HINT}")
    return data


def _llama_version() -> str:
    from .llama import version

    return version()
