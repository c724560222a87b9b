"""Mixed precision under a size budget: a type per tensor that minimises the predicted loss.

Sensitivity proxy: for a weight W with importance matrix m (mean squared input per input channel), the
expected squared error its quantized form Q adds to the layer's output per token is
    sum_c m_c * sum_r (W - Q)_rc^2
(inputs taken as uncorrelated), divided by the output's own energy sum_c m_c * sum_r W_rc^2: a
noise-to-signal ratio, comparable across layers (absolute errors let the large-activation output
projection dominate and starved the blocks; measured in bench/bench_plan.py).
Every candidate type is produced by llama.cpp itself (one pure quantization per ladder type, with the
imatrix), dequantized with gguf-py and compared with the source.
Keeping the source's own type is always an option too (no added error, the source's bytes).
The choice is a multiple-choice knapsack solved by dynamic programming over the byte budget; the sum
of proxies it minimises is checked against measured KLD in bench/bench_plan.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import quant_types, quantize
from .errors import PackagerError
from .gguf_info import GGUFInfo, TensorInfo
from .imatrix import Imatrix

# Pure llama.cpp quantizations that provide the per-tensor options (K-quants fall back to legacy
# 32-blocks where a row is not a multiple of 256, as llama.cpp decides).
LADDER = ("Q8_0", "Q6_K", "Q5_K_S", "Q4_K_S", "Q3_K_S", "Q2_K")
_UNITS = 20000  # budget resolution of the knapsack


@dataclass(frozen=True)
class Option:
    type_name: str  # ggml type, e.g. "Q4_K"
    ggml_type: int
    n_bytes: int
    error: float


@dataclass(frozen=True)
class TensorOptions:
    name: str
    source_type: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Ladder:
    tensors: tuple[TensorOptions, ...]
    files: dict[str, Path]  # ladder type -> its pure quantization
    file_sizes: dict[str, int]

    def fixed_bytes(self, ladder_type: str) -> int:
        """Bytes outside the planned tensors (metadata, norms, unplanned tensors) in a ladder file."""
        index = LADDER.index(ladder_type)
        planned = sum(t.options[index].n_bytes for t in self.tensors)
        return self.file_sizes[ladder_type] - planned


@dataclass(frozen=True)
class Plan:
    choices: dict[str, Option]
    base: str  # ladder type used for everything not planned
    budget: int  # bytes allowed for the planned tensors
    predicted_error: float

    @property
    def planned_bytes(self) -> int:
        return sum(o.n_bytes for o in self.choices.values())

    def tensor_types(self) -> dict[str, int]:
        return {name: option.ggml_type for name, option in self.choices.items()}


def build_ladder(
    source: GGUFInfo, imatrix: Imatrix, work: Path, *, allow_requantize: bool, threads: int = 0,
    progress: Callable[[str], None] = lambda step: None,
) -> Ladder:
    """Quantize the source once per ladder type and measure every planned tensor's error in each."""
    planned = [t.name for t in source.tensors if imatrix.mean_squares(t.name) is not None]
    if not planned:
        raise PackagerError("the importance matrix covers none of the model's tensors")
    reference = _dequantized(source.path, set(planned))
    energy = {}
    for name in planned:
        weights = imatrix.mean_squares(name).astype(np.float64)
        energy[name] = max(float(np.einsum("rc,rc,c->", reference[name], reference[name], weights)), 1e-30)
    files, sizes = {}, {}
    found: dict[str, dict[str, Option]] = {name: {} for name in planned}
    for name in LADDER:
        progress(f"quantize {name}")
        path = work / f"ladder-{name}.gguf"
        quantize.quantize(source.path, path, quant_types.parse(name), allow_requantize=allow_requantize,
                          imatrix=imatrix, pure=True, threads=threads)
        files[name], sizes[name] = path, path.stat().st_size
        for tensor in gguf.GGUFReader(path, "r").tensors:
            if tensor.name not in found:
                continue
            weights = imatrix.mean_squares(tensor.name).astype(np.float64)
            delta = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, weights.size)
            delta -= reference[tensor.name]
            error = float(np.einsum("rc,rc,c->", delta, delta, weights)) / energy[tensor.name]
            found[tensor.name][name] = Option(tensor.tensor_type.name, int(tensor.tensor_type), int(tensor.n_bytes),
                                              error)
    by_name = {t.name: t for t in source.tensors}
    tensors = tuple(
        TensorOptions(name, by_name[name].type_name,
                      tuple(found[name][ladder] for ladder in LADDER) + (_keep(by_name[name]),))
        for name in planned
    )
    return Ladder(tensors, files, sizes)


