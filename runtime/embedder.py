"""Sentence embeddings with llama.cpp, for the semantic response cache.

Two kinds of model, one class. An embedding model (its GGUF declares a pooling type, e.g. all-MiniLM-L6-v2
converted by llama.cpp's convert_hf_to_gguf.py) is pooled as it declares. A generative LLM (the served model's
own weights) has no trained pooling, and its mean-pooled states do not tell paraphrases from unrelated requests
(docs/semantic-cache.md has the figures); it embeds the text inside a one-word-summary prompt (PromptEOL, Jiang
et al. 2023) and takes the last token's final hidden state. The embedder owns a small context and borrows the
model, so the weights are mapped once and generation's KV cache is never touched.
"""

from __future__ import annotations

import ctypes
import threading

import llama_cpp
import numpy as np

from . import llama
from .errors import EdgepackError

PROMPT_HEAD = 'This sentence : "'
PROMPT_TAIL = '" means in one word:"'
_POOLINGS = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean", llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
             llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}


class Embedder:
    def __init__(self, model: ctypes.c_void_p, *, threads: int, n_ctx: int = 512) -> None:
        """`model` is a loaded llama.cpp model; it stays the caller's, who frees it after close(). Inputs longer
        than n_ctx tokens (capped at the model's training context) keep their end."""
        declared = declared_pooling(model)
        self.method = f"{_POOLINGS[declared]} pooling" if declared is not None else "prompt, last token"
        n_ctx = min(n_ctx, llama_cpp.llama_model_n_ctx_train(model))
        self._vocab = vocab = llama_cpp.llama_model_get_vocab(model)
        bos = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        eos = [llama_cpp.llama_vocab_eos(vocab)] if llama_cpp.llama_vocab_get_add_eos(vocab) else []
        head, tail = ("", "") if declared is not None else (PROMPT_HEAD, PROMPT_TAIL)
        self._head, self._tail = bos + _tokens(vocab, head), _tokens(vocab, tail) + eos
        need = len(self._head) + len(self._tail) + 8
        if n_ctx < need:
            raise EdgepackError(f"embedder context of {n_ctx} tokens is too small (at least {need})")
        # In embedding mode llama.cpp runs the output head over every token (1 MiB of logits a token for
        # Gemma's vocabulary), so a generative model reads its prompt with embeddings off (one output) and
        # turns them on for the last token alone.
        self._prefill = declared is None
        self._lock = threading.Lock()
        log: list[str] = []
        with llama.log_listener(log.append):
            self._ctx = _context(model, declared, n_ctx, threads)
        self.context_bytes = llama.buffer_bytes(log)
        self.n_ctx = n_ctx
        self.dim = llama_cpp.llama_model_n_embd_out(model)
        self._memory = llama_cpp.llama_get_memory(self._ctx)

    def tokens(self, text: str) -> list[int]:
        """What embed() feeds the model: the text's tokens (special tokens not parsed) inside the fixed head and
        tail; a text too long for the context loses its beginning (the end holds the latest message)."""
        body = _tokens(self._vocab, text)
        if not body:
            raise EdgepackError("cannot embed an empty text")
        room = self.n_ctx - len(self._head) - len(self._tail)
        return self._head + body[-room:] + self._tail

    def embed(self, text: str) -> np.ndarray:
        """An L2-normalised float32 vector of shape (dim,); the same text always gives the same vector."""
        tokens = self.tokens(text)
        with self._lock:
            if not self._ctx:
                raise EdgepackError("the embedder is closed")
            llama_cpp.llama_memory_clear(self._memory, True)
            if self._prefill:
                llama_cpp.llama_set_embeddings(self._ctx, False)
                self._decode(tokens[:-1])
                llama_cpp.llama_set_embeddings(self._ctx, True)
                tokens = tokens[-1:]
            self._decode(tokens)
            pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
            if not pooled:
                raise EdgepackError("llama.cpp returned no pooled embedding")
            vector = np.ctypeslib.as_array(pooled, shape=(self.dim,)).astype(np.float32)  # a copy
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise EdgepackError("the embedding is zero or not finite")
        return vector / norm

    def _decode(self, tokens: list[int]) -> None:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)  # alive until the decode returns
        if llama.decode(self._ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) != 0:
            raise EdgepackError(f"llama.cpp failed to compute an embedding ({llama.last_error()})")

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None


def declared_pooling(model: ctypes.c_void_p) -> int | None:
    """The pooling type an embedding model's GGUF declares (`<arch>.pooling_type`); None for a generative model."""
    arch = llama.meta_str(model, "general.architecture")
    value = llama.meta_str(model, f"{arch}.pooling_type") if arch else None
    if value is None or int(value) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        return None
    if int(value) not in _POOLINGS:
        raise EdgepackError(f"the model's pooling type {value} does not give sentence embeddings")
    return int(value)


def _context(model: ctypes.c_void_p, declared: int | None, n_ctx: int, threads: int) -> ctypes.c_void_p:
    """The whole input is one batch: an embedding model may attend both ways, and pools per micro-batch."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = threads
    params.n_threads_batch = threads
    params.embeddings = declared is not None
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_LAST if declared is None else declared
    if declared is None:
        params.n_outputs_max = 1  # sizes the compute buffer for one row of logits, not n_ctx of them
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise EdgepackError(f"llama.cpp could not create an embedding context: {llama.last_error()}")
    return ctx


def _tokens(vocab: ctypes.c_void_p, text: str) -> list[int]:
    """Plain text: no BOS/EOS added, special-token text not parsed (a user cannot inject control tokens)."""
    return llama.tokenize(vocab, text, add_special=False, parse_special=False)
