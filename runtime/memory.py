"""Memory: sizes, the serving budget, the process's own use, and what a model's context will need.

The budget is what `serve` may use in all (weights it maps, KV caches, compute buffers, Python):
`--memory-budget` (bytes or a share of the memory available at start, e.g. "70%"), else 80% of
MemAvailable plus what the process already uses; it is capped at 80% of the bundle's board memory
when the bundle names a board, and never exceeds the cgroup's memory.max (less a margin for the
page cache, which the kernel charges to the cgroup too).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import EdgepackError

MiB = 2**20
DEFAULT_SHARE = 0.8
CGROUP_SHARE = 0.9  # of memory.max: the page cache of mapped weights is charged to the cgroup too
HEADROOM = 32 * 2**20  # kept free of models: requests in flight, HTTP buffers, Python objects under load

_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'160MiB', '1.5GB', '2G', '123456' -> bytes (K/M/G alone are binary, as systemd and Ollama read them)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise EdgepackError(f"size {text!r}: expected bytes or a number with K, M, G, KB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_mib(n: int | float, decimals: int = 0) -> str:
    """Bytes as MiB for people: 1572864 -> '2 MiB' (decimals=1: '1.5 MiB')."""
    return f"{n / MiB:.{decimals}f} MiB"


@dataclass(frozen=True)
class Budget:
    bytes: int
    reason: str


def process_memory() -> tuple[int, int]:
    """(RSS, PSS) of this process in bytes. PSS splits pages shared with other mappings (models that
    share segments, other processes) between them, so it is the honest figure for mapped weights."""
    rss = pss = None
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                kib = int(value.split()[0]) * 1024
                rss, pss = (kib, pss) if key == "Rss" else (rss, kib)
    except (OSError, ValueError, IndexError):
        pass
    if rss is None:
        rss = psutil.Process().memory_info().rss
    return rss, pss if pss is not None else rss


def cgroup_memory_max(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest memory.max from this process's cgroup (v2) up to the root; None when unlimited."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    limits = []
    directory = root / relative.lstrip("/")
    while True:
        try:
            value = (directory / "memory.max").read_text().strip()
            if value != "max":
                limits.append(int(value))
        except (OSError, ValueError):
            pass
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def resolve_budget(flag: str | None, board_memory_gib: float | None = None, *,
                   available: int | None = None, used: int | None = None,
                   cgroup_max: int | None = None) -> Budget:
    available = psutil.virtual_memory().available if available is None else available
    used = process_memory()[0] if used is None else used
    if flag is not None and flag.strip().endswith("%"):
        share = _percent(flag)
        budget, reason = int(share * available) + used, f"{flag.strip()} of available memory"
    elif flag is not None:
        budget, reason = parse_size(flag), "--memory-budget"
    else:
        budget, reason = int(DEFAULT_SHARE * available) + used, f"{DEFAULT_SHARE:.0%} of available memory"
        if board_memory_gib:
            board = int(DEFAULT_SHARE * board_memory_gib * 2**30)
            if board < budget:
                budget, reason = board, f"{DEFAULT_SHARE:.0%} of the board's {board_memory_gib:g} GiB"
    cgroup_max = cgroup_memory_max() if cgroup_max is None else cgroup_max
    if cgroup_max is not None and budget > int(CGROUP_SHARE * cgroup_max):
        budget, reason = int(CGROUP_SHARE * cgroup_max), f"{CGROUP_SHARE:.0%} of the cgroup's memory.max"
    return Budget(budget, reason)


def _percent(text: str) -> float:
    try:
        share = float(text.strip()[:-1]) / 100
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise EdgepackError(f"--memory-budget {text!r}: a share must be between 0% and 100%")
    return share


@dataclass(frozen=True)
class ModelShape:
    """What sizes a model's context, read from the loaded model's hyperparameters."""

    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    n_embd: int
    architecture: str = ""
    n_swa: int = 0  # sliding-window size (0: every layer attends to the whole context)


KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32}
# llama.cpp's fixed layer patterns of interleaved sliding-window attention: every N-th layer attends to the whole
# context, the others to a window. An architecture not listed here is sized as if every layer were full.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


def kv_layout(shape: ModelShape, n_ctx: int, slots: int, n_ubatch: int) -> list[tuple[int, int]]:
    """llama.cpp's KV caches of one stream as (layers, cells): full layers keep n_ctx cells (rounded up to 256,
    as llama.cpp pads them), sliding-window layers (llama.cpp's swa_full=false) their window plus one
    micro-batch, rounded up to 256 cells."""
    cells = -(-n_ctx // 256) * 256
    pattern = SWA_PATTERNS.get(shape.architecture) if shape.n_swa > 0 else None
    if pattern is None:
        return [(shape.n_layer, cells)]
    full = shape.n_layer // pattern
    window = min(cells, -(-(shape.n_swa + micro_batch(n_ctx, slots, n_ubatch)) // 256) * 256)
    return [(full, cells), (shape.n_layer - full, window)]


def micro_batch(n_ctx: int, slots: int, n_ubatch: int) -> int:
    """The micro-batch llama.cpp uses: never more tokens than the whole context holds."""
    return min(n_ubatch, n_ctx * slots)


def kv_bytes(shape: ModelShape, n_ctx: int, slots: int, kv_type: str, n_ubatch: int) -> int:
    """KV cache bytes for `slots` streams of n_ctx cells (see kv_layout)."""
    per_cell = shape.n_head_kv * (shape.key_length + shape.value_length) * KV_ELEMENT_BYTES[kv_type]
    return int(per_cell * slots * sum(layers * cells for layers, cells in kv_layout(shape, n_ctx, slots, n_ubatch)))


# Activations of one micro-batch token, in floats per n_embd: measured 9 (tiny llama, FFN 2x n_embd) and 14
# (Gemma 3 270M, FFN 3.2x); 24 leaves room for FFNs up to ~8x n_embd (Qwen2.5 0.5B: 5.4x, about 20).
ACTIVATION_FLOATS_PER_EMBD = 24


def compute_bytes(shape: ModelShape, n_ctx: int, slots: int, n_ubatch: int, draft: int = 0) -> int:
    """llama.cpp's output and compute buffers, from above: the logit rows (one per slot, and `draft` more per
    slot with speculative decoding, in the output buffer and again as the graph's result), the micro-batch's
    activations, and the attention mask (f16 with flash attention, llama.cpp's default on CPU: a micro-batch x
    the cells of each KV cache), which grows with the context."""
    n_ubatch = micro_batch(n_ctx, slots, n_ubatch)
    logits = 4 * shape.n_vocab * min(slots * (1 + draft), n_ubatch)
    activations = 4 * n_ubatch * shape.n_embd * ACTIVATION_FLOATS_PER_EMBD
    mask = 2 * n_ubatch * sum(cells for layers, cells in kv_layout(shape, n_ctx, slots, n_ubatch) if layers)
    return 2 * logits + activations + mask


def context_bytes(shape: ModelShape, n_ctx: int, slots: int, kv_type: str, n_ubatch: int, draft: int = 0) -> int:
    return kv_bytes(shape, n_ctx, slots, kv_type, n_ubatch) + compute_bytes(shape, n_ctx, slots, n_ubatch, draft)


def fit_context(shape: ModelShape, wanted: int, slots: int, kv_type: str, n_ubatch: int, room: int,
                minimum: int = 256, draft: int = 0) -> int | None:
    """The largest context per slot (a multiple of 256, at most `wanted`) whose KV and compute buffers
    fit in `room` bytes; None when not even `minimum` fits."""
    n_ctx = wanted
    while n_ctx >= minimum:
        if context_bytes(shape, n_ctx, slots, kv_type, n_ubatch, draft) <= room:
            return n_ctx
        n_ctx = (n_ctx // 2) // 256 * 256 if n_ctx > 256 else 0
    return None


def return_freed_memory() -> None:
    """Hand the heap glibc keeps after a model is closed back to the kernel (malloc_trim). Without it, a server that
    loads and evicts models under load grew from 557 to 882 MiB of RSS in bench/soak.py's 10 minutes, past its
    budget: freed memory kept in glibc's per-thread arenas, not live objects. A no-op on other C libraries."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
