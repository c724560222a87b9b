"""Board profiles: data files under boards/, parsed into typed objects at the border.

`host_profile()` describes the machine we run on, for builds that name no board.
"""

from __future__ import annotations

import platform
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the same parser, as a package
    import tomli as tomllib

from . import hardware
from .errors import EdgepackError
from .schema import Strict, convert

HOST = "host"


class CoreCluster(Strict):
    kind: Literal["performance", "efficiency"]
    model: str
    count: Annotated[int, msgspec.Meta(ge=1)]
    max_mhz: Annotated[int, msgspec.Meta(ge=1)] | None = None


class BuildTarget(Strict):
    """What a runtime build for the board targets (`edgepack wheels`); docs/boards.md gives each value's source."""

    target: str  # the GNU triple, e.g. aarch64-linux-gnu
    march: str  # -march (for ARM llama.cpp's GGML_CPU_ARM_ARCH), e.g. armv8.2-a+dotprod+fp16
    python: Annotated[str, msgspec.Meta(pattern=r"^3\.[0-9]+$")]  # the board OS's python3
    glibc: Annotated[str, msgspec.Meta(pattern=r"^2\.[0-9]+$")]  # the board OS's C library (the wheel's floor)
    mtune: str | None = None
    cuda_architectures: str | None = None  # CMAKE_CUDA_ARCHITECTURES of a GPU build (made on the device)


class BoardProfile(Strict):
    name: str
    description: str
    arch: str
    cpu: str
    simd: tuple[str, ...]
    memory_gib: Annotated[float, msgspec.Meta(gt=0)]
    default_quant: str
    n_ctx: Annotated[int, msgspec.Meta(ge=16)]
    cores: Annotated[tuple[CoreCluster, ...], msgspec.Meta(min_length=1)]
    threads: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: physical cores of the device
    gpu: str | None = None
    gpu_layers: int = 0  # layers serve offloads to the GPU in a build that can (-1: all; the Jetson's memory is shared)
    build: BuildTarget | None = None  # None: this machine (the host profile)
    embed_runtime: Literal["onnx", "tflite"] = "onnx"  # what serve runs an encoder that has both on (docs/boards.md)

    @property
    def core_summary(self) -> str:
        return " + ".join(f"{c.count}x {c.model} ({c.kind[0].upper()})" for c in self.cores)


def _boards_dir() -> Path:
    return Path(str(resources.files("edgepack.boards")))


def list_boards() -> list[BoardProfile]:
    return [parse_profile(path) for path in sorted(_boards_dir().glob("*.toml"))]


def load_board(name: str) -> BoardProfile:
    if name == HOST:
        return host_profile()
    path = _boards_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join([HOST] + [p.stem for p in sorted(_boards_dir().glob("*.toml"))])
        raise EdgepackError(f"unknown board {name!r}: known boards are {known}")
    return parse_profile(path)


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
        cores=(CoreCluster(kind="performance", model="physical core", count=cores),),
    )


def parse_profile(path: Path) -> BoardProfile:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgepackError(f"{path}: not a valid board profile ({exc})") from None
    return convert(doc, BoardProfile, str(path))


def known_board(name: str) -> BoardProfile | None:
    """The profile of the board a bundle was built for, when this install knows it (None for host)."""
    if not name or name == HOST:
        return None
    try:
        return load_board(name)
    except EdgepackError:
        return None


def board_memory_gib(name: str) -> float | None:
    board = known_board(name)
    return board.memory_gib if board else None
