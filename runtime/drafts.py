"""Draft tokens for speculative decoding from n-grams (prompt lookup): no draft model, only token history.

A generation's next tokens often repeat what it has already seen: an agent's tool call copies a name, an id or
a JSON value from its prompt, or from what the same agent wrote in earlier requests. `PromptLookup` finds the
most recent earlier occurrence of the last n tokens (n from the longest size down) and proposes what followed
it, first in the generation's own history, then in its agent's `NgramTable` (earlier requests). `DraftLength`
adapts how many tokens a slot drafts to how many the model accepts, down to none where drafts do not pay.
"""

from __future__ import annotations

import array
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


class DraftLength:
    """How many tokens a slot drafts next: doubles while drafts are accepted whole, falls to what was accepted,
    halves when none is; at zero the slot pauses drafting for `pause` tokens (doubling up to `max_pause` each
    time it falls again), then tries one token."""

    def __init__(self, maximum: int, start: int = 4, pause: int = 8, max_pause: int = 128) -> None:
        self.maximum = maximum
        self.size = min(start, maximum)
        self._pause, self._max_pause, self._min_pause = pause, max_pause, pause
        self._paused = 0

    def next(self) -> int:
        """The draft length for the next step (0: do not draft)."""
        if self._paused > 0:
            self._paused -= 1
            if self._paused == 0:
                self.size = min(1, self.maximum)
            return 0
        return self.size

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        if accepted == drafted:
            self.size = min(self.maximum, self.size * 2)
            self._pause = self._min_pause
        elif accepted == 0:
            self.size //= 2
        else:
            self.size = accepted + 1
        if self.size == 0:
            self._paused = self._pause
            self._pause = min(self._max_pause, self._pause * 2)