def _keep(tensor: TensorInfo) -> Option:
    """Leaving a tensor as the source has it: no added error (llama.cpp copies a tensor already of its type)."""
    ggml_type = gguf.GGMLQuantizationType[tensor.type_name]
    return Option(tensor.type_name, int(ggml_type), tensor.n_bytes, 0.0)


def _dequantized(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    out = {}
    for tensor in gguf.GGUFReader(path, "r").tensors:
        if tensor.name in names:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            out[tensor.name] = values.reshape(-1, int(tensor.shape[0]))
    return out


def choose(ladder: Ladder, target_bytes: int) -> Plan:
    """The per-tensor types with the least total predicted error whose file fits target_bytes."""
    base = _base_type(ladder, target_bytes)
    budget = target_bytes - ladder.fixed_bytes(base)
    smallest = sum(min(o.n_bytes for o in t.options) for t in ladder.tensors)
    if budget < smallest:
        least = smallest + ladder.fixed_bytes(base)
        raise PackagerError(f"target size {target_bytes:,} bytes is below the smallest plan ({least:,} bytes)")
    choices = knapsack([t.options for t in ladder.tensors], budget)
    picked = {t.name: t.options[i] for t, i in zip(ladder.tensors, choices, strict=True)}
    return Plan(picked, base, budget, sum(o.error for o in picked.values()))


def _base_type(ladder: Ladder, target_bytes: int) -> str:
    """The largest ladder type whose uniform file fits the target (the smallest if none does)."""
    fitting = [name for name in LADDER if ladder.file_sizes[name] <= target_bytes]
    return fitting[0] if fitting else LADDER[-1]


def knapsack(items: list[tuple[Option, ...]], budget: int) -> list[int]:
    """Multiple-choice knapsack: one option per item, total bytes <= budget, least total error.

    Dynamic programming over the budget in _UNITS steps. Costs are rounded to the nearest step; if the
    rounded choice overshoots the real budget, the step budget shrinks by the overshoot and it runs again.
    """
    capacity_bytes = budget
    for _ in range(8):
        picks = _knapsack_units(items, capacity_bytes)
        total = sum(items[i][k].n_bytes for i, k in enumerate(picks))
        if total <= budget:
            return picks
        capacity_bytes -= total - budget
    raise PackagerError("no combination of types fits the budget")


def _knapsack_units(items: list[tuple[Option, ...]], budget: int) -> list[int]:
    unit = max(1, budget // _UNITS)
    capacity = budget // unit
    costs = [[round(o.n_bytes / unit) for o in options] for options in items]
    best = np.zeros(capacity + 1)  # least error using at most b units, over the items so far
    picks = np.zeros((len(items), capacity + 1), dtype=np.int8)
    for i, options in enumerate(items):
        candidate = np.full((len(options), capacity + 1), np.inf)
        for k, option in enumerate(options):
            cost = costs[i][k]
            if cost <= capacity:
                candidate[k, cost:] = best[: capacity + 1 - cost] + option.error
        picks[i] = candidate.argmin(axis=0)
        best = candidate.min(axis=0)
    if not np.isfinite(best[capacity]):
        raise PackagerError("no combination of types fits the budget")
    chosen = []
    remaining = capacity
    for i in range(len(items) - 1, -1, -1):
        k = int(picks[i, remaining])
        chosen.append(k)
        remaining -= costs[i][k]
    return chosen[::-1]
