"""A sentence encoder (a Hugging Face BERT checkpoint in sentence-transformers form) -> an ONNX bundle: export with
torch.onnx, fuse with ONNX Runtime's transformer optimizer, quantize weights to INT8 dynamically, cut the large tensors
into content-addressed blobs, measure against the source model in torch and gate by a tolerance tier
(docs/encoders.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edgepack.runtime.bundle_format import (
    MEDIA_ONNX_GRAPH,
    MEDIA_ONNX_TENSOR,
    MEDIA_TFLITE,
    MEDIA_TOKENIZER,
    Digest,
    EncoderInfo,
    Manifest,
    TFLiteGraph,
)
from edgepack.runtime.encoder import INPUTS, OUTPUT, Encoder
from edgepack.runtime.files import sha256_file

from . import bundle_writer, encoder_eval
from .errors import PackagerError

# The .tflite file of an encoder (its weights inside). Here until runtime/bundle_format.py names it beside the others.
EXTERNAL_MIN_BYTES = 16 * 1024  # tensors from this size are blobs of their own; smaller ones stay in the graph
OPSET = 17
QUANTS = ("int8", "fp32")
_ARCHITECTURES = {"BertModel": "bert"}  # what ONNX Runtime's optimizer fuses (model_type) and this export handles


@dataclass(frozen=True)
class EncoderSource:
    """A checkpoint directory, read and checked at the border."""

    path: Path
    architecture: str  # ONNX Runtime optimizer's model_type
    hidden_size: int
    heads: int
    parameters: int
    pooling: str  # mean | cls
    normalize: bool
    max_tokens: int

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"


@dataclass(frozen=True)
class EncoderBuild:
    info: EncoderInfo
    blobs: dict[Digest, Path]  # the graph, tensors and tokenizer, as files named by digest in the work directory
    bytes: int  # graph + weights as built
    seconds: dict[str, float]  # per step


def read_source(path: Path) -> EncoderSource:
    """The checkpoint's config, pooling and tokenizer; refused with one line if this exporter cannot take it."""
    config = _json(path / "config.json")
    architectures = config.get("architectures") or []
    kind = next((_ARCHITECTURES[a] for a in architectures if a in _ARCHITECTURES), None)
    if kind is None:
        raise PackagerError(f"{path / 'config.json'}: architectures {architectures}: expected one of "
                            f"{sorted(_ARCHITECTURES)} (a sentence encoder)")
    if not (path / "tokenizer.json").is_file():
        raise PackagerError(f"{path}: no tokenizer.json (the device runs the encoder's tokenizer from it)")
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise PackagerError(f"{path}: no model.safetensors or pytorch_model.bin")
    pooling_file = path / "1_Pooling" / "config.json"
    pooling = _json(pooling_file) if pooling_file.is_file() else {"pooling_mode_mean_tokens": True}
    flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
    modes = [mode for mode, key in flags.items() if pooling.get(key)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in flags.values()]
    if len(modes) != 1 or others:
        raise PackagerError(f"{pooling_file}: expected mean or CLS pooling alone, got {pooling}")
    modules = _json(path / "modules.json") if (path / "modules.json").is_file() else []
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    bert_config = path / "sentence_bert_config.json"
    max_tokens = _json(bert_config).get("max_seq_length") if bert_config.is_file() else None
    return EncoderSource(path, kind, int(config["hidden_size"]), int(config["num_attention_heads"]),
                         _parameters(path), modes[0], normalize,
                         int(max_tokens or config.get("max_position_embeddings", 512)))


def build_encoder(source: EncoderSource, name: str, quant: str, work: Path, *, threads: int,
                  log: Callable[[str], None] = lambda line: None) -> tuple[EncoderBuild, EncoderBuild | None]:
    """The encoder as built (`quant`) and, for INT8, the fp32 export it was quantized from (for sizes and reports);
    both measured against the source model in torch. Files go to `work`."""
    if quant not in QUANTS:
        raise PackagerError(f"unknown encoder quantization {quant!r}: choose {', '.join(QUANTS)}")
    seconds: dict[str, float] = {}
    started = time.monotonic()
    model = load_torch(source)
    log(f"loaded {source.path.name} in torch in {time.monotonic() - started:.1f}s")
    reference = torch_embeddings(model, source, encoder_eval.sentences())
    exported = work / "export.onnx"
    _export(model, source, exported)
    seconds["export"] = time.monotonic() - started
    log(f"exported {source.path.name} to ONNX (opset {OPSET}) in {seconds['export']:.1f}s")
    started = time.monotonic()
    optimized = work / "fp32.onnx"
    _optimize(source, exported, optimized)
    seconds["optimize"] = time.monotonic() - started
    fp32 = _cut(optimized, work / "fp32", name, "fp32", source, reference, dict(seconds))
    if quant == "fp32":
        return fp32, None
    started = time.monotonic()
    quantized = work / "int8.onnx"
    _quantize(optimized, quantized)
    seconds["quantize"] = time.monotonic() - started
    log(f"quantized to INT8 in {seconds['quantize']:.1f}s")
    return _cut(quantized, work / "int8", name, "int8", source, reference, seconds), fp32


