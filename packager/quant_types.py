"""The llama.cpp model file types edgepack offers, with their nominal bits per weight.

The numbers are llama.cpp's block sizes (Q4_K_M, Q3_K_M etc. are mixes; their figures are the typical
average llama-quantize reports on Llama-class models). Used to order types, never to quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

from .errors import PackagerError

KEEP = "keep"


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int
    bpw: float

    @property
    def quantized(self) -> bool:
        return self.name not in ("F32", "F16", "BF16")


def _ftype(name: str) -> int:
    const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    return getattr(llama_cpp, const)


_BPW = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_K_M": 5.69,
    "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5,
    "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 2.96,
}
TYPES: dict[str, QuantType] = {name: QuantType(name, _ftype(name), bpw) for name, bpw in _BPW.items()}
_BY_FTYPE = {t.ftype: t for t in TYPES.values()}


def parse(name: str) -> QuantType:
    """A type name as a user writes it (case-insensitive), or a clear error listing the choices."""
    found = TYPES.get(name.upper())
    if found is None:
        raise PackagerError(f"unknown quant type {name!r}: choose one of {', '.join(TYPES)} or {KEEP}")
    return found


def from_ftype(ftype: int) -> QuantType | None:
    return _BY_FTYPE.get(ftype)
