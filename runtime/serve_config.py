"""How the current release's models are served on this device: threads, context, slots, KV type, GPU layers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import hardware
from .boards import known_board
from .bundle_format import AgentInfo, Manifest
from .errors import EdgepackError

REPACK_MODES = ("auto", "always", "never")


MAX_DRAFT = 32  # each drafted token is a logit row per slot (1 MiB on a 262k vocabulary)
DEFAULT_SPECULATE = 16  # bench/bench_speculative.py: agent work 2-3x plain, free text no slower
DEFAULT_SLOTS = 4  # llama-server's automatic choice; one thread gets 2 (see default_slots)


@dataclass(frozen=True)
class ServeConfig:
    threads: int
    n_ctx: int
    n_batch: int
    max_tokens: int
    repack: str = "auto"  # auto: repack only models that share no segment with another model
    slots: int = DEFAULT_SLOTS  # requests decoded together per model (continuous batching)
    kv_type: str = "f16"  # KV cache element type: f16 or q8_0
    threads_batch: int | None = None  # threads for prompt processing (None: the same as threads)
    gpu_layers: int = 0  # layers offloaded to the GPU (-1: all); 0 in a build without GPU offload
    speculate: int = 0  # tokens a slot may draft per step (speculative decoding, runtime/drafts.py); 0: off


def resolve_config(manifest: Manifest, threads: int | None = None, n_ctx: int | None = None,
                   repack: str = "auto", slots: int | None = None, kv_type: str = "f16",
                   local: dict[str, int] | None = None, threads_batch: int | None = None,
                   gpu_layers: int | None = None, speculate: int | None = None) -> ServeConfig:
    """Flags win; then the release's local.json (`edgepack tune`, see tune.read_local_config); then the
    bundle's board profile (capped at the CPUs we may use); then physical cores."""
    if threads is not None and threads < 1:
        raise EdgepackError(f"--threads must be at least 1, got {threads}")
    if threads_batch is not None and threads_batch < 1:
        raise EdgepackError(f"--threads-batch must be at least 1, got {threads_batch}")
    if slots is not None and slots < 1:
        raise EdgepackError(f"--slots must be at least 1, got {slots}")
    if speculate is not None and not 0 <= speculate <= MAX_DRAFT:
        raise EdgepackError(f"--speculate must be between 0 and {MAX_DRAFT}, got {speculate}")
    if n_ctx is not None and n_ctx < 16:
        raise EdgepackError(f"--ctx must be at least 16, got {n_ctx}")
    local = local or {}
    defaults = manifest.runtime
    if threads is None and "threads" in local:
        threads = min(local["threads"], len(os.sched_getaffinity(0)))  # tuned where it may have had more CPUs
    if threads is None:
        cores = hardware.default_threads()
        threads = min(defaults.threads, cores) if defaults.threads else cores
    slots = slots or local.get("slots") or default_slots(threads)
    if threads_batch is None and "threads_batch" in local:
        threads_batch = min(local["threads_batch"], len(os.sched_getaffinity(0)))
    return ServeConfig(
        threads=threads,
        n_ctx=n_ctx or defaults.n_ctx,
        n_batch=max(local.get("n_batch", defaults.n_batch), slots),  # one token per generating slot fits a step
        max_tokens=defaults.max_tokens,
        repack=repack,
        slots=slots,
        kv_type=kv_type,
        threads_batch=threads_batch,
        gpu_layers=resolve_gpu_layers(manifest, gpu_layers),
        speculate=speculate if speculate is not None else local.get("speculate", DEFAULT_SPECULATE),
    )


def default_slots(threads: int) -> int:
    """Requests decoded together when neither a flag nor `edgepack tune` chose: 4, as llama-server's automatic
    choice, which bench/bench_concurrency.py showed pays on 2 cores (4 clients: 77 tok/s with 2 slots, 94-105
    with 4); 2 on one thread, where a step of 4 rows costs nearly 4 single steps. The memory budget then sets the
    context per slot (runtime/memory.py), and the adaptive controller may use fewer slots."""
    return DEFAULT_SLOTS if threads >= 2 else 2


def resolve_gpu_layers(manifest: Manifest, flag: int | None) -> int:
    """--gpu-layers, else the bundle's board profile's (all on a Jetson); a build without GPU offload keeps
    everything on the CPU, and asking it for layers on a GPU is an error rather than a silent CPU run."""
    if flag is not None and flag < -1:
        raise EdgepackError(f"--gpu-layers must be -1 (all), 0 or more, got {flag}")
    board = known_board(manifest.board)
    wanted = flag if flag is not None else (board.gpu_layers if board else 0)
    if not wanted:
        return 0
    from . import llama  # only now: resolving a CPU-only config must not load llama.cpp (doctor)

    if llama.supports_gpu_offload():
        return wanted
    if flag:
        raise EdgepackError(f"--gpu-layers {flag}: this llama.cpp build has no GPU offload (build the CUDA "
                            "wheel on the board: docs/boards.md)")
    return 0


def repacked_models(manifest: Manifest, mode: str) -> set[str]:
    """The models to load with llama.cpp's weight repacking: repacked bytes are private per process and
    model, so models that share segments (the page cache holds them once) are loaded without it."""
    if mode not in REPACK_MODES:
        raise EdgepackError(f"--repack {mode!r}: choose {', '.join(REPACK_MODES)}")
    if mode != "auto":
        return {m.name for m in manifest.models} if mode == "always" else set()
    sharing = set()
    for model in manifest.models:
        others = {d for m in manifest.models if m.name != model.name for d in m.segments[1:]}
        if others & set(model.segments[1:]):
            sharing.add(model.name)
    return {m.name for m in manifest.models} - sharing


def latency_targets(agents: Iterable[AgentInfo]) -> dict[str, int]:
    """Model name -> the strictest latency_sla_ms (one whole answer) among the agents that use it."""
    return _strictest(agents, lambda agent: agent.latency_sla_ms)


def tpot_targets(agents: Iterable[AgentInfo], default_max_tokens: int) -> dict[str, float]:
    """Model name -> seconds per output token: the strictest agent's latency_sla_ms over its max_tokens."""
    return _strictest(agents, lambda agent: agent.latency_sla_ms and agent.latency_sla_ms / 1000
                      / (agent.sampling.max_tokens or default_max_tokens))


def _strictest(agents: Iterable[AgentInfo], target: Callable[[AgentInfo], float | None]) -> dict:
    targets: dict[str, float] = {}
    for agent in agents:
        if value := target(agent):
            targets[agent.model] = min(value, targets.get(agent.model, value))
    return targets
