"""Semantic response cache: an earlier answer for a request whose embedding is close enough to that request's.

Entries live in partitions, a sha256 over everything that must match exactly (model digest, agent, request kind,
sampling parameters, any context that is not embedded), so another model, agent or setting never hits. Within a
partition the most similar entry wins if its cosine similarity reaches the threshold. In memory, LRU + TTL.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import EdgepackError
from .response_cache import CachedAnswer, cache_key

DEFAULT_THRESHOLD = 0.90  # chosen from measurements: docs/semantic-cache.md


def partition_key(model_digest: str, agent: str, kind: str, sampling: dict[str, Any], context: str = "") -> str:
    """The exact-match part of a semantic cache key: cache_key() over everything but the embedded text.
    `context` is text that must match exactly without being embedded (e.g. a chat's earlier turns)."""
    return cache_key(model_digest, agent, kind, context, sampling)


@dataclass
class _Entry:
    partition: str
    vector: np.ndarray
    answer: CachedAnswer
    expires: float


@dataclass
class _Partition:
    ids: list[int] = field(default_factory=list)
    _matrix: np.ndarray | None = None

    def matrix(self, entries: dict[int, _Entry]) -> np.ndarray:
        """Its vectors stacked (one row each, in `ids` order), rebuilt only after a change."""
        if self._matrix is None:
            self._matrix = np.stack([entries[i].vector for i in self.ids])
        return self._matrix

    def add(self, entry_id: int) -> None:
        self.ids.append(entry_id)
        self._matrix = None

    def remove(self, entry_id: int) -> None:
        self.ids.remove(entry_id)
        self._matrix = None


class SemanticCache:
    def __init__(self, threshold: float = DEFAULT_THRESHOLD, ttl: float = 300.0, max_entries: int = 512,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0 < threshold <= 1:
            raise EdgepackError(f"semantic cache threshold must be in (0, 1], got {threshold}")
        if ttl <= 0 or max_entries < 1:
            raise EdgepackError("semantic cache needs a positive ttl and at least one entry")
        self.threshold, self.ttl, self.max_entries, self._clock = threshold, ttl, max_entries, clock
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # least recently used first
        self._partitions: dict[str, _Partition] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, partition: str, vector: np.ndarray,
               threshold: float | None = None) -> tuple[CachedAnswer, float] | None:
        """The answer of the most similar live entry in `partition` and its cosine similarity, if it reaches
        the threshold (the cache's, or this lookup's: an agent's own); None otherwise."""
        query = _unit(vector)
        with self._lock:
            self._drop_expired(self._clock())
            best = self._best(partition, query)
            if best is None or best[1] < (self.threshold if threshold is None else threshold):
                return None
            entry_id, similarity = best
            self._entries.move_to_end(entry_id)
            return self._entries[entry_id].answer, similarity

    def put(self, partition: str, vector: np.ndarray, answer: CachedAnswer) -> None:
        """Remember `answer` for `vector`; an entry with the same vector in the partition is replaced."""
        unit = _unit(vector)
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            best = self._best(partition, unit)
            if best is not None and best[1] >= 1 - 1e-6:
                self._remove(best[0])
            entry_id = next(self._ids)
            self._entries[entry_id] = _Entry(partition, unit, answer, now + self.ttl)
            self._partitions.setdefault(partition, _Partition()).add(entry_id)
            while len(self._entries) > self.max_entries:
                self._remove(next(iter(self._entries)))

    def _best(self, partition: str, query: np.ndarray) -> tuple[int, float] | None:
        part = self._partitions.get(partition)
        if part is None:
            return None
        matrix = part.matrix(self._entries)
        if matrix.shape[1] != query.shape[0]:
            raise EdgepackError(f"embedding of dimension {query.shape[0]} does not match the cache's {matrix.shape[1]}")
        similarities = matrix @ query
        index = int(np.argmax(similarities))
        return part.ids[index], float(similarities[index])

    def _drop_expired(self, now: float) -> None:
        for entry_id in [i for i, e in self._entries.items() if e.expires <= now]:
            self._remove(entry_id)

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        part = self._partitions[entry.partition]
        part.remove(entry_id)
        if not part.ids:
            del self._partitions[entry.partition]


def _unit(vector: np.ndarray) -> np.ndarray:
    """`vector` as a float32 unit vector (embedders return unit vectors already; hand-made ones may not be)."""
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array)) if array.ndim == 1 else 0.0
    if not np.isfinite(norm) or norm == 0:
        raise EdgepackError("a semantic cache vector must be one-dimensional, finite and non-zero")
    return array / norm
