"""Sentence encoders: a bundle's encoder turned into embeddings on ONNX Runtime (this module: its graph, external-data
tensors and tokenizer.json, all store blobs, as an InferenceSession) or on a TFLite interpreter
(runtime/encoder_tflite.py), with one tokenizer side for both, and the choice between them (docs/encoders.md).

onnxruntime and tokenizers are imported here, when an encoder is first loaded: a runtime without them still serves
LLMs. The graph names its external tensors `sha256-<hex>`, so ONNX Runtime finds them beside the graph in the store's
blobs/ directory and nothing is copied or reassembled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import encoder_tflite
from .bundle_format import Digest, EncoderInfo
from .encoder_tokenizer import INPUTS, OUTPUT, EncoderTokenizer, require
from .errors import EdgepackError

Runtime = Literal["onnx", "tflite"]
RUNTIMES: tuple[Runtime, ...] = ("onnx", "tflite")
BATCH = 32  # inputs per session run; similar lengths go together, so little is padding


class Encoder:
    """One loaded ONNX encoder. `embed` is safe to call from several threads (ONNX Runtime's run and the tokenizer's
    encode are)."""

    def __init__(self, info: EncoderInfo, graph: Path, tokenizer: Path, *, threads: int) -> None:
        ort = require("onnxruntime")
        self.info, self.dimensions = info, info.dimensions
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the LLMs' core choice (runtime/hardware.py), not ONNX Runtime's own
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings about unused initializers are noise on a device
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a graph it cannot load
            raise EdgepackError(f"ONNX Runtime could not load encoder {info.name!r}: {exc}") from None
        inputs = {i.name for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != set(INPUTS) or outputs != [OUTPUT]:
            raise EdgepackError(f"encoder {info.name!r}: expected inputs {list(INPUTS)} and output {OUTPUT!r}, got "
                                f"{sorted(inputs)} and {outputs}")
        self._tokenizer = EncoderTokenizer(info, tokenizer)
        self.vocab_size = self._tokenizer.vocab_size

    def tokens(self, item: str | list[int]) -> list[int]:
        return self._tokenizer.tokens(item)

    def embed(self, items: list[str] | list[list[int]]) -> tuple[np.ndarray, int]:
        """The inputs' embeddings, float32 [len(items), dimensions] in order, and the tokens read."""
        sequences = [self.tokens(item) for item in items]
        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), BATCH):
            chosen = order[start:start + BATCH]
            out[chosen] = self._run([sequences[i] for i in chosen])
        return out, sum(map(len, sequences))

    def _run(self, sequences: list[list[int]]) -> np.ndarray:
        width = max(map(len, sequences))
        ids = np.full((len(sequences), width), self._tokenizer.pad, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, tokens in enumerate(sequences):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        (vectors,) = self._session.run([OUTPUT], {"input_ids": ids, "attention_mask": mask})
        if not np.all(np.isfinite(vectors)):
            raise EdgepackError(f"encoder {self.info.name!r} produced a non-finite embedding")
        return vectors

    def close(self) -> None:
        self._session = None


# ---- which runtime ----

_LABELS = {"onnx": "ONNX graph", "tflite": ".tflite file"}


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: Runtime
    note: str | None = None  # why it is not the preferred runtime: for the log


def choose_runtime(info: EncoderInfo, preferred: Runtime) -> RuntimeChoice:
    """The runtime this device runs the encoder on: the preferred one (serve --embed-runtime, else the board
    profile's embed_runtime) when the encoder has it and its package imports; the encoder's only one; or the other
    one, when the preferred one's package is missing here. One line when neither can run."""
    available = info.runtimes()
    if len(available) == 1:
        only: Runtime = available[0]  # type: ignore[assignment]
        problem = runtime_missing(info, only)
        if problem is not None:
            raise EdgepackError(f"encoder {info.name!r} has only an {_LABELS[only]}: {problem}")
        return RuntimeChoice(only, None if only == preferred else
                             f"encoder {info.name} has no {_LABELS[preferred]}: running its {_LABELS[only]}")
    problem = runtime_missing(info, preferred)
    if problem is None:
        return RuntimeChoice(preferred)
    other: Runtime = "tflite" if preferred == "onnx" else "onnx"
    fallback = runtime_missing(info, other)
    if fallback is not None:
        raise EdgepackError(f"encoder {info.name!r} cannot run here: {problem}; {fallback}")
    return RuntimeChoice(other, f"encoder {info.name}: {problem}; running its {_LABELS[other]} instead")


def runtime_missing(info: EncoderInfo, runtime: Runtime) -> str | None:
    """Why this device cannot run the encoder on `runtime` (the package is not installed or cannot run this file),
    or None. Imports the package: it is loaded next anyway."""
    try:
        if runtime == "onnx":
            require("onnxruntime")
        else:
            assert info.tflite is not None
            encoder_tflite.interpreter_class(info.tflite.quant)
    except EdgepackError as exc:
        return str(exc)
    return None


def encoder_blobs(info: EncoderInfo, runtime: Runtime) -> list[Digest]:
    """The blobs the encoder reads on this runtime: what the pool counts and hashes again before a load."""
    if runtime == "onnx":
        assert info.graph is not None
        return [info.graph, *info.segments, info.tokenizer]
    assert info.tflite is not None
    return [info.tflite.digest, info.tokenizer]


def open_encoder(info: EncoderInfo, runtime: Runtime, blob_path: Callable[[Digest], Path], *,
                 threads: int) -> Encoder | Any:
    """The encoder loaded on `runtime` (Encoder or encoder_tflite.TFLiteEncoder: the same interface)."""
    model = encoder_blobs(info, runtime)[0]
    cls = Encoder if runtime == "onnx" else encoder_tflite.TFLiteEncoder
    return cls(info, blob_path(model), blob_path(info.tokenizer), threads=threads)
