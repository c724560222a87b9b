"""Layer pruning: measure each block's influence on calibration text and drop the least important
ones progressively (llama.cpp's prune_layers applies the cut; it renumbers the remaining blocks).

Block influence is 1 - cosine(h_in, h_out) of a block's input and output hidden states, averaged over
tokens, read through llama.cpp's eval callback ("l_out-N" is block N's output). After each drop the
pruned model is measured again, since the remaining blocks' roles shift.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PackagerError
from .forward import Forward, GGMLTensor, Observer, as_matrix

_INPUT_NAMES = (b"inp_embd", b"inp_scaled")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def renamed(name: str, pruned: Sequence[int]) -> str | None:
    """A tensor's name once llama.cpp's prune_layers dropped those blocks and renumbered the rest in order;
    None for a tensor of a dropped block."""
    match = _BLOCK_RE.match(name)
    if match is None:
        return name
    block = int(match.group(1))
    if block in pruned:
        return None
    return f"blk.{block - sum(p < block for p in pruned)}.{name[match.end():]}"


class _Influence(Observer):
    def __init__(self, n_layer: int) -> None:
        self.totals = np.zeros(n_layer)
        self.rows = np.zeros(n_layer)
        self.previous: np.ndarray | None = None

    def wants(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        return name.startswith(b"l_out-") or name in _INPUT_NAMES

    def observe(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        x = as_matrix(tensor)
        if x is None:
            return True
        x = x.astype(np.float64)
        if name.startswith(b"l_out-") and self.previous is not None and self.previous.shape == x.shape:
            layer = int(name.removeprefix(b"l_out-"))
            cosine = (self.previous * x).sum(1) / (
                np.linalg.norm(self.previous, axis=1) * np.linalg.norm(x, axis=1) + 1e-12
            )
            self.totals[layer] += (1 - cosine).sum()
            self.rows[layer] += len(cosine)
        self.previous = x
        # After the last block only the output projection is left, whose logits nobody reads: stop there.
        return name != b"l_out-%d" % (len(self.totals) - 1)


def block_influence(paths: list[Path], text: str, *, n_layer: int, ctx: int = 512, threads: int = 2,
                    max_chunks: int = 2) -> list[float]:
    """1 - cos(h_in, h_out) per block, averaged over the tokens of the first chunks of `text`."""
    observer = _Influence(n_layer)
    with Forward(paths, n_ctx=ctx, threads=threads, observer=observer) as model:
        chunks = model.chunks(model.tokenize(text), max_chunks)
        if not chunks:
            raise PackagerError(f"calibration text is shorter than one chunk of {ctx} tokens")
        for chunk in chunks:
            observer.previous = None
            model.run(chunk, 0, keep_logits=False)
    return [float(t / r) if r else float("nan") for t, r in zip(observer.totals, observer.rows, strict=True)]


@dataclass(frozen=True)
class PruneStep:
    layer: int  # original block index dropped at this step
    degradation: float  # 1 - top-1 agreement of the pruned model against the reference
    accepted: bool


@dataclass(frozen=True)
class PruneResult:
    influence: list[float]  # of the unpruned model, per original block
    pruned: list[int]  # original block indices
    steps: list[PruneStep]


def progressive(
    n_layer: int,
    influence_of: Callable[[list[int]], list[float]],
    degradation_of: Callable[[list[int]], float],
    *,
    count: int | None,
    tolerance: float | None,
) -> PruneResult:
    """Drop the least influential block, re-measure, repeat.

    influence_of(pruned) measures the model with those original blocks removed (per remaining block);
    degradation_of(pruned) is its 1 - top-1 agreement. Stops after `count` blocks, or before the step
    that would reach `tolerance` (auto mode). The first and last blocks are never dropped.
    """
    if count is None and tolerance is None:
        raise PackagerError("pruning needs a block count or a tolerance tier")
    first = influence_of([])
    pruned: list[int] = []
    steps: list[PruneStep] = []
    current = first
    while count is None or len(pruned) < count:
        remaining = [i for i in range(n_layer) if i not in pruned]
        candidates = [(score, layer) for score, layer in zip(current, remaining, strict=True)
                      if layer not in (0, n_layer - 1)]
        if not candidates:
            break
        _, layer = min(candidates)
        trial = sorted(pruned + [layer])
        degradation = degradation_of(trial)
        accepted = tolerance is None or degradation < tolerance
        steps.append(PruneStep(layer, degradation, accepted))
        if not accepted:
            break
        pruned = trial
        current = influence_of(pruned)
    return PruneResult(first, pruned, steps)
