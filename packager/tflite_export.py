"""A sentence encoder (an HF BERT checkpoint laid out as sentence-transformers saves it) to one .tflite for boards that
run TFLite (tflite-runtime, ai-edge-litert) rather than ONNX Runtime: pooling and normalisation inside the graph, as
the ONNX export has them (encoder.py reads the checkpoint and pools), converted by litert-torch (no TensorFlow), made
INT8 by ai-edge-quantizer, measured against the torch model on encoder_eval's set. Why these tools: docs/tflite.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgepack.runtime.encoder_tflite import embed, signature_name  # the device side, as the runtime runs it
from edgepack.runtime.encoder_tokenizer import INPUTS, OUTPUT  # the ONNX encoder's names; int32 in here
from edgepack.runtime.memory import format_mib

from . import encoder_eval
from .encoder import EncoderSource, load_torch, pooled_module, read_source, torch_embeddings
from .errors import PackagerError

if TYPE_CHECKING:
    from .encoder_eval import EncoderMetrics

# int8: weights int8 per channel, activations quantized on the fly (integer matmuls: smaller and faster).
# int8-weights: weights int8, dequantized to float before each op (smaller only; closest to fp32).
# Full-integer (static) int8 was tried and is not offered: cosine to fp32 0.62 on MiniLM (docs/tflite.md).
QUANTS: tuple[str, ...] = ("fp32", "int8", "int8-weights")
# The interpreter each file needs: tflite-runtime 2.14 runs the per-channel dynamic-range int8 file but its embeddings
# are wrong (cosine 0.06 to fp32), so that one needs ai-edge-litert; measured in docs/tflite.md.
RUNTIMES = {"fp32": "tflite-runtime>=2.14 or ai-edge-litert>=2.3", "int8": "ai-edge-litert>=2.3",
            "int8-weights": "tflite-runtime>=2.14 or ai-edge-litert>=2.3"}
# TFLite tensors have fixed shapes (litert-torch 0.10 cannot lower MiniLM with a dynamic batch or length), so the file
# carries one signature per (batch, tokens); they share the weights (six add 1.1 MiB to MiniLM's 86.7 MiB).
BATCHES = (1, 16)
TOKEN_BUCKETS = (32, 128, 256)  # and the model's max_seq_length, the last bucket

# (module, pip requirement): the converter stack, imported only when an export runs.
CONVERTER = (("torch", "torch==2.13.0"), ("transformers", "transformers==4.57.6"),
             ("litert_torch", "litert-torch==0.10.0"), ("ai_edge_quantizer", "ai-edge-quantizer==0.10.0"),
             ("ai_edge_litert.interpreter", "ai-edge-litert==2.3.0"))


@dataclass(frozen=True)
class TFLiteResult:
    path: Path
    quant: str
    signatures: tuple[str, ...]
    source_bytes: int  # the checkpoint's weights (safetensors)
    fp32_bytes: int  # the converted fp32 .tflite, before quantization
    bytes: int  # the written file
    metrics: EncoderMetrics  # this file against the torch fp32 model
    seconds: float

    @property
    def runtime(self) -> str:
        return RUNTIMES[self.quant]

    def summary(self) -> str:
        m = self.metrics
        return "\n".join((
            f"{self.path.name}: {self.quant} for {self.runtime}, {len(self.signatures)} signatures "
            f"({', '.join(self.signatures)})",
            f"  size: checkpoint {format_mib(self.source_bytes, 1)}, fp32 .tflite {format_mib(self.fp32_bytes, 1)}, "
            f"written {format_mib(self.bytes, 1)}",
            f"  vs torch fp32 on {m.sentences} sentences: cosine mean {m.cosine_mean:.5f} min {m.cosine_min:.5f}, "
            f"nearest-neighbour agreement {m.top1_agreement:.1%}, retrieval {m.candidate_accuracy:.1%} "
            f"(torch {m.reference_accuracy:.1%})",
            f"  took {self.seconds:.0f} s"))


def export_tflite(model_dir: Path, out_path: Path, quant: str = "fp32", *,
                  batches: tuple[int, ...] = BATCHES) -> TFLiteResult:
    """Convert, quantize and measure; the .tflite is written only once it has been measured."""
    if quant not in QUANTS:
        raise PackagerError(f"unknown TFLite quantization {quant!r}: choose {', '.join(QUANTS)}")
    if 1 not in batches:
        raise PackagerError(f"TFLite batch sizes {batches}: 1 must be among them (it runs what is left over)")
    out_path = Path(out_path)
    started = time.monotonic()
    source = read_source(Path(model_dir))
    modules = _converter_modules()
    buckets = tuple(t for t in TOKEN_BUCKETS if t < source.max_tokens) + (source.max_tokens,)
    shapes = [(b, t) for b in batches for t in buckets]
    model = load_torch(source)
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as tmp:
        fp32 = Path(tmp) / "fp32.tflite"
        _convert(modules, _graph_module(modules["torch"], model, source), shapes, fp32)
        candidate = fp32 if quant == "fp32" else _quantize(modules, fp32, quant, Path(tmp) / "quant.tflite")
        metrics = _measure(modules, model, source, candidate)
        fp32_bytes = fp32.stat().st_size
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(candidate, out_path)
    out_path.chmod(0o644)  # ai-edge-quantizer writes its file executable
    return TFLiteResult(out_path, quant, tuple(signature_name(b, t) for b, t in shapes),
                        sum(f.stat().st_size for f in source.path.glob("*.safetensors")), fp32_bytes,
                        out_path.stat().st_size, metrics, time.monotonic() - started)


def check_converter() -> None:
    """One line naming the pip packages when the converter stack is not installed; imports nothing."""
    missing = [requirement for name, requirement in CONVERTER if not _installed(name)]
    if missing:
        raise PackagerError(f"TFLite export needs {', '.join(missing)} (about 1 GiB on top of torch, no TensorFlow; "
                            f"docs/tflite.md): pip install {' '.join(missing)}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or set to None in sys.modules
        return False


def _converter_modules() -> dict[str, ModuleType]:
    check_converter()
    try:
        return {name: importlib.import_module(name) for name, _ in CONVERTER}
    except ImportError as exc:
        raise PackagerError(f"TFLite export: the converter stack is installed but does not import: {exc}") from None


def _graph_module(torch: ModuleType, model: Any, source: EncoderSource) -> Any:
    """encoder.py's pooled module with two changes for a fixed-shape graph: the output is named, and the segment id
    is one [1, 1] zero broadcast over the batch (zeros_like(input_ids) folds into a constant [batch, tokens, hidden]
    per signature: 10 MiB over six)."""

    class OneSegment(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            segment = torch.zeros((1, 1), dtype=input_ids.dtype)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=segment)

    pooled = pooled_module(OneSegment(), source)

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooled = pooled

        def forward(self, input_ids: Any, attention_mask: Any) -> dict[str, Any]:
            return {OUTPUT: self.pooled(input_ids, attention_mask)}

    return Named().eval()


def _convert(modules: dict[str, ModuleType], encoder: Any, shapes: list[tuple[int, int]], out: Path) -> None:
    torch, litert_torch = modules["torch"], modules["litert_torch"]
    converter: Any = litert_torch
    for batch, tokens in shapes:
        sample = {name: torch.ones((batch, tokens), dtype=torch.int32) for name in INPUTS}
        converter = converter.signature(signature_name(batch, tokens), encoder, sample_kwargs=sample)
    try:
        converter.convert().export(str(out))
    except Exception as exc:  # noqa: BLE001 - litert-torch raises torch, JAX and MLIR errors alike
        raise PackagerError(f"litert-torch could not convert the encoder: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _quantize(modules: dict[str, ModuleType], fp32: Path, quant: str, out: Path) -> Path:
    aeq = modules["ai_edge_quantizer"]
    recipe = aeq.recipe.dynamic_wi8_afp32() if quant == "int8" else aeq.recipe.weight_only_wi8_afp32()
    quantizer = aeq.quantizer.Quantizer(str(fp32))
    quantizer.load_quantization_recipe(recipe)
    quantizer.quantize(enable_progress_report=False).export_model(str(out), overwrite=True)
    return out


def _measure(modules: dict[str, ModuleType], model: Any, source: EncoderSource, tflite: Path) -> EncoderMetrics:
    from tokenizers import Tokenizer  # comes with transformers

    texts = encoder_eval.sentences()
    reference = torch_embeddings(model, source, texts)
    tokenizer = Tokenizer.from_file(str(source.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=source.max_tokens)
    interpreter = modules["ai_edge_litert.interpreter"].Interpreter(model_path=str(tflite), num_threads=2)
    candidate = embed(interpreter, [e.ids for e in tokenizer.encode_batch(texts)])
    encoder_eval.check_shapes(reference, candidate)
    return encoder_eval.compare(reference, candidate)
