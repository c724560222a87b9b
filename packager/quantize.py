"""Quantization by llama.cpp's own llama_model_quantize; our code only picks the parameters:
the file type, an importance matrix, per-tensor type overrides and layers to prune."""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import llama_cpp

from edgepack.runtime import llama

from .errors import PackagerError
from .imatrix import Imatrix, QuantizeImatrix
from .quant_types import QuantType

# llama.cpp logs one line per tensor: "[  12/ 201]  blk.0.attn_q.weight - ..."
_PROGRESS_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize(
    source: Path,
    target: Path,
    qtype: QuantType,
    *,
    allow_requantize: bool = False,
    imatrix: Imatrix | None = None,
    tensor_types: Mapping[str, int] | None = None,
    prune_layers: Sequence[int] = (),
    pure: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Write `source` quantized to `qtype` at `target`.

    tensor_types maps exact tensor names to ggml types (llama.cpp's tensor type overrides); prune_layers
    lists blocks to drop (llama.cpp renumbers the rest); pure skips llama.cpp's per-tensor type mix.
    `progress(done, total)` counts tensors.
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = allow_requantize
    params.pure = pure
    keep_alive = []
    if imatrix is not None:
        data = QuantizeImatrix(imatrix)
        keep_alive.append(data)
        params.imatrix = data.array
    if tensor_types:
        overrides = [
            llama_cpp.llama_model_tensor_override(pattern=f"^{re.escape(name)}$".encode(), type=ggml_type)
            for name, ggml_type in sorted(tensor_types.items())
        ]
        overrides.append(llama_cpp.llama_model_tensor_override(pattern=None, type=0))
        array = (llama_cpp.llama_model_tensor_override * len(overrides))(*overrides)
        keep_alive.append(array)
        params.tt_overrides = array
    if prune_layers:
        layers = (ctypes.c_int32 * (len(prune_layers) + 1))(*sorted(prune_layers), -1)
        keep_alive.append(layers)
        params.prune_layers = layers

    def on_log(line: str) -> None:
        match = _PROGRESS_RE.search(line)
        if match:
            progress(int(match.group(1)), int(match.group(2)))

    with llama.log_listener(on_log):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise PackagerError(f"llama.cpp could not quantize {source.name} to {qtype.name}: {llama.last_error()}")
