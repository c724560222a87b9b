"""Importance matrix: per weight, the mean of squared input activations per input channel.

Collected through llama.cpp's eval callback while it evaluates calibration text (what llama.cpp's
llama-imatrix does for dense models), saved in llama.cpp's GGUF imatrix format (<name>.in_sum2,
<name>.counts), and handed to llama_model_quantize so the quantizer protects the channels that matter.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from .errors import PackagerError
from .forward import GGML_TYPE_F32, Forward, GGMLTensor, Observer, as_matrix

_MIN_ROWS = 16  # llama-imatrix ignores tiny batches too


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # sum of x^2 per input channel
    counts: dict[str, int] = field(default_factory=dict)  # rows (tokens) seen
    chunks: int = 0
    chunk_size: int = 0
    dataset: str = ""

    def mean_squares(self, name: str) -> np.ndarray | None:
        if name not in self.sums or not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).astype(np.float32)

    def renamed(self, rename: Callable[[str], str | None]) -> Imatrix:
        """The same statistics under new tensor names (e.g. after pruning); a tensor renamed to None is left out."""
        names = {name: new for name in self.sums if (new := rename(name)) is not None}
        sums = {new: self.sums[old] for old, new in names.items()}
        counts = {new: self.counts[old] for old, new in names.items()}
        return Imatrix(sums, counts, self.chunks, self.chunk_size, self.dataset)


class _Collector(Observer):
    """Sums the squared inputs of every matrix product with a model weight.

    The output projection (output.weight, or the tied token_embd.weight) multiplies the final norm,
    "result_norm", with a vocabulary-wide matrix: the largest product of the graph, and its logits are
    never used here. Once a pass has shown that result_norm is that product's input (collect() runs a
    short uncounted one first), chunks take the statistics from result_norm and stop the evaluation there.
    """

    def __init__(self, imatrix: Imatrix) -> None:
        self.imatrix = imatrix
        self.counting = True  # False: only learn which weight result_norm feeds
        self.output: str | None = None  # the weight result_norm feeds, once seen
        self._norm: int | None = None  # result_norm's address in the pass being evaluated

    def wants(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        if name == b"result_norm":
            return tensor.type == GGML_TYPE_F32 and tensor.ne[1] >= _MIN_ROWS
        if op != b"MUL_MAT":
            return False
        weight, inputs = tensor.src[0].contents, tensor.src[1].contents
        return (
            (weight.name.startswith(b"blk.") or weight.name in (b"output.weight", b"token_embd.weight"))
            and inputs.type == GGML_TYPE_F32
            and inputs.ne[1] >= _MIN_ROWS
        )

    def observe(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        if name == b"result_norm":
            if self.output is None:
                self._norm = ctypes.addressof(tensor)
                return True
            if self.counting:
                self._add(self.output, tensor)
            return False
        inputs = tensor.src[1].contents
        weight = tensor.src[0].contents.name.decode()
        if self.output is None and ctypes.addressof(inputs) == self._norm:
            self.output = weight
        if self.counting:
            self._add(weight, inputs)
        return True

    def _add(self, key: str, inputs: GGMLTensor) -> None:
        x = as_matrix(inputs)
        if x is None:
            return
        squares = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if key in self.imatrix.sums:
            self.imatrix.sums[key] += squares
        else:
            self.imatrix.sums[key] = squares
        self.imatrix.counts[key] = self.imatrix.counts.get(key, 0) + x.shape[0]


def collect(paths: list[Path], text: str, *, ctx: int = 512, threads: int = 2, max_chunks: int | None = None,
            dataset: str = "") -> Imatrix:
    imatrix = Imatrix(chunk_size=ctx, dataset=dataset)
    collector = _Collector(imatrix)
    with Forward(paths, n_ctx=ctx, threads=threads, observer=collector) as model:
        chunks = model.chunks(model.tokenize(text), max_chunks)
        if not chunks:
            raise PackagerError(f"calibration text is shorter than one chunk of {ctx} tokens")
        collector.counting = False
        model.run(chunks[0][:_MIN_ROWS], 0, keep_logits=False)
        collector.counting = True
        for chunk in chunks:
            # Outputs for every position, so the output projection's input is measured at every position
            # too (llama-imatrix's --process-output); the projection itself is skipped (see _Collector).
            model.run(chunk, 0, keep_logits=False)
            imatrix.chunks += 1
    if not imatrix.sums:
        raise PackagerError("no activations were collected (is this a dense llama.cpp model?)")
    return imatrix


def save(imatrix: Imatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [imatrix.dataset or "edgepack"])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([imatrix.counts[name]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load(path: Path) -> Imatrix:
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as exc:
        raise PackagerError(f"{path}: not a GGUF imatrix file ({exc})") from None
    imatrix = Imatrix()
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            counts = tensors.get(f"{base}.counts")
            if counts is None or counts.size != 1:
                raise PackagerError(f"{path}: {base} has no single .counts entry (only dense models are supported)")
            imatrix.sums[base], imatrix.counts[base] = values, int(counts[0])
    if not imatrix.sums:
        raise PackagerError(f"{path}: no <tensor>.in_sum2 entries: not an imatrix file")
    field = reader.fields.get("imatrix.chunk_count")
    imatrix.chunks = int(field.contents()) if field is not None else 0
    return imatrix


class QuantizeImatrix:
    """The importance matrix as llama_model_quantize_params.imatrix wants it (NULL-name terminated)."""

    def __init__(self, imatrix: Imatrix) -> None:
        self._arrays = []
        entries = []
        for name in sorted(imatrix.sums):
            values = imatrix.mean_squares(name)
            if values is None:
                continue
            array = np.ascontiguousarray(values, dtype=np.float32)
            self._arrays.append(array)
            entries.append(llama_cpp.llama_model_imatrix_data(
                name=name.encode(), data=array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), size=array.size,
            ))
        entries.append(llama_cpp.llama_model_imatrix_data(name=None, data=None, size=0))
        self.array = (llama_cpp.llama_model_imatrix_data * len(entries))(*entries)
