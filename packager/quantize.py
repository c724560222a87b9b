"""Quantization by llama.cpp's own llama_model_quantize; our code only picks the parameters."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import llama_cpp
from edgepack.runtime import llama

from .errors import PackagerError
from .quant_types import QuantType

# llama.cpp logs one line per tensor: "[  12/ 201]  blk.0.attn_q.weight - ..."
_PROGRESS_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize(
    source: Path,
    target: Path,
    qtype: QuantType,
    *,
    allow_requantize: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Write `source` quantized to `qtype` at `target`; `progress(done, total)` counts tensors."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = allow_requantize

    def on_log(line: str) -> None:
        match = _PROGRESS_RE.search(line)
        if match:
            progress(int(match.group(1)), int(match.group(2)))

    with llama.log_listener(on_log):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise PackagerError(f"llama.cpp could not quantize {source.name} to {qtype.name}: {llama.last_error()}")
