"""The llama.cpp side of the GGUF fuzz target: loads GGUF files the way `serve` does, in a process of its own.

One path per stdin line, one answer line per path ("ok" or "refused: ..."); a file that crashes llama.cpp
kills this process, and its signal is the finding (fuzz_targets.GgufLoader).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import llama_cpp

from edgepack.runtime import llama
from edgepack.runtime.errors import EdgepackError


def load_and_decode(path: Path) -> str:
    """Load, make a small context and decode two tokens: tensor shapes and types are only used by then."""
    try:
        model = llama.load_model([path], use_mmap=False)
    except EdgepackError as exc:
        return f"refused: {exc}"
    try:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads, params.n_threads_batch = 32, 32, 32, 1, 1
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            return f"refused: no context: {llama.last_error()}"
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
            tokens = (llama_cpp.llama_token * 2)(*[min(i, max(n_vocab - 1, 0)) for i in (1, 3)])
            status = llama.decode(ctx, llama_cpp.llama_batch_get_one(tokens, 2))
            if status == 0:
                logits = llama_cpp.llama_get_logits_ith(ctx, -1)
                ctypes.cast(logits, ctypes.POINTER(ctypes.c_float))[0]  # read, as sampling would
            return "ok" if status == 0 else f"refused: decode returned {status}"
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)


def main() -> None:
    # Answers on a descriptor of their own: llama.cpp's abort path prints a backtrace to stdout.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    llama.init()
    for line in sys.stdin:
        answer = load_and_decode(Path(line.rstrip("\n")))
        print(" ".join(answer.split()), file=answers, flush=True)


if __name__ == "__main__":
    main()
