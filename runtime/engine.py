"""One loaded model and its context: chat formatting, tokenization, generation.

Sampling runs in llama.cpp's native sampler chain, so Python never touches the logits; the loop
only moves one token id per step. The engine knows nothing about HTTP. One generation at a time.
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from . import llama
from .embedder import Embedder
from .errors import ContextOverflow, EdgepackError
from .memory import ModelShape
from .sampler import TokenSampler, check_grammar
from .sampling import Sampling, TokenLogprob

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}


@dataclass
class Generation:
    """Filled in while a generation runs; read it after the iterator ends."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV state was reused (prefix cache)
    completion_tokens: int = 0
    finish_reason: str = "length"
    first_token_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked
    stop_word: str | None = None  # the stop string that ended it (finish_reason "stop" without: end of text)

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        elapsed = self.finished_at - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None


class Engine:
    def __init__(
        self,
        paths: list[Path],
        *,
        name: str,
        n_ctx: int,
        n_batch: int,
        threads: int,
        chat_template: str | None = None,
        repack: bool = True,
        slots: int = 1,
        kv_type: str = "f16",
        fit: Callable[[ModelShape], int] | None = None,
        threads_batch: int | None = None,
        gpu_layers: int = 0,
        draft_max: int = 0,
    ) -> None:
        """n_ctx is per slot; `slots` sequences can be decoded together (each with its own KV cells).
        kv_type is the KV cache's element type: f16, or q8_0 (half the memory, needs flash attention).
        fit, called once the weights are mapped, returns the context per slot to allocate (or raises).
        draft_max: drafted tokens a slot may have verified per step (speculative decoding), each one more logit
        row in the output buffer (n_vocab floats); 0: one row per slot."""
        if kv_type not in KV_TYPES:
            raise EdgepackError(f"KV cache type {kv_type!r}: choose {', '.join(KV_TYPES)}")
        self.name = name
        self.threads = threads
        self.slots = slots
        self.draft_max = draft_max
        self._lock = threading.Lock()
        self._model = llama.load_model(paths, repack=repack, gpu_layers=gpu_layers)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        if fit is not None:
            try:
                n_ctx = fit(self.shape())
            except BaseException:
                llama_cpp.llama_model_free(self._model)
                raise
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = slots
        params.kv_unified = False  # every slot its own KV stream: isolation, and no cross-slot padding
        params.swa_full = False  # sliding-window layers keep only their window (Gemma 3: ~1/4 of the KV memory)
        # at most one logit row per slot per step (plus its drafts): keeps the compute buffer small
        params.n_outputs_max = slots * (1 + draft_max)
        params.type_k = params.type_v = KV_TYPES[kv_type]
        if kv_type != "f16":
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # llama.cpp needs it for a quantized V
        params.n_threads = threads
        params.n_threads_batch = threads_batch or threads  # prompt processing (several tokens per sequence)
        params.no_perf = True
        log: list[str] = []
        with llama.log_listener(log.append):
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        self.context_bytes = llama.buffer_bytes(log)  # KV, compute and output buffers, as llama.cpp reports them
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EdgepackError(f"llama.cpp could not create a context for {name}: {llama.last_error()}")
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.n_batch = n_batch
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.chat_template = chat_template or self._model_chat_template()
        self._eog_tokens: list[int] | None = None
        self._one = (llama_cpp.llama_token * 1)()
        self._adapters: dict[str, ctypes.c_void_p] = {}
        self._embedder: Embedder | None = None
        self._copies_pending = False  # copy_slot's data moves at the next decode

    def shape(self) -> ModelShape:
        n_embd, n_head = llama_cpp.llama_model_n_embd(self._model), llama_cpp.llama_model_n_head(self._model)
        head = n_embd // max(1, n_head)
        return ModelShape(
            n_layer=llama_cpp.llama_model_n_layer(self._model),
            n_head_kv=llama_cpp.llama_model_n_head_kv(self._model),
            key_length=self._meta_int("attention.key_length") or head,
            value_length=self._meta_int("attention.value_length") or head,
            n_vocab=self.n_vocab,
            n_embd=n_embd,
            architecture=llama.meta_str(self._model, "general.architecture") or "",
            n_swa=llama_cpp.llama_model_n_swa(self._model),
        )

    def _meta_int(self, key: str) -> int | None:
        """An integer of the architecture's own metadata, e.g. attention.key_length -> gemma3.attention.key_length."""
        value = llama.meta_str(self._model, f"{llama.meta_str(self._model, 'general.architecture')}.{key}")
        return int(value) if value is not None and value.isdigit() else None

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter (GGUF) once; generations name it to apply it on top of the base."""
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            raise EdgepackError(f"llama.cpp could not load adapter {name!r} for {self.name!r}: {llama.last_error()}")
        self._adapters[name] = adapter

    def _apply_adapter(self, lora: tuple[str, float] | None) -> None:
        if lora is None:
            status = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            name, scale = lora
            if name not in self._adapters:
                raise EdgepackError(f"model {self.name!r} has no adapter {name!r}")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            status = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, (ctypes.c_float * 1)(scale))
        if status != 0:
            raise EdgepackError(f"llama.cpp could not set the adapter on {self.name!r}")

    def embedder(self) -> Embedder:
        """Sentence embeddings from this model's weights (its own small context), made on first use."""
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self._model, threads=1)  # one thread: steadier beside the decoder
            return self._embedder

    @property
    def embedder_bytes(self) -> int:
        return self._embedder.context_bytes if self._embedder is not None else 0

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        for adapter in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        self._adapters = {}
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def _model_chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def format_chat(self, messages: list[tuple[str, str]]) -> str:
        """Render (role, content) pairs with llama.cpp's template engine, ending with the assistant cue."""
        if self.chat_template is None:
            raise EdgepackError(f"model {self.name!r} has no chat template; use /v1/completions")
        keep = [(r.encode(), c.encode()) for r, c in messages]  # keep the bytes alive for the call
        chat = (llama_cpp.llama_chat_message * len(keep))(
            *[llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep]
        )
        template = self.chat_template.encode()
        size = max(256, 2 * sum(len(r) + len(c) for r, c in keep))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(template, chat, len(keep), True, buf, size)
            if n < 0:
                raise EdgepackError(f"model {self.name!r}: chat template is not supported by llama.cpp")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1
        raise EdgepackError(f"model {self.name!r}: chat template output did not fit")

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return llama.tokenize(self._vocab, text, add_special=add_special, parse_special=True)

    def _piece(self, token: int, buf: ctypes.Array, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _eog(self) -> list[int]:
        if self._eog_tokens is None:
            self._eog_tokens = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        return self._eog_tokens

    def sampler(self, sampling: Sampling) -> TokenSampler:
        return TokenSampler(self._vocab, self.n_vocab, sampling, self._eog())

    def check_grammar(self, sampling: Sampling) -> None:
        """Raise GrammarError now when the sampling's grammar does not compile."""
        if sampling.grammar:
            check_grammar(self._vocab, sampling)

    def token_text(self, token: int, special: bool = True) -> bytes:
        """A token's bytes as the model writes them (special tokens as text unless `special` is False, as a
        generation writes them unless it reads tool-call markers)."""
        return self._piece(token, ctypes.create_string_buffer(64), special=special)

    def eos_text(self) -> str:
        """The end-of-sequence token's text, for chat templates that write it."""
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return self.token_text(eos).decode("utf-8", "replace") if eos >= 0 else ""

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if max_tokens < 1 or prompt_tokens + max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context size"
                f" ({self.n_ctx}) of model {self.name!r}"
            )

    def generate(
        self, prompt: list[int], sampling: Sampling, result: Generation, cancel: threading.Event | None = None,
        lora: tuple[str, float] | None = None,
    ) -> Iterator[str]:
        """Yield text deltas; `result` holds counts, timings and the finish reason. `lora` is an adapter
        name and scale to apply for this generation (None: the base model alone)."""
        if not prompt:
            raise EdgepackError("empty prompt")
        self.check_fits(len(prompt), sampling.max_tokens)
        with self._lock:
            self._apply_adapter(lora)
            yield from self._generate_locked(prompt, sampling, result, cancel)

    def _decode(self, tokens: ctypes.Array, n: int) -> None:
        if llama.decode(self._ctx, llama_cpp.llama_batch_get_one(tokens, n)) != 0:
            raise EdgepackError(f"llama.cpp failed to decode ({llama.last_error()})")

    def _generate_locked(
        self, prompt: list[int], sampling: Sampling, result: Generation, cancel: threading.Event | None
    ) -> Iterator[str]:
        result.prompt_tokens = len(prompt)
        llama_cpp.llama_memory_clear(self._memory, True)
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start : start + self.n_batch]
            self._decode((llama_cpp.llama_token * len(chunk))(*chunk), len(chunk))
        stream = TokenStream(self, sampling, result)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    result.finish_reason = "cancelled"
                    return
                token, logprob = stream.sampler.sample(self._ctx, -1)
                text, done = stream.accept(token, logprob)
                if text:
                    yield text
                if done:
                    return
                self._one[0] = token
                self._decode(self._one, 1)
        finally:
            stream.close()

    # ---- primitives for the batch scheduler (one thread drives them) ----

    def decode_batch(self, batch: llama_cpp.llama_batch) -> None:
        if llama.decode(self._ctx, batch) != 0:
            raise EdgepackError(f"llama.cpp failed to decode a batch ({llama.last_error()})")
        self._copies_pending = False

    def copy_slot(self, source: int, target: int) -> None:
        """Give slot `target` the KV cells of slot `source`, replacing its own. Slots are separate KV streams
        (kv_unified off), between which llama.cpp copies only whole streams, and only at the start of the next
        decode: until then the source's cells must not change but by decoding (see _apply_copies)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)
        self._copies_pending = True

    def _apply_copies(self, seq_id: int) -> None:
        """Have llama.cpp carry out pending slot copies now, before a state is written into the (emptied) slot
        `seq_id`: the copy would otherwise overwrite that state, or copy it. One token decoded, then dropped."""
        if self._copies_pending:
            self.prefill(seq_id, [0])
            self.clear_slot(seq_id)

    def sample(self, sampler: TokenSampler, index: int) -> tuple[int, TokenLogprob | None]:
        return sampler.sample(self._ctx, index)

    def clear_slot(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def trim_slot(self, seq_id: int, n_keep: int) -> None:
        """Drop the slot's KV cells from position n_keep on (rejected draft tokens)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n_keep, -1):
            raise EdgepackError(f"llama.cpp cannot remove positions from {n_keep} on in a slot of {self.name!r}")

    def can_keep(self, seq_id: int, n_keep: int) -> bool:
        """Whether the slot's first n_keep positions can be reused: not when a sliding-window layer has
        already forgotten positions the next token must see (llama-server's rule)."""
        if n_keep <= 0:
            return False
        pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id)
        n_swa = llama_cpp.llama_model_n_swa(self._model)
        return pos_min <= max(0, n_keep - n_swa) if n_swa > 0 else pos_min <= 0

    def keep_prefix(self, seq_id: int, n_keep: int) -> int:
        """Drop the slot's KV cells from position n_keep on; how many positions stay (0: all dropped)."""
        if self.can_keep(seq_id, n_keep) and llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n_keep, -1):
            return n_keep
        self.clear_slot(seq_id)
        return 0

    def slot_state(self, seq_id: int) -> bytes:
        """The slot's KV state as bytes (to restore it into any slot later)."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        return ctypes.string_at(buf, written)

    def restore_slot(self, seq_id: int, state: bytes) -> bool:
        """Replace the slot's KV cells with a state from slot_state; False (slot cleared) if refused."""
        self.clear_slot(seq_id)
        self._apply_copies(seq_id)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(state), seq_id) == 0:
            self.clear_slot(seq_id)
            return False
        return True

    def save_slot(self, seq_id: int, path: Path, tokens: list[int]) -> None:
        """Write the slot's KV state (and the tokens it holds) to path, atomically."""
        temp = path.with_name(path.name + ".tmp")
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_state_seq_save_file(self._ctx, str(temp).encode(), seq_id, array, len(tokens)) == 0:
            temp.unlink(missing_ok=True)
            raise EdgepackError(f"llama.cpp could not save the state of {self.name!r} to {path}")
        temp.replace(path)

    def load_slot(self, seq_id: int, path: Path, capacity: int) -> list[int] | None:
        """Load a state written by save_slot into the slot; the tokens it holds, or None when llama.cpp
        refuses the file (another model, KV type or context size, or a damaged file)."""
        self.clear_slot(seq_id)
        self._apply_copies(seq_id)
        array = (llama_cpp.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(self._ctx, str(path).encode(), seq_id, array, capacity,
                                                   ctypes.byref(count))
        if read == 0 or count.value == 0:
            self.clear_slot(seq_id)
            return None
        return list(array[: count.value])

    def prefill(self, seq_id: int, tokens: list[int]) -> None:
        """Process tokens into the slot's KV cells without sampling (used to build warm states)."""
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0], batch.logits[i] = seq_id, False
                batch.n_tokens = len(chunk)
                self.decode_batch(batch)
        finally:
            llama_cpp.llama_batch_free(batch)

    def set_adapter(self, lora: tuple[str, float] | None) -> None:
        self._apply_adapter(lora)


