"""The thin layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything that touches a raw llama.cpp pointer for loading lives here; llama.cpp's own log goes to
a ring buffer (shown with EDGEPACK_LLAMA_LOG=1) so a failed load can say why in one line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp

from .errors import EdgepackError

_log_lines: collections.deque[str] = collections.deque(maxlen=50)
_log_lock = threading.Lock()
_init_done = False
_listener: Callable[[str], None] | None = None


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", "replace")
    with _log_lock:
        _log_lines.append(line)
    if _listener is not None:
        _listener(line)
    if os.environ.get("EDGEPACK_LLAMA_LOG") == "1":
        print(line, end="", file=sys.stderr, flush=True)


def init() -> None:
    """Route llama.cpp's log and initialise its backends; safe to call repeatedly."""
    global _init_done
    if not _init_done:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _init_done = True


@contextlib.contextmanager
def log_listener(listener: Callable[[str], None]) -> Iterator[None]:
    """Send llama.cpp's log lines to `listener` while the block runs (e.g. to drive a progress bar)."""
    global _listener
    init()
    _listener = listener
    try:
        yield
    finally:
        _listener = None


_decoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-decode")


def decode(ctx: ctypes.c_void_p, batch: llama_cpp.llama_batch) -> int:
    """llama_decode, always on one thread of the process. llama.cpp's CPU backend runs its OpenMP team on
    the calling thread: with each model decoding from its own thread, every model kept a team, and a model
    decoded ~15% slower once another had served (bench/RUNTIME.md). One thread, one team, no oversubscription."""
    return _decoder.submit(llama_cpp.llama_decode, ctx, batch).result()


_BUFFER_LINE = re.compile(r"(KV|compute|output) buffer size =\s*([0-9.]+) MiB")


def buffer_bytes(log: list[str]) -> int:
    """The KV, compute and output buffers llama.cpp reported while creating a context, in bytes."""
    return int(sum(float(m.group(2)) for line in log if (m := _BUFFER_LINE.search(line))) * 2**20)


def last_error() -> str:
    """The most recent error-looking line llama.cpp logged, for one-line messages."""
    with _log_lock:
        lines = [s.strip() for s in _log_lines if s.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "failed" in line.lower():
            return line
    return lines[-1] if lines else "no details logged"


def version() -> str:
    """llama.cpp's build as llama-cpp-python ships it."""
    init()
    native = llama_cpp.llama_version()
    native_text = native.decode() if native else "unknown"
    return f"llama.cpp {native_text} (llama-cpp-python {llama_cpp.__version__})"


def load_model(paths: list[Path], *, use_mmap: bool = True, repack: bool = True,
               gpu_layers: int = 0) -> ctypes.c_void_p:
    """Load a model from its ordered GGUF split files (any names) with llama.cpp's split loader.

    repack lets llama.cpp's CPU backend copy weights into private, kernel-friendly buffers ("extra buffer
    types"): faster for some types, but those bytes are no longer the shared, mmap'd page cache.
    gpu_layers: layers llama.cpp offloads to the GPU (-1: all), in a build with GPU offload."""
    init()
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = use_mmap
    params.use_extra_bufts = repack
    params.n_gpu_layers = gpu_layers if gpu_layers >= 0 else 2**31 - 1  # llama.cpp caps it at the model's
    raw = [str(p).encode() for p in paths]
    array = (ctypes.c_char_p * len(raw))(*raw)
    model = llama_cpp.llama_model_load_from_splits(array, len(raw), params)
    if not model:
        raise EdgepackError(f"llama.cpp could not load the model from {paths[0].name}: {last_error()}")
    return model


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (a CUDA build, e.g. on a Jetson)."""
    init()
    return bool(llama_cpp.llama_supports_gpu_offload())


def meta_str(model: ctypes.c_void_p, key: str) -> str | None:
    """A GGUF metadata value of a loaded model, as text (None when the model has no such key)."""
    buf = ctypes.create_string_buffer(256)
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) < 0:
        return None
    return buf.value.decode("utf-8", "replace")


def builtin_chat_templates() -> list[str]:
    """Names of the chat templates llama.cpp knows without a Jinja template in the GGUF."""
    init()
    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return [n.decode() for n in names]


def tokenize(vocab: ctypes.c_void_p, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """llama_tokenize with a buffer that grows to what llama.cpp asks for."""
    data = text.encode("utf-8")
    capacity = len(data) + 16
    tokens = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, capacity, add_special, parse_special)
    if n < 0:
        capacity = -n
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, capacity, add_special, parse_special)
    return list(tokens[:n])
