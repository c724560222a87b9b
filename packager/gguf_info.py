"""What a GGUF file holds, read with gguf-py: architecture, sizes, types, template, layout."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import quant_types
from .errors import PackagerError

_UNQUANTIZED = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file
    info_offset: int  # where its tensor-info record starts
    info_end: int  # where that record's offset field starts (we rewrite the offset)


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    size: int
    architecture: str
    name: str | None
    general_type: str | None  # "model", "adapter", "imatrix", ... when the file says
    file_type: str  # e.g. "Q4_K_M", or "unknown (N)"
    quantized: bool
    parameters: int
    block_count: int
    context_length: int
    chat_template: str | None
    alignment: int
    kv_count: int
    kv_start: int
    kv_end: int
    is_split: bool
    tensors: tuple[TensorInfo, ...]

    @property
    def quant_types(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type_name for t in self.tensors).items()))

    @property
    def bits_per_weight(self) -> float:
        weights = sum(t.n_bytes for t in self.tensors)
        return 8 * weights / self.parameters if self.parameters else 0.0


def read(path: Path | str) -> GGUFInfo:
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise PackagerError(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise PackagerError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = reader.fields

    def value(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise PackagerError(f"{path}: GGUF has no general.architecture")
    kv_fields = [f for k, f in fields.items() if not k.startswith("GGUF.")]
    tensors = tuple(
        TensorInfo(
            name=t.name,
            type_name=gguf.GGMLQuantizationType(int(t.tensor_type)).name,
            n_elements=int(t.n_elements),
            n_bytes=int(t.n_bytes),
            data_offset=int(t.data_offset),
            info_offset=int(t.field.offset),
            info_end=int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:-1]),
        )
        for t in reader.tensors
    )
    ftype_value = value("general.file_type")
    qtype = quant_types.from_ftype(int(ftype_value)) if ftype_value is not None else None
    type_counts = Counter(t.type_name for t in tensors)
    quantized = qtype.quantized if qtype else any(name not in _UNQUANTIZED for name in type_counts)
    file_type = qtype.name if qtype else (f"unknown ({ftype_value})" if ftype_value is not None else "unknown")
    kv_start = int(kv_fields[0].offset) if kv_fields else int(fields["GGUF.kv_count"].offset) + 8
    kv_end = tensors[0].info_offset if tensors else _end_of(kv_fields[-1])
    return GGUFInfo(
        path=path,
        size=path.stat().st_size,
        architecture=arch,
        name=value("general.name"),
        general_type=value("general.type"),
        file_type=file_type,
        quantized=quantized,
        parameters=sum(t.n_elements for t in tensors),
        block_count=int(value(f"{arch}.block_count", 0)),
        context_length=int(value(f"{arch}.context_length", 0)),
        chat_template=value("tokenizer.chat_template"),
        alignment=int(reader.alignment),
        kv_count=len(kv_fields),
        kv_start=kv_start,
        kv_end=kv_end,
        is_split=int(value("split.count", 0) or 0) > 1,
        tensors=tensors,
    )


def _end_of(field: gguf.ReaderField) -> int:
    return int(field.offset) + sum(int(np.asarray(p).nbytes) for p in field.parts)