class TokenStream:
    """Turns one generation's sampled token ids into text: EOG, UTF-8 reassembly, stop strings, counts."""

    def __init__(self, engine: Engine, sampling: Sampling, result: Generation) -> None:
        self.engine, self.sampling, self.result = engine, sampling, result
        self.sampler: TokenSampler | None = engine.sampler(sampling)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = _StopMatcher(sampling.stop)
        self._buf = ctypes.create_string_buffer(64)

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> tuple[str, bool]:
        """Text to emit for this token and whether the generation has finished."""
        result = self.result
        if result.first_token_at is None:
            result.first_token_at = time.monotonic()
        if llama_cpp.llama_vocab_is_eog(self.engine._vocab, token) and not self.sampling.ignore_eos:
            result.finish_reason = "stop"
            return self._flush(), True
        result.completion_tokens += 1
        if logprob is not None:
            result.logprobs.append(logprob)
        piece = self.engine._piece(token, self._buf, self.sampling.render_special)
        text, stopped = self._stops.feed(self._decoder.decode(piece))
        if stopped:
            result.finish_reason, result.stop_word = "stop", self._stops.matched
            return text, True
        if result.completion_tokens >= self.sampling.max_tokens:
            result.finish_reason = "length"
            return text + self._flush(), True
        return text, False

    def _flush(self) -> str:
        tail, _ = self._stops.feed(self._decoder.decode(b"", final=True), final=True)
        return tail

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self.result.finished_at = time.monotonic()


class _StopMatcher:
    """Cuts the output at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the output

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
