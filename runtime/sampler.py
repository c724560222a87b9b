"""One generation's token choice: llama.cpp's sampler chain, an optional grammar, logit biases, log-probabilities.

A grammar is checked the way llama.cpp's own common sampler does it: the chain picks a token from the raw
logits, the grammar is asked about that one token, and only when it refuses are all candidates filtered by
the grammar and the chain applied again. Most tokens of a constrained answer pass the first check, so the
grammar rarely scans the whole vocabulary.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from .errors import EdgepackError
from .sampling import Sampling, TokenLogprob

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per request
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class GrammarError(EdgepackError):
    """A grammar llama.cpp cannot compile (a request's fault: the server answers 400)."""


class TokenSampler:
    def __init__(self, vocab: ctypes.c_void_p, n_vocab: int, sampling: Sampling, eog: list[int]) -> None:
        self.n_vocab, self.logprobs = n_vocab, sampling.logprobs
        self.chain = _chain(n_vocab, sampling, eog)
        self.grammar = _grammar(vocab, sampling) if sampling.grammar else None
        self._one = llama_cpp.llama_token_data(0, 0.0, 0.0)
        self._single = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def sample(self, ctx: ctypes.c_void_p, index: int) -> tuple[int, TokenLogprob | None]:
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        if self.grammar is None:
            token = llama_cpp.llama_sampler_sample(self.chain, ctx, index)
        else:
            token = self._choose(logits, constrained=False)
            if not self._allowed(token):
                token = self._choose(logits, constrained=True)
            llama_cpp.llama_sampler_accept(self.grammar, token)
            llama_cpp.llama_sampler_accept(self.chain, token)
        return token, (self._logprob(logits, token) if self.logprobs is not None else None)

    def close(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None

    def _choose(self, logits: ctypes.Array, *, constrained: bool) -> int:
        data = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
        data["id"] = np.arange(self.n_vocab, dtype=np.int32)
        data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        data["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data.ctypes.data_as(llama_cpp.llama_token_data_p), self.n_vocab, -1, False)
        if constrained:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        if array.selected < 0:
            raise EdgepackError("the sampler chose no token")
        return int(array.data[array.selected].id)

    def _allowed(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._single.size, self._single.selected, self._single.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._single))
        return self._one.logit != float("-inf")

    def _logprob(self, logits: ctypes.Array, token: int) -> TokenLogprob:
        values = np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).astype(np.float64)
        peak = values.max()
        logprobs = values - (peak + np.log(np.exp(values - peak).sum()))
        top = np.argpartition(-logprobs, self.logprobs)[: self.logprobs] if self.logprobs else np.empty(0, int)
        top = top[np.argsort(-logprobs[top])]
        return TokenLogprob(token, float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in top))


def check_grammar(vocab: ctypes.c_void_p, sampling: Sampling) -> None:
    """Compile the grammar once, so a bad one is refused before the request is queued."""
    llama_cpp.llama_sampler_free(_grammar(vocab, sampling))


def _grammar(vocab: ctypes.c_void_p, sampling: Sampling) -> ctypes.c_void_p:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
    if not sampler:
        raise GrammarError("the grammar does not parse (llama.cpp's GBNF, with a `root` rule)")
    return sampler


def _chain(n_vocab: int, s: Sampling, eog: list[int]) -> ctypes.c_void_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    biases = dict(s.logit_bias)
    if s.ignore_eos:
        biases.update({token: float("-inf") for token in eog})
    if biases:
        items = (llama_cpp.llama_logit_bias * len(biases))(
            *[llama_cpp.llama_logit_bias(token=t, bias=b) for t, b in biases.items()])
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), items))
    if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
    if s.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
    add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        add(chain, llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF))
    return chain
