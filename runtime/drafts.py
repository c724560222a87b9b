"""Draft tokens for speculative decoding from n-grams (prompt lookup): no draft model, only token history.

A generation's next tokens often repeat what it has already seen: an agent's tool call copies a name, an id or
a JSON value from its prompt, or from what the same agent wrote in earlier requests. `PromptLookup` finds the
most recent earlier occurrence of the last n tokens (n from the longest size down) and proposes what followed
it, first in the generation's own history, then in its agent's `NgramTable` (earlier requests). `DraftLength`
adapts how many tokens a slot drafts to how many the model accepts, down to none where drafts do not pay.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

Gram = tuple[int, ...]


class NgramTable:
    """N-grams of an agent's earlier requests (prompt and answer) and what followed each, the latest winning.
    Bounded: the oldest grams go first once it holds `capacity` of them."""

    def __init__(self, sizes: tuple[int, ...] = (4, 3), capacity: int = 32768, follow: int = 16) -> None:
        self.sizes, self.capacity, self.follow = sizes, capacity, follow
        self._next: collections.OrderedDict[Gram, tuple[int, ...]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._next)

    def add(self, tokens: list[int]) -> None:
        """Learn one finished request's tokens."""
        for n in self.sizes:
            for end in range(n, len(tokens)):
                gram = tuple(tokens[end - n : end])
                self._next[gram] = tuple(tokens[end : end + self.follow])
                self._next.move_to_end(gram)
        while len(self._next) > self.capacity:
            self._next.popitem(last=False)

    def lookup(self, gram: Gram) -> tuple[int, ...]:
        return self._next.get(gram, ())


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
        """Up to `limit` tokens that may come next (none when no earlier occurrence matches)."""
        if limit <= 0 or not self.tokens:
            return []
        for n in self.sizes:
            if n > len(self.tokens):
                continue
            gram = tuple(self.tokens[-n:])
            at = self._after.get(gram)
            if at is not None:
                return self.tokens[at : at + limit]
            if self.table is not None and n in self.table.sizes and (found := self.table.lookup(gram)):
                return list(found[:limit])
        return []


class DraftLength:
    """How many tokens a slot drafts next: grows while drafts are accepted whole, falls to what was accepted,
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
            self.size = min(self.maximum, self.size + max(2, self.size // 2))
            self._pause = self._min_pause
        elif accepted == 0:
            self.size //= 2
        else:
            self.size = accepted + 1
        if self.size == 0:
            self._paused = self._pause
            self._pause = min(self._max_pause, self._pause * 2)
