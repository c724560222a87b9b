"""Bundle format v1: every name, limit and manifest field in one place.

The packager writes what this module defines; the device parses manifests here, at the border, with one
declarative schema (msgspec Structs), into typed objects, and rejects anything else with a message naming
the field. Unknown fields are refused: a typo must not be silently ignored.
See docs/bundle-format.md for the specification.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Annotated, Any, Literal

import msgspec

from .errors import EdgepackError
from .sampling import SamplingParams
from .schema import Name, Strict, decode_json
from .tool_spec import Tool

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # optional, right after the manifest: runtime/signatures.py
MAX_SIGNATURE_BYTES = 4096
MAX_PAX_HEADER_BYTES = 4096  # a pax extended header (the writer needs one only for a blob over 8 GiB)
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".zst"
BUNDLE_SUFFIX = ".edgepack"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_BLOB_BYTES = 64 * 1024**3  # one segment; far above any split a board can hold
MEDIA_GGUF_SEGMENT = "application/vnd.edgepack.gguf-split"
MEDIA_GGUF_LORA = "application/vnd.edgepack.gguf-lora"
MEDIA_ONNX_GRAPH = "application/vnd.edgepack.onnx-graph"  # an encoder's graph; its big tensors are external data
MEDIA_ONNX_TENSOR = "application/vnd.edgepack.onnx-tensor"  # one external-data tensor's raw bytes
MEDIA_TOKENIZER = "application/vnd.edgepack.tokenizer-json"  # Hugging Face tokenizers' tokenizer.json
MEDIA_TFLITE = "application/vnd.edgepack.tflite"  # an encoder as one .tflite file (its weights inside)

_DIGEST_RE = re.compile(r"sha256[-:]([0-9a-f]{64})")


@functools.total_ordering
class Digest:
    """A sha256 content address; canonical form `sha256-<64 hex>`. A plain value class, not a dataclass, so
    the schema layer decodes it from (and encodes it to) its string form, dictionary keys included."""

    __slots__ = ("hex",)

    def __init__(self, hex: str) -> None:
        self.hex = hex

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Digest) and other.hex == self.hex

    def __lt__(self, other: Digest) -> bool:
        return self.hex < other.hex

    def __hash__(self) -> int:
        return hash(self.hex)

    def __repr__(self) -> str:
        return f"Digest({self.hex!r})"

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise EdgepackError(f"invalid digest {text!r}: expected 'sha256-<64 lowercase hex>'")
        return cls(match.group(1))

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256-{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]

    @property
    def member_name(self) -> str:
        """The archive member that carries this blob."""
        return f"{BLOB_DIR}/{self}{BLOB_SUFFIX}"


Count = Annotated[int, msgspec.Meta(ge=0)]
Tier = Literal["critical", "general", "low-risk"]  # tolerance tiers (their thresholds: packager/gates.py)


class BlobInfo(Strict):
    """One blob, as the manifest's `blobs` object lists it under its digest."""

    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOB_BYTES)]  # uncompressed bytes, as stored on the device
    zsize: Annotated[int, msgspec.Meta(ge=1)]  # bytes of the zstd frame in the archive
    media_type: str = MEDIA_GGUF_SEGMENT


class ModelInfo(Strict):
    name: Name
    architecture: str
    parameters: Count
    file_type: str  # llama.cpp type name of the whole model, e.g. Q4_K_M
    quant_types: dict[str, int]  # ggml tensor type -> tensor count
    segments: Annotated[tuple[Digest, ...], msgspec.Meta(min_length=1)]  # ordered GGUF splits; [0] the metadata
    chat_template: str | None  # manifest override (a llama.cpp built-in template name)
    context_length: Count = 0
    source: dict[str, Any] = {}  # file name, size, type of the source
    quality: dict[str, Any] = {}  # measured against the source (edgepack eval)
    plan: dict[str, Any] = {}  # per-tensor types chosen under a size budget


class AdapterInfo(Strict):
    name: Name
    base: str  # the model it applies to
    digest: Digest  # the adapter's GGUF, one blob
    scale: float = 1.0


class TFLiteGraph(Strict):
    """The same encoder as one .tflite file (docs/tflite.md): fixed-shape signatures `embed_{batch}x{tokens}`, int32
    inputs named as the ONNX graph's, pooling and normalisation inside; the weights are in the file."""

    digest: Digest
    quant: Literal["fp32", "int8", "int8-weights"]
    quality: dict[str, Any] = {}  # measured against the source model


