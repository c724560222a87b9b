"""Continuous batching: one thread per model decodes every active request together.

Each request holds a slot (a llama.cpp sequence id with its own KV cells). Every step builds one
llama_batch: one token for each slot that is generating, then prompt tokens of slots still reading
their prompt, in arrival order, up to n_batch (a long prompt is processed in chunks, so it never stalls
the others). New requests join between steps; a finished or abandoned request frees its slot at once.
Requests whose LoRA adapter differs from the running batch's wait until the batch drains (llama.cpp
applies adapters to the whole context). The queue is bounded: a full queue is refused (HTTP 429).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from .engine import Engine, Generation, Sampling, TokenStream
from .errors import EdgepackError


class QueueFull(EdgepackError):
    """The model's wait queue is at its limit."""


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # receives text pieces, then DONE or an exception
    lora: tuple[str, float] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Generation = field(default_factory=Generation)


DONE = object()


@dataclass
class _Slot:
    seq_id: int
    request: Request
    stream: TokenStream
    fed: int = 0  # prompt tokens already in the KV cache
    last: int | None = None  # the token to feed next (generation phase)
    logits_index: int = -1


class BatchScheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 16,
                 on_finish: Callable[[Request], None] = lambda r: None,
                 on_change: Callable[[int, int], None] = lambda active, queued: None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._on_finish, self._on_change = on_finish, on_change
        self._queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._free = list(range(engine.slots))
        self._active: list[_Slot] = []
        self._lora: tuple[str, float] | None = None
        self._batch = llama_cpp.llama_batch_init(engine.n_batch, 0, 1)
        self._thread = threading.Thread(target=self._run, name=f"batch-{engine.name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, request: Request) -> None:
        self.engine.check_fits(len(request.prompt), request.sampling.max_tokens)
        with self._wake:
            if len(self._queue) >= self.max_queue + len(self._free):  # free slots take requests at once
                raise QueueFull(f"model {self.engine.name!r} has {len(self._queue)} requests waiting")
            self._queue.append(request)
            self._wake.notify()
        self._on_change(self.active, self.queued)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        llama_cpp.llama_batch_free(self._batch)

    # ---- the decode loop (scheduler thread only) ----

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._queue and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
            self._drop_cancelled()
            if not self._active:
                continue
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - every request of the batch learns of the failure
                for slot in list(self._active):
                    self._finish(slot, exc)
        for slot in list(self._active):
            slot.request.cancel.set()
            self._finish(slot)

    def _admit(self) -> None:
        while self._queue and self._free:
            request = self._queue[0]
            if request.cancel.is_set():  # gave up while waiting
                self._queue.popleft()
                request.result.finish_reason = "cancelled"
                self._on_finish(request)
                continue
            if self._active and request.lora != self._lora:
                break  # wait for the running batch (its adapter) to drain
            self._queue.popleft()
            if not self._active:
                self._lora = request.lora
                self.engine.set_adapter(request.lora)
            seq_id = self._free.pop(0)
            self.engine.clear_slot(seq_id)
            request.result.prompt_tokens = len(request.prompt)
            self._active.append(_Slot(seq_id, request, TokenStream(self.engine, request.sampling, request.result)))
        self._on_change(self.active, self.queued)

    def _drop_cancelled(self) -> None:
        for slot in list(self._active):
            if slot.request.cancel.is_set():
                slot.request.result.finish_reason = "cancelled"
                self._finish(slot)

    def _step(self) -> None:
        batch, budget = self._batch, self.engine.n_batch
        n = 0

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq_id, logits
            n += 1

        generating = [s for s in self._active if s.last is not None]
        for slot in generating:
            slot.logits_index = n
            add(slot.last, len(slot.request.prompt) + slot.request.result.completion_tokens - 1, slot.seq_id, True)
        for slot in self._active:
            if slot.last is not None or n >= budget:
                continue
            prompt = slot.request.prompt
            take = min(len(prompt) - slot.fed, budget - n)
            for i in range(slot.fed, slot.fed + take):
                add(prompt[i], i, slot.seq_id, i == len(prompt) - 1)
            slot.fed += take
            slot.logits_index = n - 1 if slot.fed == len(prompt) else -1
        batch.n_tokens = n
        self.engine.decode_batch(batch)
        for slot in list(self._active):
            if slot.logits_index < 0:
                continue
            token = self.engine.sample(slot.stream.sampler, slot.logits_index)
            slot.logits_index = -1
            text, done = slot.stream.accept(token)
            if text:
                slot.request.emit(text)
            if done:
                self._finish(slot)
            else:
                slot.last = token

    def _finish(self, slot: _Slot, error: Exception | None = None) -> None:
        self._active.remove(slot)
        slot.stream.close()
        self.engine.clear_slot(slot.seq_id)
        self._free.append(slot.seq_id)
        if not slot.request.cancel.is_set():
            slot.request.emit(error if error is not None else DONE)
        self._on_finish(slot.request)
        self._on_change(self.active, self.queued)