def write_bundle(builds: list[EncoderBuild], out: Path, *, name: str, board: str, created: str, mtime: int,
                 bundle_version: int, builder: str, work: Path, level: int = 19, key: Any = None) -> Manifest:
    """A bundle of encoders alone (no LLM): each blob compressed once, however many encoders name it."""
    from edgepack.runtime import llama  # the bundle records the llama.cpp build beside it, as every bundle does

    compressed: dict[Digest, bundle_writer.CompressedBlob] = {}
    for build in builds:
        for digest, path in build.blobs.items():
            if digest not in compressed:
                compressed[digest] = bundle_writer.compress(path, digest, work, level, lambda n: None,
                                                            media_type(build.info, digest))
    manifest = Manifest(name=name, bundle_version=bundle_version, created=created, builder=builder,
                        llama_cpp_version=llama.version(), board=board, models=(),
                        encoders=tuple(b.info for b in builds),
                        blobs={d: c.info for d, c in sorted(compressed.items())})
    bundle_writer.write_archive(out, manifest, list(compressed.values()), mtime, key)
    return manifest


def with_quality(build: EncoderBuild, **extra: Any) -> EncoderBuild:
    """The build with `extra` recorded in its manifest entry's quality (the tier it was gated by, the verdict)."""
    info = msgspec.structs.replace(build.info, quality={**build.info.quality, **extra})
    return dataclasses.replace(build, info=info)


def with_tflite(build: EncoderBuild | None, source: EncoderSource, name: str, tflite: Path, quant: str,
                quality: dict[str, Any]) -> EncoderBuild:
    """The encoder with its .tflite file (packager/tflite_export.py) as one more blob: beside the ONNX build, or, with
    `build` None, alone (no graph, no segments: the tokenizer and the file)."""
    digest = Digest(sha256_file(tflite))
    graph = TFLiteGraph(digest=digest, quant=quant, quality=quality)
    if build is not None:
        info = msgspec.structs.replace(build.info, tflite=graph)
        return EncoderBuild(info, {**build.blobs, digest: tflite}, build.bytes, build.seconds)
    tokenizer = Digest(sha256_file(source.tokenizer))
    info = EncoderInfo(name=name, architecture=source.architecture, graph=None, segments=(), tokenizer=tokenizer,
                       dimensions=source.hidden_size,  # mean or CLS pooling keeps the hidden width
                       pooling=source.pooling, normalize=source.normalize, max_tokens=source.max_tokens,
                       quant=None,  # of an ONNX graph, and there is none: the file's is tflite.quant
                       parameters=source.parameters, source={"dir": source.path.name}, tflite=graph)
    return EncoderBuild(info, {digest: tflite, tokenizer: source.tokenizer}, tflite.stat().st_size, {})


def media_type(info: EncoderInfo, digest: Digest) -> str:
    if digest == info.graph:
        return MEDIA_ONNX_GRAPH
    if info.tflite is not None and digest == info.tflite.digest:
        return MEDIA_TFLITE
    return MEDIA_TOKENIZER if digest == info.tokenizer else MEDIA_ONNX_TENSOR


# ---- steps ----

def load_torch(source: EncoderSource) -> Any:
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise PackagerError(f"exporting an encoder needs torch and transformers (pip install 'edgepack[convert]'): "
                            f"{exc}") from None
    # eager attention: the exported graph then has the plain pattern ONNX Runtime's optimizer fuses
    return AutoModel.from_pretrained(source.path, attn_implementation="eager").eval()


