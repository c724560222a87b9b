"""The loaded models, within a memory budget: loaded on first request, evicted when idle.

A model is loaded (its segments memory-mapped from the store, its context allocated, warmed up) the
first time a request names it, or at start with `--preload`. Before its context is allocated the pool
checks the budget: weights not yet mapped by another loaded model (shared segments count once), plus
its KV cache and compute buffers. When that does not fit, idle models (no request in flight) are
evicted, least recently used first; then the context is shrunk (halving, down to 256 tokens per slot);
when even that does not fit the request is refused (HTTP 503) and nothing is allocated. A model no
request has used for `keep_alive` seconds is evicted by `evict_expired`. Encoders (ONNX Runtime sessions for
/v1/embeddings, runtime/encoder.py) live in the same budget: loaded on first use, counted at their measured size,
evicted with the models, least recently used first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .bundle_format import AgentInfo, Digest, Manifest
from .encoder import Encoder, Runtime, choose_runtime, encoder_blobs, open_encoder
from .encoder_tflite import MEMORY_FACTOR as TFLITE_MEMORY_FACTOR
from .engine import Engine
from .errors import EdgepackError
from .files import sha256_file
from .memory import (
    HEADROOM,
    Budget,
    ModelShape,
    context_bytes,
    fit_context,
    format_mib,
    process_memory,
    return_freed_memory,
)
from .scheduler import BatchScheduler, Prefix, SlotCache
from .serve_config import ServeConfig, repacked_models
from .store import Store
from .warmup import WARMUP_STAGES, WarmupReport, concurrent_stage, prefix_stage, singles_stage


class DoesNotFit(EdgepackError):
    """The model cannot be loaded within the memory budget (now: `busy` says whether waiting may help)."""

    def __init__(self, message: str, busy: bool) -> None:
        super().__init__(message)
        self.busy = busy


@dataclass
class Loaded:
    engine: Engine
    scheduler: BatchScheduler
    segments: dict[str, int]  # digest -> bytes of the weights it maps (adapters included)
    context: int  # bytes of KV cache and buffers (llama.cpp's figures) and other memory the load added
    n_ctx: int
    warmup: WarmupReport
    load_seconds: float
    last_used: float  # by the pool's clock
    users: int = 0
    reported: bool = False  # its load is in the metrics (every request that waited for it sees it loaded)


# ONNX Runtime copies external tensors into its own buffers and pre-packs the weights of its 8-bit kernels: room for
# twice the blobs is asked before a load; what the load really took (measured) is counted after it.
ENCODER_LOAD_FACTOR = 2


@dataclass
class LoadedEncoder:
    encoder: Encoder
    bytes: int  # measured growth of the process at load (at least its blobs)
    last_used: float
    users: int = 0


class ModelPool:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        config: ServeConfig,
        budget: Budget,
        *,
        keep_alive: float | None = 300.0,
        warm_state: bool = True,
        warmup: frozenset[str] = WARMUP_STAGES,
        embedding_models: frozenset[str] = frozenset(),
        embed_runtime: Runtime = "onnx",
        make_scheduler: Callable[[Engine, SlotCache, list[Prefix]], BatchScheduler],
        log: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.manifest, self.config, self.budget = store, manifest, config, budget
        self.keep_alive, self.warm_state, self.warmup = keep_alive, warm_state, warmup
        self.embedding_models = embedding_models  # models whose agents use the semantic cache: an embedder each
        self.embed_runtime = embed_runtime  # the encoders' preferred runtime (runtime/encoder.py choose_runtime)
        self._make_scheduler, self._log, self._clock = make_scheduler, log, clock
        self._repack = repacked_models(manifest, config.repack)
        self._adapters = store.adapter_paths(manifest)
        self._scales = {a.name: a.scale for a in manifest.adapters}
        self.loaded: dict[str, Loaded] = {}
        self.encoders: dict[str, LoadedEncoder] = {}
        self._loading = threading.Lock()  # held while loading or evicting
        self._state = threading.Lock()  # guards `loaded` and the users counts
        self.base = process_memory()[0]  # Python, libraries: what the process uses before any model
        self.evictions = 0
        self._shapes: dict[str, ModelShape] = {}  # of models loaded before: later loads decide up front
        self._verified: set[Digest] = set()  # blobs re-hashed by this process (_check_blobs)
        release = store.release_id()
        self.warm_dir = store.releases / release / "warm" if release else None

    # ---- what the budget holds ----

    def usage(self) -> int:
        """Estimated bytes in use: the process before models, mapped weights (once), contexts."""
        return self.base + self._weights(self.loaded.values()) + sum(m.context for m in self.loaded.values()) \
            + sum(e.bytes for e in self.encoders.values())

    @staticmethod
    def _weights(models) -> int:  # noqa: ANN001 - an iterable of Loaded
        unique: dict[str, int] = {}
        for model in models:
            unique.update(model.segments)
        return sum(unique.values())

    def _new_weights(self, segments: dict[str, int]) -> int:
        """Bytes of these segments that no loaded model maps yet."""
        return sum(size for digest, size in segments.items()
                   if not any(digest in m.segments for m in self.loaded.values()))

    def _segments(self, name: str) -> dict[str, int]:
        info = self.manifest.model(name)
        segments = {str(d): self.manifest.blobs[d].size for d in info.segments}
        for adapter in self.manifest.adapters:
            if adapter.base == name:
                segments[str(adapter.digest)] = self.manifest.blobs[adapter.digest].size
        return segments

    # ---- acquire / release ----

    def acquire(self, name: str) -> BatchScheduler:
        """The model's scheduler, loading it first if needed; the caller must `release` it."""
        scheduler = self.try_acquire(name)
        if scheduler is not None:
            return scheduler
        with self._loading:  # one load or eviction at a time
            scheduler = self.try_acquire(name)  # loaded by the request ahead of us
            if scheduler is not None:
                return scheduler
            model = self._load(name)
            with self._state:
                self.loaded[name] = model
                model.users += 1
            return model.scheduler

    def try_acquire(self, name: str) -> BatchScheduler | None:
        """The scheduler of a loaded model (counted as in use), or None without waiting."""
        with self._state:
            model = self.loaded.get(name)
            if model is None:
                return None
            model.users += 1
            return model.scheduler

    def release(self, name: str) -> None:
        with self._state:
            model = self.loaded.get(name)
            if model is not None:
                model.users -= 1
                model.last_used = self._clock()

    def acquire_encoder(self, name: str) -> Encoder:
        """The encoder, loading it first within the budget (raises DoesNotFit); the caller must `release_encoder`."""
        with self._state:
            loaded = self.encoders.get(name)
            if loaded is not None:
                loaded.users += 1
                return loaded.encoder
        with self._loading:
            with self._state:
                loaded = self.encoders.get(name)
                if loaded is not None:
                    loaded.users += 1
                    return loaded.encoder
            loaded = self._load_encoder(name)
            with self._state:
                self.encoders[name] = loaded
                loaded.users += 1
            return loaded.encoder

    def release_encoder(self, name: str) -> None:
        with self._state:
            loaded = self.encoders.get(name)
            if loaded is not None:
                loaded.users -= 1
                loaded.last_used = self._clock()

    def _load_encoder(self, name: str) -> LoadedEncoder:
        info = self.manifest.encoder(name)
        choice = choose_runtime(info, self.embed_runtime)  # one line when this device can run neither
        if choice.note:
            self._log(choice.note)
        digests = encoder_blobs(info, choice.runtime)  # only what this runtime reads counts and is verified
        factor = ENCODER_LOAD_FACTOR if choice.runtime == "onnx" else TFLITE_MEMORY_FACTOR[info.tflite.quant]
        need = factor * sum(self.manifest.blobs[d].size for d in digests)
        while self.budget.bytes - HEADROOM - self.usage() < need:
            idle = self._idle()
            if not idle:
                busy = self.base + HEADROOM + need <= self.budget.bytes
                raise DoesNotFit(f"encoder {name!r} needs about {format_mib(need)} and does not fit the memory budget "
                                 f"of {format_mib(self.budget.bytes)} ({self.budget.reason}) "
                                 f"{'while models are busy; retry later' if busy else 'at all'}", busy=busy)
            self._evict(idle[0][1], f"to make room for {name}")
        self._verify(digests, f"encoder {name!r}")
        before = process_memory()[0]
        started = time.monotonic()
        encoder = open_encoder(info, choice.runtime, self.store.blob_path, threads=self.config.threads)
        grown = max(process_memory()[0] - before, need // factor)
        self._log(f"loaded encoder {name} ({choice.runtime}) in {time.monotonic() - started:.1f}s ({format_mib(grown)};"
                  f" in use {format_mib(self.usage() + grown)} of {format_mib(self.budget.bytes)})")
        return LoadedEncoder(encoder, grown, self._clock())

    def _idle(self) -> list[tuple[float, str]]:
        """Models and encoders no request is using, least recently used first."""
        with self._state:
            return sorted([(m.last_used, n) for n, m in self.loaded.items() if m.users == 0]
                          + [(e.last_used, n) for n, e in self.encoders.items() if e.users == 0])

    def evict_expired(self) -> list[str]:
        """Evict models and encoders idle for longer than keep_alive."""
        if self.keep_alive is None:
            return []
        with self._loading:
            now = self._clock()
            with self._state:
                expired = [n for n, m in [*self.loaded.items(), *self.encoders.items()]
                           if m.users == 0 and now - m.last_used >= self.keep_alive]
            for name in expired:
                self._evict(name, f"idle for {self.keep_alive:g}s")
        return expired

    def close(self) -> None:
        with self._loading:
            for name in [*self.loaded, *self.encoders]:
                self._evict(name, "shutting down", count=False)

    # ---- loading ----

    def _check_blobs(self, name: str) -> None:
        """Every blob the model maps is hashed again, once per process, before llama.cpp sees it: a blob damaged
        on disk since its install (bit rot on an SD card) is refused by name and never served. The read also fills
        the page cache that llama.cpp's mmap then uses."""
        info = self.manifest.model(name)
        self._verify([*info.segments, *(a.digest for a in self.manifest.adapters if a.base == name)], f"model {name!r}")

    def _verify(self, digests: list[Digest], what: str) -> None:
        for digest in digests:
            if digest in self._verified:
                continue
            if sha256_file(self.store.blob_path(digest)) != digest.hex:
                raise EdgepackError(f"blob {digest} of {what} is damaged on disk (its sha256 no longer "
                                    "matches the manifest): install the release again; `edgepack doctor --store` "
                                    "checks every blob")
            self._verified.add(digest)

    def _load(self, name: str) -> Loaded:
        started = time.monotonic()
        segments = self._segments(name)
        chosen: dict[str, int] = {}
        known = self._shapes.get(name)
        if known is not None:  # decide before mapping anything: a refusal costs no memory
            chosen["n_ctx"] = self._fit(name, known, segments)
        elif self.base + HEADROOM + sum(segments.values()) > self.budget.bytes:
            raise DoesNotFit(f"model {name!r} has {format_mib(sum(segments.values()))} of weights: it does not fit "
                             f"the memory budget of {format_mib(self.budget.bytes)} ({self.budget.reason}) at all",
                             busy=False)

        def fit(shape: ModelShape) -> int:
            self._shapes[name] = shape
            if "n_ctx" not in chosen:
                chosen["n_ctx"] = self._fit(name, shape, segments)
            return chosen["n_ctx"]

        self._check_blobs(name)
        new_weights = self._new_weights(segments)
        before = process_memory()[0]
        info = self.manifest.model(name)
        engine = Engine(
            self.store.segment_paths(self.manifest, name), name=name, n_ctx=self.config.n_ctx,
            n_batch=self.config.n_batch, threads=self.config.threads, threads_batch=self.config.threads_batch,
            chat_template=info.chat_template,
            repack=name in self._repack, slots=self.config.slots, kv_type=self.config.kv_type, fit=fit,
            gpu_layers=self.config.gpu_layers, draft_max=self.config.speculate,
        )
        try:
            for adapter in self.manifest.adapters:
                if adapter.base == name:
                    engine.load_adapter(adapter.name, self._adapters[adapter.name])
            agents = self.agents_of(name)
            report = WarmupReport(name)
            if "singles" in self.warmup:
                singles_stage(engine, report)
            cache, prefixes = prefix_stage(engine, self.manifest, agents, self.warm_dir, self.config.kv_type,
                                           self._scales, report) if self.warm_state else ({}, [])
            if name in self.embedding_models:
                engine.embedder()  # now, inside the budget check, rather than on the first lookup
            scheduler = self._make_scheduler(engine, cache, prefixes)
        except BaseException:
            engine.close()
            raise
        try:
            if "batch" in self.warmup:
                concurrent_stage(scheduler, agents if self.warm_state else [], self._scales, report)
        except BaseException:
            scheduler.stop()
            engine.close()
            raise
        # what llama.cpp's figures miss (vocabulary, repacked weights, allocator): measured growth beyond them
        allocated = engine.context_bytes + engine.embedder_bytes
        other = max(0, process_memory()[0] - before - new_weights - allocated)
        model = Loaded(engine, scheduler, segments, allocated + other, chosen.get("n_ctx", engine.n_ctx),
                       report, time.monotonic() - started, last_used=self._clock())
        self._log(f"loaded {name} in {model.load_seconds:.1f}s ({chosen.get('n_ctx')} tokens x "
                  f"{self.config.slots} slots; in use {format_mib(self.usage())} of {format_mib(self.budget.bytes)}); "
                  f"warm-up: {report.summary()}")
        return model

    def _fit(self, name: str, shape: ModelShape, segments: dict[str, int]) -> int:
        """Make room for the model and choose its context per slot; raises DoesNotFit."""
        config = self.config
        n_ubatch = min(config.n_batch, 512)

        def room() -> int:
            return self.budget.bytes - HEADROOM - self.usage() - self._new_weights(segments)

        embedder = context_bytes(shape, 512, 1, "f16", 512) if name in self.embedding_models else 0
        draft = config.speculate
        wanted = context_bytes(shape, config.n_ctx, config.slots, config.kv_type, n_ubatch, draft) + embedder
        while room() < wanted:
            idle = self._idle()
            if not idle:
                break
            before = len(self.loaded) + len(self.encoders)
            self._evict(idle[0][1], f"to make room for {name}")
            if len(self.loaded) + len(self.encoders) == before:
                break
        n_ctx = fit_context(shape, config.n_ctx, config.slots, config.kv_type, n_ubatch, room() - embedder,
                            draft=draft)
        if n_ctx is None:
            alone = self.budget.bytes - HEADROOM - self.base - sum(segments.values()) - embedder
            busy = fit_context(shape, config.n_ctx, config.slots, config.kv_type, n_ubatch, alone,
                               draft=draft) is not None
            need = sum(segments.values()) + context_bytes(shape, 256, config.slots, config.kv_type, n_ubatch, draft)
            where = "while other models are busy; retry later" if busy else "at all"
            raise DoesNotFit(
                f"model {name!r} needs about {format_mib(need)} (weights + KV for {config.slots} x 256 tokens) and "
                f"does not fit the memory budget of {format_mib(self.budget.bytes)} ({self.budget.reason}) {where}"
                f" (the server itself keeps {format_mib(self.base + HEADROOM)} of it)",
                busy=busy,
            )
        if n_ctx < config.n_ctx:
            self._log(f"{name}: context cut to {n_ctx} tokens per slot (of {config.n_ctx}) to fit the memory budget")
        return n_ctx

    def _evict(self, name: str, why: str, count: bool = True) -> None:
        with self._state:
            encoder = self.encoders.get(name)
            if encoder is not None:
                if encoder.users and count:
                    return  # in use again: keep it
                del self.encoders[name]
        if encoder is not None:
            encoder.encoder.close()
            return_freed_memory()
            if count:
                self.evictions += 1
            self._log(f"evicted encoder {name} ({why})")
            return
        with self._state:
            model = self.loaded.get(name)
            if model is None or (model.users and count):
                return  # in use again: keep it
            del self.loaded[name]
        model.scheduler.stop()
        model.engine.close()
        return_freed_memory()
        if count:
            self.evictions += 1
        self._log(f"evicted {name} ({why})")

    def agents_of(self, name: str) -> list[AgentInfo]:
        return [a for a in self.manifest.agent_list() if a.model == name]
