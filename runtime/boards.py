"""Board profiles: data files under boards/, parsed into typed objects at the border.

`host_profile()` describes the machine we run on, for builds that name no board.
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import hardware
from .errors import EdgepackError

HOST = "host"


@dataclass(frozen=True)
class CoreCluster:
    kind: str  # "performance" or "efficiency"
    model: str
    count: int
    max_mhz: int | None


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    arch: str
    cpu: str
    simd: tuple[str, ...]
    memory_gib: float
    default_quant: str
    threads: int | None
    n_ctx: int
    cores: tuple[CoreCluster, ...]
    gpu: str | None = None

    @property
    def core_summary(self) -> str:
        return " + ".join(f"{c.count}x {c.model} ({c.kind[0].upper()})" for c in self.cores)


def _boards_dir() -> Path:
    return Path(str(resources.files("edgepack.boards")))


def list_boards() -> list[BoardProfile]:
    return [_parse(path) for path in sorted(_boards_dir().glob("*.toml"))]


def load_board(name: str) -> BoardProfile:
    if name == HOST:
        return host_profile()
    path = _boards_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join([HOST] + [p.stem for p in sorted(_boards_dir().glob("*.toml"))])
        raise EdgepackError(f"unknown board {name!r}: known boards are {known}")
    return _parse(path)


def host_profile() -> BoardProfile:
    """The generic profile of this machine: what `--board` defaults to."""
    cores = hardware.default_threads()
    return BoardProfile(
        name=HOST,
        description="this machine (generic profile)",
        arch=platform.machine(),
        cpu=platform.processor() or platform.machine(),
        simd=tuple(hardware.simd_features()),
        memory_gib=round(hardware.total_memory_bytes() / 2**30, 1),
        default_quant="Q4_K_M",
        threads=None,
        n_ctx=4096,
        cores=(CoreCluster("performance", "physical core", cores, None),),
    )


def _parse(path: Path) -> BoardProfile:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdgepackError(f"{path}: not a valid board profile ({exc})") from None

    def need(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EdgepackError(f"{path}: {where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    clusters = doc.get("cores")
    if not isinstance(clusters, list) or not clusters:
        raise EdgepackError(f"{path}: cores: expected at least one [[cores]] table")
    cores = tuple(
        CoreCluster(
            kind=need(c, "kind", str, f"cores[{i}]."),
            model=need(c, "model", str, f"cores[{i}]."),
            count=need(c, "count", int, f"cores[{i}]."),
            max_mhz=c.get("max_mhz"),
        )
        for i, c in enumerate(clusters)
    )
    threads = doc.get("threads")
    if threads is not None:
        threads = need(doc, "threads", int)
    return BoardProfile(
        name=need(doc, "name", str),
        description=need(doc, "description", str),
        arch=need(doc, "arch", str),
        cpu=need(doc, "cpu", str),
        simd=tuple(need(doc, "simd", list)),
        memory_gib=need(doc, "memory_gib", (int, float)),
        default_quant=need(doc, "default_quant", str),
        threads=threads,
        n_ctx=need(doc, "n_ctx", int),
        cores=cores,
        gpu=doc.get("gpu"),
    )


def board_memory_gib(name: str) -> float | None:
    """The memory of the board a bundle was built for, when this install knows the board (None for host)."""
    if not name or name == HOST:
        return None
    try:
        return load_board(name).memory_gib
    except EdgepackError:
        return None
