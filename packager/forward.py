"""Run a model over fixed-size token chunks with llama.cpp: logits of chosen positions, and a view of
intermediate tensors through llama.cpp's eval callback (cb_eval) for activation statistics.

The callback hands us `struct ggml_tensor *`; its layout (ggml.h, GGML_MAX_DIMS=4, GGML_MAX_SRC=10,
GGML_MAX_OP_PARAMS=64, GGML_MAX_NAME=64) is mirrored below and checked against ggml_tensor_overhead().
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np

from edgepack.runtime import llama

from .errors import PackagerError

GGML_TYPE_F32 = 0
_GGML_OBJECT_SIZE = 32


class GGMLTensor(ctypes.Structure):
    pass


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

_ggml: ctypes.CDLL | None = None


def _ggml_lib() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_op_desc.restype = ctypes.c_char_p
        lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        if lib.ggml_tensor_overhead() != ctypes.sizeof(GGMLTensor) + _GGML_OBJECT_SIZE:
            raise PackagerError("this llama.cpp build's ggml_tensor layout is not the one edgepack knows")
        _ggml = lib
    return _ggml


def as_matrix(t: GGMLTensor) -> np.ndarray | None:
    """A contiguous f32 tensor as a (rows, cols) view of its host memory, else None."""
    cols = t.ne[0]
    rows = t.ne[1] * t.ne[2] * t.ne[3]
    if t.type != GGML_TYPE_F32 or not t.data or t.nb[0] != 4 or t.nb[1] != cols * 4:
        return None
    return np.ctypeslib.as_array((ctypes.c_float * (cols * rows)).from_address(t.data)).reshape(rows, cols)


class Observer:
    """Sees selected tensors while llama.cpp computes a chunk."""

    def wants(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        raise NotImplementedError

    def observe(self, name: bytes, op: bytes, tensor: GGMLTensor) -> bool:
        """Look at a wanted tensor, just computed; False stops the chunk's evaluation there (nothing after it
        is computed, the logits included)."""
        raise NotImplementedError


class Forward:
    """A model with a context of n_ctx tokens that evaluates one chunk at a time."""

    def __init__(self, paths: list[Path], *, n_ctx: int, threads: int, observer: Observer | None = None) -> None:
        self._model = llama.load_model(paths)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.n_ctx = n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._callback = None
        if observer is not None:
            params.cb_eval = self._callback = _make_callback(observer)
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise PackagerError(f"llama.cpp could not create a context: {llama.last_error()}")
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """Like llama.cpp's tools: special tokens added (BOS), special text not parsed."""
        data = text.encode()
        capacity = len(data) + 16
        for _ in range(2):
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, True, False)
            if n >= 0:
                return list(tokens[:n])
            capacity = -n
        raise PackagerError("tokenization failed")

    def piece(self, token: int) -> bytes:
        return token_piece(self._vocab, token)

    def chunks(self, tokens: list[int], max_chunks: int | None = None) -> list[list[int]]:
        """Consecutive n_ctx-token chunks, each starting with BOS when the model adds one (as llama-perplexity)."""
        count = len(tokens) // self.n_ctx
        if max_chunks is not None:
            count = min(count, max_chunks)
        out = []
        bos = llama_cpp.llama_vocab_bos(self._vocab) if llama_cpp.llama_vocab_get_add_bos(self._vocab) else None
        for i in range(count):
            chunk = tokens[i * self.n_ctx : (i + 1) * self.n_ctx]
            if bos is not None:
                chunk[0] = bos
            out.append(chunk)
        return out

    def run(self, tokens: list[int], logits_from: int = 0, keep_logits: bool = True) -> np.ndarray | None:
        """Evaluate one chunk from an empty cache; logits (float32) of positions logits_from.. : a view of
        llama.cpp's own buffer (no copy of rows x vocabulary floats), valid until the next run."""
        if len(tokens) > self.n_ctx:
            raise PackagerError(f"chunk of {len(tokens)} tokens exceeds n_ctx {self.n_ctx}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= logits_from
        if llama_cpp.llama_decode(self._ctx, batch) != 0:
            raise PackagerError(f"llama.cpp failed to evaluate a chunk: {llama.last_error()}")
        if not keep_logits:
            return None
        rows = len(tokens) - logits_from
        pointer = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))


def token_piece(vocab: ctypes.c_void_p, token: int) -> bytes:
    """The bytes a token stands for (special tokens as their text)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


def _make_callback(observer: Observer) -> Callable:
    lib = _ggml_lib()

    def callback(pointer: int, ask: bool, user_data: int) -> bool:
        tensor = ctypes.cast(pointer, ctypes.POINTER(GGMLTensor)).contents
        op = lib.ggml_op_desc(pointer)
        if ask:
            return observer.wants(tensor.name, op, tensor)
        return observer.observe(tensor.name, op, tensor)

    return llama_cpp.ggml_backend_sched_eval_callback(callback)