def pooled_module(model: Any, source: EncoderSource) -> Any:
    """The checkpoint with its sentence-transformers head (pooling, normalisation) as one torch module."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            if source.pooling == "cls":
                pooled = states[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if source.normalize else pooled

    return Pooled().eval()


def torch_embeddings(model: Any, source: EncoderSource, texts: list[str]) -> np.ndarray:
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source.tokenizer))
    tokenizer.enable_truncation(max_length=source.max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
    encodings = tokenizer.encode_batch(texts)
    with torch.inference_mode():  # one padded batch; the mask keeps padding out of the pooled result
        vectors = pooled_module(model, source)(torch.tensor([e.ids for e in encodings]),
                                         torch.tensor([e.attention_mask for e in encodings]))
    return vectors.numpy().astype(np.float32)


def _export(model: Any, source: EncoderSource, target: Path) -> None:
    """The TorchScript exporter (dynamo=False): BERT traces cleanly and the graph has the node patterns ONNX Runtime's
    BERT fusions expect; the dynamo exporter would need onnxscript on the host for no gain here."""
    import warnings

    import torch

    example = torch.ones(2, 8, dtype=torch.int64)
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice about itself
        torch.onnx.export(pooled_module(model, source), (example, example), str(target), input_names=list(INPUTS),
                          output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUTS[0]: axes, INPUTS[1]: axes, OUTPUT: {0: "batch"}})


def _optimize(source: EncoderSource, exported: Path, target: Path) -> None:
    """ONNX Runtime's transformer fusions (attention, embedding + layer norm, skip layer norm, bias + GELU) into its
    contrib operators, which every CPU build of ONNX Runtime runs. opt_level 0: only these portable fusions; the
    hardware-specific graph optimisations happen on the device when the session loads."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(str(exported), model_type=source.architecture, num_heads=source.heads,
                               hidden_size=source.hidden_size, opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(target))


def _quantize(optimized: Path, target: Path) -> None:
    """Dynamic 8-bit: weights stored as uint8 with a scale and zero point per output channel, activations quantized
    per batch at run time. Per channel, not per tensor: for MiniLM a scale per tensor gave a mean cosine to the
    source of 0.971 (min 0.941), per channel 0.994 (min 0.992) at +0.5% size (docs/encoders.md)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process applies to static quantization
    # DefaultTensorType: the fused contrib operators' outputs have no inferred type; they are float
    quantize_dynamic(str(optimized), str(target), weight_type=QuantType.QUInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _cut(model_path: Path, folder: Path, name: str, quant: str, source: EncoderSource, reference: np.ndarray,
         seconds: dict[str, float]) -> EncoderBuild:
    """Move every large tensor out of the graph into a blob of its own raw bytes, named by its digest, so the same
    tensor in another encoder is the same blob; then load the result as the device would and measure it."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    folder.mkdir()
    model = onnx.load(str(model_path))
    blobs: dict[Digest, Path] = {}
    segments: list[Digest] = []
    for tensor in model.graph.initializer:
        data = numpy_helper.to_array(tensor).tobytes()
        if len(data) < EXTERNAL_MIN_BYTES:
            continue
        digest = Digest.of_bytes(data)
        if digest not in blobs:
            blobs[digest] = folder / str(digest)
            blobs[digest].write_bytes(data)
            segments.append(digest)
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.raw_data = data
        external_data_helper.set_external_data(tensor, location=str(digest), offset=0, length=len(data))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
    graph = model.SerializeToString()
    graph_digest = Digest.of_bytes(graph)
    blobs[graph_digest] = folder / str(graph_digest)
    blobs[graph_digest].write_bytes(graph)
    tokenizer = source.tokenizer.read_bytes()
    tokenizer_digest = Digest.of_bytes(tokenizer)
    blobs[tokenizer_digest] = folder / str(tokenizer_digest)
    blobs[tokenizer_digest].write_bytes(tokenizer)
    info = EncoderInfo(name=name, architecture=source.architecture, graph=graph_digest, segments=tuple(segments),
                       tokenizer=tokenizer_digest, dimensions=int(reference.shape[1]), pooling=source.pooling,
                       normalize=source.normalize, max_tokens=source.max_tokens, quant=quant,
                       parameters=source.parameters, source={"dir": source.path.name})
    started = time.monotonic()
    encoder = Encoder(info, blobs[graph_digest], blobs[tokenizer_digest], threads=2)
    candidate = encoder.embed(encoder_eval.sentences())[0]
    encoder.close()
    encoder_eval.check_shapes(reference, candidate)
    seconds = {**seconds, "measure": time.monotonic() - started}
    metrics = encoder_eval.compare(reference, candidate)
    info = msgspec.structs.replace(info, quality=metrics.as_dict())
    size = sum(blobs[d].stat().st_size for d in (graph_digest, *segments))
    return EncoderBuild(info, blobs, size, seconds)


def _parameters(path: Path) -> int:
    weights = path / "model.safetensors"
    if not weights.is_file():
        return 0
    with open(weights, "rb") as file:  # the safetensors header: 8 bytes of length, then JSON with every shape
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    return sum(int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackagerError(f"{path}: not found (expected a Hugging Face checkpoint directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackagerError(f"{path}: not valid JSON ({exc})") from None

