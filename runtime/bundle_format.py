"""Bundle format v1: every name, limit and manifest field in one place.

The packager writes what this module defines; the device parses manifests here, at the border,
into typed objects, and rejects anything else with a message naming the field.
See docs/bundle-format.md for the specification.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EdgepackError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".zst"
BUNDLE_SUFFIX = ".edgepack"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_BLOB_BYTES = 64 * 1024**3  # one segment; far above any split a board can hold
MEDIA_GGUF_SEGMENT = "application/vnd.edgepack.gguf-split"
MEDIA_GGUF_LORA = "application/vnd.edgepack.gguf-lora"

_DIGEST_RE = re.compile(r"sha256[-:]([0-9a-f]{64})")


@dataclass(frozen=True, order=True)
class Digest:
    """A sha256 content address; canonical form `sha256-<64 hex>`."""

    hex: str

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


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int  # uncompressed bytes, as stored on the device
    zsize: int  # bytes of the zstd frame in the archive
    media_type: str = MEDIA_GGUF_SEGMENT


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    parameters: int
    file_type: str  # llama.cpp type name of the whole model, e.g. Q4_K_M
    quant_types: dict[str, int]  # ggml tensor type -> tensor count
    segments: tuple[Digest, ...]  # ordered GGUF splits; segments[0] holds the metadata
    chat_template: str | None  # manifest override (a llama.cpp built-in template name)
    context_length: int
    source: dict[str, Any] = field(default_factory=dict)  # file name, size, type of the source
    quality: dict[str, Any] = field(default_factory=dict)  # measured against the source (edgepack eval)
    plan: dict[str, Any] = field(default_factory=dict)  # per-tensor types chosen under a size budget


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    base: str  # the model it applies to
    digest: Digest  # the adapter's GGUF, one blob
    scale: float = 1.0


@dataclass(frozen=True)
class AgentInfo:
    """What clients name in "model": a model, optionally with an adapter, a system prompt, defaults."""

    name: str
    model: str
    adapter: str | None = None
    system_prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    tier: str | None = None
    latency_sla_ms: int | None = None
    semantic_cache: float | None = None  # answer by meaning at this cosine similarity (opt-in)
    cache_sampled: bool = False  # cache answers to requests with temperature > 0 too


@dataclass(frozen=True)
class RuntimeDefaults:
    threads: int | None = None  # None: physical cores of the device
    n_ctx: int = 4096
    n_batch: int = 512
    max_tokens: int = 512


@dataclass(frozen=True)
class Manifest:
    name: str
    bundle_version: int
    created: str
    builder: str
    llama_cpp_version: str
    board: str
    models: tuple[ModelInfo, ...]
    runtime: RuntimeDefaults
    blobs: dict[Digest, BlobInfo]
    adapters: tuple[AdapterInfo, ...] = ()
    agents: tuple[AgentInfo, ...] = ()  # empty: every model is an agent of its own name
    delta_since: str | None = None  # a delta bundle: the blobs of this release are not in the archive
    format_version: int = FORMAT_VERSION

    def agent_list(self) -> tuple[AgentInfo, ...]:
        return self.agents or tuple(AgentInfo(m.name, m.name) for m in self.models)

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

    def model(self, name: str | None) -> ModelInfo:
        if name is None:
            return self.models[0]
        for model in self.models:
            if model.name == name:
                return model
        raise EdgepackError(f"bundle {self.name!r} has no model {name!r}")

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "name": self.name,
            "bundle_version": self.bundle_version,
            "created": self.created,
            "builder": self.builder,
            "llama_cpp_version": self.llama_cpp_version,
            "board": self.board,
            "models": [
                {**asdict(m), "segments": [str(d) for d in m.segments]} for m in self.models
            ],
            "adapters": [{**asdict(a), "digest": str(a.digest)} for a in self.adapters],
            "agents": [asdict(a) for a in self.agents],
            "delta_since": self.delta_since,
            "runtime": asdict(self.runtime),
            "blobs": {
                str(d): {"size": b.size, "zsize": b.zsize, "media_type": b.media_type}
                for d, b in sorted(self.blobs.items())
            },
        }
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, origin: str = MANIFEST_NAME) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise EdgepackError(f"{origin}: manifest is {len(data)} bytes, limit {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgepackError(f"{origin}: not valid JSON ({exc})") from None
        return _parse_manifest(_Fields(doc, origin))


class _Fields:
    """Typed access to one JSON object; errors name the file and the field path."""

    def __init__(self, doc: Any, where: str, path: str = "") -> None:
        self.where, self.path = where, path
        if not isinstance(doc, dict):
            self.fail("", "an object", doc)
        self.doc = doc

    def fail(self, key: str, expected: str, got: Any) -> None:
        name = f"{self.path}.{key}" if self.path and key else (self.path or key or "top level")
        shown = repr(got) if len(repr(got)) < 60 else type(got).__name__
        raise EdgepackError(f"{self.where}: {name}: expected {expected}, got {shown}")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = ...) -> Any:
        if key not in self.doc:
            if default is not ...:
                return default
            self.fail(key, expected, "<missing>")
        value = self.doc[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.fail(key, expected, value)
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, "a string", default)

    def count(self, key: str, default: Any = ..., minimum: int = 0) -> int:
        value = self.get(key, int, f"an integer >= {minimum}", default)
        if value is not None and value < minimum:
            self.fail(key, f"an integer >= {minimum}", value)
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict, "an object"), self.where, self._join(key))

    def items(self, key: str) -> list[_Fields]:
        values = self.get(key, list, "a list")
        return [_Fields(v, self.where, f"{self._join(key)}[{i}]") for i, v in enumerate(values)]

    def digest(self, value: Any, key: str) -> Digest:
        try:
            return Digest.parse(value)
        except EdgepackError:
            self.fail(key, "'sha256-<64 hex>'", value)
            raise  # unreachable: fail() raises

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _parse_manifest(f: _Fields) -> Manifest:
    version = f.count("format_version")
    if version != FORMAT_VERSION:
        raise EdgepackError(
            f"{f.where}: format_version {version} is not supported (this edgepack reads {FORMAT_VERSION})"
        )
    blobs: dict[Digest, BlobInfo] = {}
    blob_doc = f.get("blobs", dict, "an object")
    if not blob_doc:
        f.fail("blobs", "at least one blob", blob_doc)
    for key in blob_doc:
        digest = f.digest(key, f"blobs[{key!r}]")
        b = _Fields(blob_doc[key], f.where, f"blobs[{key}]")
        size = b.count("size")
        zsize = b.count("zsize", minimum=1)
        if size > MAX_BLOB_BYTES:
            b.fail("size", f"at most {MAX_BLOB_BYTES} bytes", size)
        blobs[digest] = BlobInfo(digest, size, zsize, b.text("media_type", MEDIA_GGUF_SEGMENT))
    models = tuple(_parse_model(m, blobs) for m in f.items("models"))
    if not models:
        f.fail("models", "at least one model", [])
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        f.fail("models", "unique model names", names)
    r = f.obj("runtime")
    runtime = RuntimeDefaults(
        threads=r.get("threads", (int, type(None)), "an integer or null", None),
        n_ctx=r.count("n_ctx", 4096, minimum=16),
        n_batch=r.count("n_batch", 512, minimum=1),
        max_tokens=r.count("max_tokens", 512, minimum=1),
    )
    model_names = {m.name for m in models}
    adapters = tuple(_parse_adapter(a, blobs, model_names) for a in f.items("adapters")) if "adapters" in f.doc else ()
    adapter_base = {a.name: a.base for a in adapters}
    agents = tuple(_parse_agent(a, model_names, adapter_base) for a in f.items("agents")) if "agents" in f.doc else ()
    for kind, names in (("adapters", [a.name for a in adapters]), ("agents", [a.name for a in agents])):
        if len(set(names)) != len(names):
            f.fail(kind, "unique names", names)
    return Manifest(
        adapters=adapters,
        agents=agents,
        delta_since=f.get("delta_since", (str, type(None)), "a string or null", None),
        name=_safe_name(f, "name"),
        bundle_version=f.count("bundle_version"),
        created=f.text("created"),
        builder=f.text("builder"),
        llama_cpp_version=f.text("llama_cpp_version"),
        board=f.text("board"),
        models=models,
        runtime=runtime,
        blobs=blobs,
        format_version=version,
    )


def _parse_model(m: _Fields, blobs: dict[Digest, BlobInfo]) -> ModelInfo:
    segments = []
    for i, value in enumerate(m.get("segments", list, "a list of digests")):
        digest = m.digest(value, f"segments[{i}]")
        if digest not in blobs:
            m.fail(f"segments[{i}]", "a digest listed in blobs", value)
        segments.append(digest)
    if not segments:
        m.fail("segments", "at least one segment", [])
    quant_types = m.get("quant_types", dict, "an object of type -> count", {})
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in quant_types.items()):
        m.fail("quant_types", "an object of type -> count", quant_types)
    return ModelInfo(
        name=_safe_name(m, "name"),
        architecture=m.text("architecture"),
        parameters=m.count("parameters"),
        file_type=m.text("file_type"),
        quant_types=quant_types,
        segments=tuple(segments),
        chat_template=m.get("chat_template", (str, type(None)), "a string or null", None),
        context_length=m.count("context_length", 0),
        source=m.get("source", dict, "an object", {}),
        quality=m.get("quality", dict, "an object", {}),
        plan=m.get("plan", dict, "an object", {}),
    )


def _parse_adapter(a: _Fields, blobs: dict[Digest, BlobInfo], models: set[str]) -> AdapterInfo:
    digest = a.digest(a.get("digest", str, "a digest"), "digest")
    if digest not in blobs:
        a.fail("digest", "a digest listed in blobs", str(digest))
    base = a.text("base")
    if base not in models:
        a.fail("base", "the name of a model of this bundle", base)
    scale = a.get("scale", (int, float), "a number", 1.0)
    return AdapterInfo(_safe_name(a, "name"), base, digest, float(scale))


def _parse_agent(a: _Fields, models: set[str], adapter_base: dict[str, str]) -> AgentInfo:
    model = a.text("model")
    if model not in models:
        a.fail("model", "the name of a model of this bundle", model)
    adapter = a.get("adapter", (str, type(None)), "a string or null", None)
    if adapter is not None and adapter_base.get(adapter) != model:
        a.fail("adapter", f"an adapter of model {model!r}", adapter)
    sampling = a.get("sampling", dict, "an object", {})
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in sampling.values()):
        a.fail("sampling", "an object of numbers", sampling)
    return AgentInfo(
        name=_safe_name(a, "name"), model=model, adapter=adapter,
        system_prompt=a.get("system_prompt", (str, type(None)), "a string or null", None),
        sampling=sampling, tier=a.get("tier", (str, type(None)), "a string or null", None),
        latency_sla_ms=a.get("latency_sla_ms", (int, type(None)), "an integer or null", None),
        semantic_cache=_threshold(a, a.get("semantic_cache", (int, float, type(None)), "a number or null", None)),
        cache_sampled=a.get("cache_sampled", bool, "true or false", False),
    )


def _threshold(f: _Fields, value: float | None) -> float | None:
    if value is not None and not 0.5 <= value <= 1:
        f.fail("semantic_cache", "a cosine similarity between 0.5 and 1", value)
    return None if value is None else float(value)


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _safe_name(f: _Fields, key: str) -> str:
    """Names become file names and URL parts on the device: keep them boring."""
    value = f.text(key)
    if not _NAME_RE.fullmatch(value):
        f.fail(key, "a name of letters, digits, '.', '_' or '-' (max 64)", value)
    return value


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise EdgepackError(
            f"{what} {value!r} is not a valid name: use letters, digits, '.', '_' or '-' (max 64)"
        )
    return value