class EncoderInfo(Strict):
    """A sentence encoder (docs/encoders.md): an ONNX graph run by ONNX Runtime, whose large tensors are external
    data, one blob each, named by their digests (so encoders built from one base share them), and/or the same
    encoder as a .tflite file; a tokenizer.json either way. The device picks the runtime (runtime/encoder.py)."""

    name: Name  # what clients put in "model" of /v1/embeddings
    architecture: str  # of the source checkpoint, e.g. bert
    graph: Digest | None  # the ONNX graph; external data locations are `sha256-<hex>` of `segments`
    segments: tuple[Digest, ...]  # the external-data tensors, in the graph's order of first use
    tokenizer: Digest
    dimensions: Annotated[int, msgspec.Meta(ge=1)]  # width of the graph's (pooled, normalised) output
    pooling: Literal["mean", "cls"]  # done inside the graph; recorded for clients and reports
    normalize: bool  # the graph's output is L2-normalised
    max_tokens: Annotated[int, msgspec.Meta(ge=2)]  # longer inputs are cut to this many tokens
    quant: Literal["int8", "fp32"] | None  # of the ONNX graph; None without one (tflite.quant says the file's)
    parameters: Count = 0
    source: dict[str, Any] = {}
    quality: dict[str, Any] = {}  # of the ONNX graph, measured against the source model (packager/encoder.py)
    tflite: TFLiteGraph | None = None

    def __post_init__(self) -> None:
        if self.graph is None and self.tflite is None:
            raise ValueError(f"encoder {self.name!r}: expected an ONNX graph, a tflite file or both, got neither")
        if self.graph is None and (self.segments or self.quant is not None):
            raise ValueError(f"encoder {self.name!r}: segments and quant belong to an ONNX graph, and it has none")
        if self.graph is not None and self.quant is None:
            raise ValueError(f"encoder {self.name!r}: quant: expected int8 or fp32 for its ONNX graph, got none")

    def runtimes(self) -> tuple[str, ...]:
        """What can run it: "onnx", "tflite" or both, in that order."""
        return tuple(r for r, present in (("onnx", self.graph), ("tflite", self.tflite)) if present is not None)


Threshold = Annotated[float, msgspec.Meta(ge=0.5, le=1.0)]  # cosine similarity


class SemanticCacheConfig(Strict):
    """An agent's semantic cache: `threshold` alone (written as a bare number) embeds with the served model itself;
    `embedder` names one of the bundle's encoders to embed with instead (docs/semantic-cache.md)."""

    threshold: Threshold = 0.9
    embedder: str | None = None


class AgentInfo(Strict):
    """What clients name in "model": a model, optionally with an adapter, a system prompt, defaults."""

    name: Name
    model: str
    adapter: str | None = None
    system_prompt: str | None = None
    sampling: SamplingParams = SamplingParams()
    tier: Tier | None = None
    latency_sla_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    semantic_cache: Threshold | SemanticCacheConfig | None = None  # answer by meaning (opt-in)
    cache_sampled: bool = False  # cache answers to requests with temperature > 0 too
    shadow_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # as a candidate: share replayed
    speculate: bool = True  # False: serve never drafts this agent's tokens (speculative decoding)
    tools: tuple[Tool, ...] = ()  # offered when a request sends none
    tool_choice: str | None = None  # auto, none, required or one of the tools' names; a request's own wins

    @property
    def semantic_threshold(self) -> float | None:
        cache = self.semantic_cache
        return cache.threshold if isinstance(cache, SemanticCacheConfig) else cache

    @property
    def semantic_embedder(self) -> str | None:
        """The encoder this agent's semantic cache embeds with; None: the served model's own embedding."""
        return self.semantic_cache.embedder if isinstance(self.semantic_cache, SemanticCacheConfig) else None

    def __post_init__(self) -> None:
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"agent {self.name!r}: tools: expected unique function names, got {names}")
        if self.tool_choice not in (None, "none", "auto", "required", *names):
            raise ValueError(f"agent {self.name!r}: tool_choice: expected auto, none, required or one of its tools' "
                             f"names, got {self.tool_choice!r}")


class RuntimeDefaults(Strict):
    threads: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: physical cores of the device
    n_ctx: Annotated[int, msgspec.Meta(ge=16)] = 4096
    n_batch: Annotated[int, msgspec.Meta(ge=1)] = 512
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 512


