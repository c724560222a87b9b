"""Sentence encoders on a TFLite interpreter (ai-edge-litert, else tflite-runtime): a bundle's .tflite file
(packager/tflite_export.py: one fixed-shape signature `embed_{batch}x{tokens}` per batch size and length, pooling
and normalisation inside) run with the ONNX encoder's tokenizer side (runtime/encoder_tokenizer.py). docs/tflite.md.

The interpreter package is imported here, when such an encoder is first loaded: a runtime without one still serves
LLMs and ONNX encoders.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .bundle_format import EncoderInfo
from .encoder_tokenizer import INPUTS, OUTPUT, EncoderTokenizer  # the ONNX graph's names; int32 in here
from .errors import EdgepackError

# (module, pip requirement), first found wins: ai-edge-litert runs every file; tflite-runtime 2.14 computes the
# per-channel dynamic-range int8 file wrongly (cosine 0.06 to fp32, docs/tflite.md), so it runs fp32 and int8-weights.
INTERPRETERS = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))
NEEDS_LITERT = frozenset({"int8"})
# Resident memory over the file's size once every signature has run (XNNPACK packs weights per signature; int8-weights
# are dequantized to float): measured on MiniLM with ai-edge-litert 2.3, 2 threads, six signatures up to 16x256:
# fp32 +384 MiB of an 87 MiB file, int8 +178 of 27, int8-weights +897 of 27. The pool asks this much before a load.
MEMORY_FACTOR = {"fp32": 5, "int8": 8, "int8-weights": 34}


def interpreter_class(quant: str) -> type:
    """The Interpreter of the first installed package that runs a file of this quantization; one line if none."""
    found = []
    for module, package in INTERPRETERS:
        try:
            interpreter = importlib.import_module(module).Interpreter
        except ImportError:
            continue
        if quant in NEEDS_LITERT and package != "ai-edge-litert":
            found.append(package)
            continue
        return interpreter
    if found:
        raise EdgepackError(f"the encoder's {quant} .tflite needs ai-edge-litert>=2.3 ({', '.join(found)} computes it "
                            f"wrongly): pip install ai-edge-litert")
    raise EdgepackError("TFLite encoders need a TFLite interpreter: pip install ai-edge-litert (or tflite-runtime "
                        "for fp32 and int8-weights files)")


class TFLiteEncoder:
    """One loaded .tflite encoder, the interface of runtime/encoder.py's Encoder. A TFLite interpreter runs one
    invocation at a time, so `embed` holds a lock (ONNX Runtime's sessions need none)."""

    def __init__(self, info: EncoderInfo, tflite: Path, tokenizer: Path, *, threads: int) -> None:
        assert info.tflite is not None
        self.info, self.dimensions = info, info.dimensions
        self._tokenizer = EncoderTokenizer(info, tokenizer)
        self.vocab_size = self._tokenizer.vocab_size
        interpreter = interpreter_class(info.tflite.quant)
        try:
            self._interpreter = interpreter(model_path=str(tflite), num_threads=threads)
        except Exception as exc:  # noqa: BLE001 - the interpreters raise ValueError and RuntimeError alike
            raise EdgepackError(f"the TFLite interpreter could not load encoder {info.name!r}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self._shapes = signature_shapes(self._interpreter, f"encoder {info.name!r}")
        if max(t for _, t in self._shapes) < info.max_tokens:
            raise EdgepackError(f"encoder {info.name!r}: its .tflite takes at most {max(t for _, t in self._shapes)} "
                                f"tokens, its manifest says max_tokens {info.max_tokens}")
        self._lock = threading.Lock()
        self._warm_up()

    def tokens(self, item: str | list[int]) -> list[int]:
        return self._tokenizer.tokens(item)

    def embed(self, items: list[str] | list[list[int]]) -> tuple[np.ndarray, int]:
        """The inputs' embeddings, float32 [len(items), dimensions] in order, and the tokens read."""
        sequences = [self.tokens(item) for item in items]
        with self._lock:
            vectors = embed(self._interpreter, sequences, self._shapes)
        if vectors.shape[1] != self.dimensions or not np.all(np.isfinite(vectors)):
            raise EdgepackError(f"encoder {self.info.name!r} produced {vectors.shape[1]}-wide or non-finite "
                                f"embeddings (expected {self.dimensions})")
        return vectors, sum(map(len, sequences))

    def _warm_up(self) -> None:
        """Run every signature once now: the interpreter prepares (and XNNPACK packs weights for) a signature on its
        first run, so this is when the memory is taken, inside the pool's measured load, not on a request."""
        for batch, tokens in self._shapes:
            embed(self._interpreter, [[0]] * batch, [(batch, tokens)])

    def close(self) -> None:
        self._interpreter = None


def signature_name(batch: int, tokens: int) -> str:
    return f"embed_{batch}x{tokens}"


def signature_shapes(interpreter: Any, what: str = "the .tflite") -> list[tuple[int, int]]:
    """(batch, tokens) of each signature, checked: named `embed_{batch}x{tokens}`, the inputs and output the
    packager writes, batch 1 among them (it runs what is left over)."""
    shapes = []
    for name, io in interpreter.get_signature_list().items():
        batch, _, tokens = name.removeprefix("embed_").partition("x")
        if not (name.startswith("embed_") and batch.isdigit() and tokens.isdigit()) \
                or sorted(io["inputs"]) != sorted(INPUTS) or io["outputs"] != [OUTPUT]:
            raise EdgepackError(f"{what}: signature {name!r} with inputs {io['inputs']} and outputs {io['outputs']}: "
                                f"expected embed_<batch>x<tokens> with inputs {list(INPUTS)} and output {OUTPUT!r}")
        shapes.append((int(batch), int(tokens)))
    if not any(batch == 1 for batch, _ in shapes):
        raise EdgepackError(f"{what}: signatures {sorted(shapes)}: expected one of batch 1")
    return sorted(shapes)


def embed(interpreter: Any, token_ids: list[list[int]], shapes: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Embeddings of tokenized texts by one of the file's interpreters (tflite-runtime's or ai-edge-litert's): texts of
    similar length run together in the largest batch signature they fill (a padding row costs as much as a text), each
    through the shortest signature that holds its longest text, padded with mask 0."""
    shapes = shapes or signature_shapes(interpreter)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: list[np.ndarray | None] = [None] * len(token_ids)
    start = 0
    while start < len(order):
        batch = max(b for b, _ in shapes if b <= len(order) - start)
        chunk = order[start:start + batch]
        longest = max(len(token_ids[i]) for i in chunk)
        tokens = min((t for b, t in shapes if b == batch and t >= longest), default=None)
        if tokens is None:
            raise EdgepackError(f"an input of {longest} tokens is longer than the .tflite's signatures take")
        ids, mask = pad([token_ids[i] for i in chunk], tokens, rows=batch)
        runner = interpreter.get_signature_runner(signature_name(batch, tokens))
        result = runner(input_ids=ids, attention_mask=mask)[OUTPUT]
        for row, i in enumerate(chunk):
            out[i] = result[row]
        start += batch
    return np.stack(out)  # type: ignore[arg-type]


def pad(token_ids: list[list[int]], tokens: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((rows or len(token_ids), tokens), np.int32)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(token_ids):
        length = min(len(seq), tokens)
        ids[row, :length] = seq[:length]
        mask[row, :length] = 1
    return ids, mask
