"""Draft tokens for speculative decoding from n-grams (prompt lookup): no draft model, only token history.

A generation's next tokens often repeat what it has already seen: an agent's tool call copies a name, an id or
a JSON value from its prompt, or from what the same agent wrote in earlier requests. `PromptLookup` finds the
most recent earlier occurrence of the last n tokens (n from the longest size down) and proposes what followed
it, first in the generation's own history, then in its agent's `NgramTable` (earlier requests). `DraftLength`
drafts as many tokens as pay: it weighs the chance each is kept (the slot's acceptance so far) against what a
row costs (`StepCost`, measured from the scheduler's steps), down to none where drafts do not pay.
"""

from __future__ import annotations

import array
from collections import deque
from collections.abc import Iterable

Gram = tuple[int, ...]


class NgramTable:
    """What followed each n-gram in an agent's earlier requests (prompt and answer), the latest winning: llama.cpp's
    ngram-mod, a fixed array indexed by the n-gram's hash (size * 4 bytes, whatever the agent wrote). Colliding
    n-grams overwrite each other; a wrong draft is only rejected."""

    def __init__(self, n: int = 5, size: int = 1 << 16) -> None:
        self.n = n
        self._next = array.array("i", [-1]) * size
        self.used = 0

    def add(self, tokens: list[int]) -> None:
        """Learn one finished request's tokens."""
        n, table, size = self.n, self._next, len(self._next)
        for end in range(n, len(tokens)):
            at = hash(tuple(tokens[end - n : end])) % size
            self.used += table[at] < 0
            table[at] = tokens[end]

    def follow(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the last n tokens, then what followed those, and so on."""
        n, size = self.n, len(self._next)
        if len(tokens) < n:
            return []
        context = tokens[-n:]
        for _ in range(limit):
            token = self._next[hash(tuple(context[-n:])) % size]
            if token < 0:
                break
            context.append(token)
        return context[n:]


class PromptLookup:
    """Drafts for one generation from its own tokens (prompt, then output) and optionally a shared table."""

    def __init__(self, sizes: tuple[int, ...] = (4, 3, 2), table: NgramTable | None = None) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.table = table
        self.tokens: list[int] = []
        self._after: dict[Gram, int] = {}  # n-gram -> index of the token that followed its latest occurrence

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens the generation now holds (its prompt, then every token it emits)."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        # a gram is indexed once a token follows it: the one ending at the last token waits for the next
        for end in range(max(start, 1), len(self.tokens)):
            for n in self.sizes:
                if end >= n:
                    self._after[tuple(self.tokens[end - n : end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that may come next (none when nothing matches): after the longest n-gram seen
        earlier in this generation, else in its agent's table, else after a shorter n-gram of its own."""
        if limit <= 0 or not self.tokens:
            return []
        for i, n in enumerate(self.sizes):
            if n > len(self.tokens):
                continue
            at = self._after.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + limit]
            if i == 0 and self.table is not None and (found := self.table.follow(self.tokens, limit)):
                return found
        return []


class StepCost:
    """The time of a decode step whose rows all generate, as a + b * rows, fitted by least squares over the latest
    steps. A drafted row costs the model's per-row compute (on Gemma 3 270M, whose 262k-token output projection is
    most of it, about 70% of a one-row step here), so whether a draft pays depends on the model and the machine:
    measured, not assumed."""

    def __init__(self, window: int = 64, fixed: float | None = None) -> None:
        """fixed: a row share to use instead of measuring (0: every draft pays)."""
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._fixed = fixed

    def observe(self, rows: int, seconds: float) -> None:
        self._samples.append((rows, seconds))

    def row_share(self, rows: int) -> float:
        """b * rows / (a + b * rows): the share of a step of `rows` rows one row costs, times rows; a row drafted
        beside them pays when the chance it is kept is above this (its tokens per second beat the step's). 0.5 until
        steps of two different sizes were seen."""
        if self._fixed is not None:
            return self._fixed
        if len({n for n, _ in self._samples}) < 2:
            return 0.5
        n = len(self._samples)
        mean_rows = sum(r for r, _ in self._samples) / n
        mean_time = sum(t for _, t in self._samples) / n
        var = sum((r - mean_rows) ** 2 for r, _ in self._samples)
        b = max(0.0, sum((r - mean_rows) * (t - mean_time) for r, t in self._samples) / var)
        a = max(1e-6, mean_time - b * mean_rows)
        return b * rows / (a + b * rows)


class DraftLength:
    """How many tokens a slot drafts next. Each drafted token is kept with a chance p, estimated from the slot's
    drafts so far (decayed counts; `prior` first); the j-th token of a draft is kept with chance p**j, and it is
    drafted only when that is above `threshold` (StepCost.row_share: what a row costs against what a step gives),
    up to `maximum`. A slot that would draft nothing tries one token every `probe` steps, so p can recover."""

    def __init__(self, maximum: int, prior: float = 0.5, probe: int = 16, decay: float = 0.5) -> None:
        self.maximum, self._probe, self._decay = maximum, probe, decay
        self._kept, self._tried = 2 * prior, 2.0  # a prior worth two tokens
        self._idle = 0

    @property
    def p(self) -> float:
        return self._kept / self._tried

    def next(self, threshold: float) -> int:
        """The draft length for the next step (0: do not draft)."""
        p, size, chance = self.p, 0, 1.0
        while size < self.maximum and chance * p > threshold:
            chance *= p
            size += 1
        if size == 0:
            self._idle += 1
            if self._idle >= self._probe:
                self._idle = 0
                return min(1, self.maximum)
        return size

    def update(self, drafted: int, accepted: int) -> None:
        """One verified draft: `accepted` of its `drafted` tokens were kept (tokens past the first rejected one were
        never tried)."""
        if drafted <= 0:
            return
        self._idle = 0
        tried = accepted + (accepted < drafted)
        self._kept = self._kept * self._decay + accepted
        self._tried = self._tried * self._decay + tried