class Manifest(Strict, kw_only=True):
    format_version: int = FORMAT_VERSION
    name: Name
    bundle_version: Count
    created: str
    builder: str
    llama_cpp_version: str
    board: str
    models: tuple[ModelInfo, ...]  # empty only in a bundle of encoders
    encoders: tuple[EncoderInfo, ...] = ()
    adapters: tuple[AdapterInfo, ...] = ()
    agents: tuple[AgentInfo, ...] = ()  # empty: every model is an agent of its own name
    delta_since: str | None = None  # a delta bundle: the blobs of this release are not in the archive
    auto_promote: bool = False  # as a candidate: promoted when its decisions agree within its agents' tiers
    runtime: RuntimeDefaults = RuntimeDefaults()
    blobs: Annotated[dict[Digest, BlobInfo], msgspec.Meta(min_length=1)] = {}

    def __post_init__(self) -> None:
        """What one field cannot say alone: names unique, references resolvable (raised as the schema's error)."""
        if not self.models and not self.encoders:
            raise ValueError("models: expected at least one model (or an encoder), got none")
        for kind, names in (("models", [m.name for m in self.models]), ("adapters", [a.name for a in self.adapters]),
                            ("agents", [a.name for a in self.agents]),
                            ("encoders", [e.name for e in self.encoders]
                             + sorted({a.name for a in self.agent_list()} | {m.name for m in self.models}))):
            if len(set(names)) != len(names):  # encoders: clients name both in "model", so none may be an agent's
                raise ValueError(f"{kind}: expected unique names, got {names}")
        for i, encoder in enumerate(self.encoders):
            for field, digests in (("graph", [encoder.graph] if encoder.graph else []),
                                   ("tokenizer", [encoder.tokenizer]), ("segments", encoder.segments),
                                   ("tflite.digest", [encoder.tflite.digest] if encoder.tflite else [])):
                for digest in digests:
                    if digest not in self.blobs:
                        raise ValueError(f"encoders[{i}].{field}: expected a digest listed in blobs, got {digest}")
        for i, model in enumerate(self.models):
            for j, digest in enumerate(model.segments):
                if digest not in self.blobs:
                    raise ValueError(f"models[{i}].segments[{j}]: expected a digest listed in blobs, got {digest}")
        models = {m.name for m in self.models}
        for i, adapter in enumerate(self.adapters):
            if adapter.digest not in self.blobs:
                raise ValueError(f"adapters[{i}].digest: expected a digest listed in blobs, got {adapter.digest}")
            if adapter.base not in models:
                raise ValueError(f"adapters[{i}].base: expected the name of a model of this bundle, got "
                                 f"{adapter.base!r}")
        adapter_base = {a.name: a.base for a in self.adapters}
        encoders = {e.name for e in self.encoders}
        for i, agent in enumerate(self.agents):
            if agent.semantic_embedder is not None and agent.semantic_embedder not in encoders:
                raise ValueError(f"agents[{i}].semantic_cache.embedder: expected the name of an encoder of this "
                                 f"bundle, got {agent.semantic_embedder!r}")
            if agent.model not in models:
                raise ValueError(f"agents[{i}].model: expected the name of a model of this bundle, got {agent.model!r}")
            if agent.adapter is not None and adapter_base.get(agent.adapter) != agent.model:
                raise ValueError(f"agents[{i}].adapter: expected an adapter of model {agent.model!r}, got "
                                 f"{agent.adapter!r}")

    def agent_list(self) -> tuple[AgentInfo, ...]:
        return self.agents or tuple(AgentInfo(name=m.name, model=m.name) for m in self.models)

    def agent_digest(self, agent: AgentInfo) -> str:
        """A content address of what answers for an agent: its model's segments and its adapter."""
        parts = [str(d) for d in self.model(agent.model).segments]
        if agent.adapter:
            parts.append(str(self.adapter(agent.adapter).digest))
        return Digest.of_bytes("|".join(parts).encode()).hex

    def adapter(self, name: str) -> AdapterInfo:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        raise EdgepackError(f"bundle {self.name!r} has no adapter {name!r}")

    def encoder(self, name: str) -> EncoderInfo:
        for encoder in self.encoders:
            if encoder.name == name:
                return encoder
        raise EdgepackError(f"bundle {self.name!r} has no encoder {name!r}")

    def model(self, name: str | None) -> ModelInfo:
        if name is None:
            return self.models[0]
        for model in self.models:
            if model.name == name:
                return model
        raise EdgepackError(f"bundle {self.name!r} has no model {name!r}")

    def to_json(self) -> bytes:
        doc = msgspec.to_builtins(self, enc_hook=str)
        doc["blobs"] = dict(sorted(doc["blobs"].items()))
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, origin: str = MANIFEST_NAME) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise EdgepackError(f"{origin}: manifest is {len(data)} bytes, limit {MAX_MANIFEST_BYTES}")
        # The version first: a newer format may have fields this reader would call unknown.
        version = decode_json(data, _Versioned, origin).format_version
        if version != FORMAT_VERSION:
            raise EdgepackError(
                f"{origin}: format_version {version} is not supported (this edgepack reads {FORMAT_VERSION})"
            )
        return decode_json(data, cls, origin, dec_hook=_decode_digest)


class _Versioned(msgspec.Struct):
    format_version: int


def _decode_digest(kind: type, value: Any) -> Any:
    if kind is Digest:
        if isinstance(value, str) and (match := _DIGEST_RE.fullmatch(value)):
            return Digest(match.group(1))
        raise ValueError(f"expected 'sha256-<64 lowercase hex>', got {value!r:.80}")
    raise NotImplementedError(kind)

