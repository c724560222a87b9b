"""Continuous batching: one thread per model decodes every active request together.

Each request holds a slot (a llama.cpp sequence id with its own KV cells). Every step builds one
llama_batch: one token for each slot that is generating, then prompt tokens of slots still reading
their prompt, in arrival order, up to n_batch (a long prompt is processed in chunks, so it never stalls
the others). New requests join between steps; a finished or abandoned request frees its slot at once.
Requests whose LoRA adapter differs from the running batch's wait until the batch drains (llama.cpp
applies adapters to the whole context). The queue is bounded: a full queue is refused (HTTP 429).

Prefix reuse: a finished slot keeps its KV cells. A new request goes to the free slot whose cached
tokens share the longest prefix with its prompt (same adapter), and only the rest of the prompt is
processed: an agent's system prompt is computed once per slot, as are earlier turns of a conversation.

Shared prompts: the choices of one request (OpenAI's `n`) are submitted together, the later ones naming the
first (`shares_prompt_of`). A later choice admitted while the first still reads the prompt waits in its slot;
once the prompt is in the first's KV cells they are copied to the waiting slots (llama_memory_seq_cp) and every
choice samples its first token from the same logits, with its own sampler. A choice admitted later (no free
slot) or whose first is gone reads the prompt itself, through prefix reuse like any request.

Speculative decoding (`speculate`): a slot drafts up to that many tokens by prompt lookup
(runtime/drafts.py: earlier occurrences of its last tokens in its prompt, its output and its agent's earlier
requests); they ride in the same llama_batch, each with its logit row. The slot's own sampler then picks a
token from each row in turn, keeping drafted tokens while they equal its choice, and stops sampling at the
first choice that differs: every token emitted is chosen by the same sampler, with the same state (grammar,
penalties, random generator) from the same logits as in plain decoding, one draw per emitted token. Greedy
and seeded sampled output is therefore what plain decoding gives (stop strings, max_tokens, EOS as they are),
and sampled output follows the model's distribution: a drafted token is kept with the probability the sampler
gives it, which for a draft that proposes one token is the standard rejection rule. The KV cells of the
rejected rest are removed. Sliding-window
layers (Gemma 3): llama.cpp reuses a cell once it falls out of the window of the sequence's last cached position,
so drafts decoded in one micro-batch evict nothing plain decoding keeps; a batch split over micro-batches (over
512 tokens) could evict a few cells early, as in llama-server's n-gram speculation.

Adaptive batching: a SlotController watches the time of each decode step (= the time per output token
of every generating slot) and lowers the number of slots admitted while its p95 is over the target,
raising it again when well under.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from .drafts import DraftLength, NgramTable, PromptLookup, StepCost
from .engine import Engine, Generation, Sampling, TokenStream
from .errors import EdgepackError
from .stats import percentile


class QueueFull(EdgepackError):
    """The model's wait queue is at its limit."""


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # receives text pieces, then DONE or an exception
    lora: tuple[str, float] | None = None
    reuse_prefix: bool = True  # False: process the whole prompt even if a slot holds its beginning
    warmup: bool = False  # the server's own warm-up request: not counted in the metrics
    shares_prompt_of: Request | None = None  # an earlier choice of the same request, with the same prompt
    agent: str | None = None  # requests of one agent share the n-grams drafts come from (None: one shared table)
    speculate: bool = True  # False: never drafted (an agent's `speculate = false`)
    drafted: int = 0  # draft tokens verified for it (speculative decoding), and those kept
    accepted: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Generation = field(default_factory=Generation)


DONE = object()


@dataclass(eq=False)
class _Slot:
    seq_id: int
    request: Request
    stream: TokenStream
    tokens: list[int]  # what the slot's KV cells hold, in position order
    fed: int = 0  # prompt tokens already in the KV cache
    last: int | None = None  # the token to feed next (generation phase)
    logits_index: int = -1
    leader: _Slot | None = None  # the slot reading the prompt this one waits for (then copies)
    lookup: PromptLookup | None = None  # where its drafts come from (None: it does not draft)
    length: DraftLength | None = None
    draft: list[int] = field(default_factory=list)  # drafted tokens in this step's batch, after `last`


SlotCache = dict[int, tuple[tuple[str, float] | None, list[int]]]  # seq id -> (adapter, tokens in its KV)


@dataclass(frozen=True)
class Prefix:
    """A saved KV state of a prompt beginning (an agent's system prompt), restorable into any slot."""

    lora: tuple[str, float] | None
    tokens: list[int]
    state: bytes


class SlotController:
    """Adaptive batch size: keeps the p95 time per output token under `target` seconds by changing how
    many slots may decode together (shrink when over, grow when under 70% of it), one step at a time
    after every `window` decode steps. No target: all slots, always."""

    def __init__(self, slots: int, target: float | None = None, window: int = 32) -> None:
        self.slots, self.target, self.window = slots, target, window
        self.limit = slots
        self.p95: float | None = None
        self._steps: list[float] = []

    def observe(self, seconds: float) -> None:
        if self.target is None:
            return
        self._steps.append(seconds)
        if len(self._steps) < self.window:
            return
        self.p95 = percentile(self._steps, 95)
        self._steps.clear()
        if self.p95 > self.target and self.limit > 1:
            self.limit -= 1
        elif self.p95 < 0.7 * self.target and self.limit < self.slots:
            self.limit += 1


class BatchScheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 16,
                 on_finish: Callable[[Request], None] = lambda r: None,
                 on_change: Callable[[int, int], None] = lambda active, queued: None,
                 controller: SlotController | None = None, cache: SlotCache | None = None,
                 prefixes: list[Prefix] | None = None, speculate: int = 0, cost: StepCost | None = None) -> None:
        """speculate: the most tokens a slot drafts per step (0: no speculative decoding); at most the engine's
        draft_max, which sizes its logit rows. cost: what a row costs (default: measured from the steps)."""
        if not 0 <= speculate <= engine.draft_max:
            raise EdgepackError(f"model {engine.name!r}: speculate={speculate} needs an engine with draft_max >= "
                                f"{speculate} (it has {engine.draft_max})")
        self.engine = engine
        self.speculate = speculate
        self.drafted = self.accepted = 0  # draft tokens verified, and those kept (read by the server's metrics)
        self.tables: dict[str | None, NgramTable] = {}  # per agent: n-grams of its finished requests
        self.cost = cost or StepCost()  # what a row of a decode step costs: whether drafts pay
        self.max_queue = max_queue
        self.controller = controller or SlotController(engine.slots)
        self._on_finish, self._on_change = on_finish, on_change
        self._queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._free = list(range(engine.slots))
        self._cache: SlotCache = dict(cache or {})
        self.prefixes = list(prefixes or [])
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

    def submit(self, *requests: Request) -> None:
        """Queue the requests, all or (QueueFull) none."""
        for request in requests:
            self.engine.check_fits(len(request.prompt), request.sampling.max_tokens)
        with self._wake:
            if len(self._queue) + len(requests) > self.max_queue + len(self._free):  # free slots take them at once
                raise QueueFull(f"model {self.engine.name!r} has {len(self._queue)} requests waiting")
            self._queue.extend(requests)
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
        while self._queue and self._free and len(self._active) < self.controller.limit:
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
            leader = next((s for s in self._active if s.request is request.shares_prompt_of and s.last is None),
                          None) if request.shares_prompt_of is not None else None
            if leader is not None:  # it will copy the leader's cells: any slot will do, emptied
                seq_id, kept = min(self._free), 0
                self._take(seq_id)
                self.engine.clear_slot(seq_id)
            else:
                seq_id, kept = self._place(request)
            request.result.prompt_tokens = len(request.prompt)
            request.result.cached_tokens = kept
            stream = TokenStream(self.engine, request.sampling, request.result)
            slot = _Slot(seq_id, request, stream, request.prompt[:kept], fed=kept, leader=leader)
            if request.speculate and self.speculate > 0:
                slot.lookup = PromptLookup(table=self.tables.setdefault(request.agent, NgramTable()))
                slot.lookup.extend(request.prompt)
                # a new slot expects what drafts have done so far (the first ones: even odds)
                slot.length = DraftLength(self.speculate, prior=(self.accepted + 1) / (self.drafted + 2))
            self._active.append(slot)
        self._on_change(self.active, self.queued)

    def _take(self, seq_id: int) -> None:
        self._free.remove(seq_id)
        self._cache.pop(seq_id, None)

    def _place(self, request: Request) -> tuple[int, int]:
        """The slot for a request that reads its prompt, and how many of the prompt's tokens its KV cells keep."""
        seq_id, common = self._pick_slot(request)
        self._take(seq_id)
        want = min(common, len(request.prompt) - 1)  # feed at least one token, for the logits
        prefix = self._saved_prefix(request)
        if prefix is not None and len(prefix.tokens) > want or not self.engine.can_keep(seq_id, want):
            want = self._restore(seq_id, prefix, request) if prefix is not None else 0
        return seq_id, self.engine.keep_prefix(seq_id, want)

    def _saved_prefix(self, request: Request) -> Prefix | None:
        """The longest saved prefix the prompt starts with (same adapter)."""
        if not request.reuse_prefix:
            return None
        fitting = [p for p in self.prefixes if p.lora == request.lora and len(p.tokens) <= len(request.prompt)
                   and request.prompt[: len(p.tokens)] == p.tokens]
        return max(fitting, key=lambda p: len(p.tokens), default=None)

    def _restore(self, seq_id: int, prefix: Prefix, request: Request) -> int:
        if not self.engine.restore_slot(seq_id, prefix.state):
            self.prefixes.remove(prefix)  # refused once, refused always
            return 0
        return min(len(prefix.tokens), len(request.prompt) - 1)

    def _pick_slot(self, request: Request) -> tuple[int, int]:
        """The free slot sharing the longest cached prefix with the prompt; else the lowest free seq id, which
        keeps the active ids consecutive (one llama.cpp micro-batch per step)."""
        best, best_common = min(self._free), 0
        for seq_id in self._free:
            lora, tokens = self._cache.get(seq_id, (None, []))
            if lora != request.lora or not request.reuse_prefix:
                continue
            common = _common_prefix(tokens, request.prompt)
            if common > best_common:
                best, best_common = seq_id, common
        return best, best_common

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

        for slot in self._active:
            if slot.leader is not None and slot.leader not in self._active:
                slot.leader = None  # the slot it waited for is gone: it reads the prompt itself
        generating = [s for s in self._active if s.last is not None]
        room, takes = budget - len(generating), {}
        threshold = self.cost.row_share(len(generating))
        for slot in generating:
            if slot.length is not None:
                left = slot.request.sampling.max_tokens - slot.request.result.completion_tokens - 1
                slot.draft = slot.lookup.draft(min(slot.length.next(threshold), left, room))
                room -= len(slot.draft)
        for slot in self._active:  # prompt chunks, in arrival order, in what the generating slots leave
            if slot.last is None and slot.leader is None and room > 0:
                takes[slot.seq_id] = min(len(slot.request.prompt) - slot.fed, room)
                room -= takes[slot.seq_id]
        # in seq id order: llama.cpp puts only consecutive seq ids in one micro-batch (non-unified KV)
        for slot in sorted(self._active, key=lambda s: s.seq_id):
            if slot.last is not None:
                slot.logits_index = n
                pos = len(slot.request.prompt) + slot.request.result.completion_tokens - 1
                for i, token in enumerate([slot.last, *slot.draft]):
                    add(token, pos + i, slot.seq_id, True)
            elif takes.get(slot.seq_id):
                prompt = slot.request.prompt
                for i in range(slot.fed, slot.fed + takes[slot.seq_id]):
                    add(prompt[i], i, slot.seq_id, i == len(prompt) - 1)
                slot.fed += takes[slot.seq_id]
                slot.logits_index = n - 1 if slot.fed == len(prompt) else -1
        batch.n_tokens = n
        started = time.perf_counter()
        self.engine.decode_batch(batch)
        if generating and not takes and self.speculate:  # every row generates: the cost of a row, measured
            self.cost.observe(n, time.perf_counter() - started)
        kept = 0
        for slot in self._active:  # what the KV cells now hold
            if slot.last is not None:
                slot.tokens.append(slot.last)
            elif len(slot.tokens) < slot.fed:
                slot.tokens.extend(slot.request.prompt[len(slot.tokens) : slot.fed])
        for slot in list(self._active):
            if slot.logits_index < 0:
                continue
            index, slot.logits_index = slot.logits_index, -1
            if slot.last is None:  # it has read its prompt: the slots waiting for it start from its cells
                for waiting in [s for s in self._active if s.leader is slot]:
                    self.engine.copy_slot(slot.seq_id, waiting.seq_id)
                    waiting.leader, waiting.fed, waiting.tokens = None, slot.fed, list(slot.tokens)
                    waiting.request.result.cached_tokens = slot.fed
                    self._sample(waiting, index)
            if slot.draft:
                kept += self._verify(slot, index)
            else:
                self._sample(slot, index)
        if generating:  # the time per output token: kept drafts are tokens this step gave beyond one per slot
            self.controller.observe((time.perf_counter() - started) * len(generating) / (len(generating) + kept))

    def _sample(self, slot: _Slot, index: int) -> int | None:
        """Sample the slot's next token from logits row `index`, emit its text, finish the slot if it is done;
        the token, or None when the slot finished."""
        token, logprob = self.engine.sample(slot.stream.sampler, index)
        text, done = slot.stream.accept(token, logprob)
        if text:
            slot.request.emit(text)
        if done:
            self._finish(slot)
            return None
        slot.last = token
        if slot.lookup is not None:
            slot.lookup.extend((token,))
        return token

    def _verify(self, slot: _Slot, index: int) -> int:
        """Rows index.. hold the logits after `last` and after each drafted token: sample them in turn while the
        choice equals the draft (whose KV cells are then right), then drop the cells of the rest; how many drafted
        tokens were kept."""
        draft, slot.draft = slot.draft, []
        self.drafted += len(draft)
        slot.request.drafted += len(draft)  # counted before a sample can finish the request (and report it)
        accepted = 0
        for i in range(len(draft) + 1):
            token = self._sample(slot, index + i)
            if token is None or i == len(draft) or token != draft[i] or slot.request.cancel.is_set():
                break
            accepted += 1
            self.accepted += 1
            slot.request.accepted += 1
            slot.tokens.append(token)
        slot.length.update(len(draft), accepted)
        self.engine.trim_slot(slot.seq_id, len(slot.tokens))
        return accepted

    def _finish(self, slot: _Slot, error: Exception | None = None) -> None:
        self._active.remove(slot)
        slot.stream.close()
        if error is None:
            self._cache[slot.seq_id] = (self._lora, slot.tokens)  # its KV cells stay for prefix reuse
            if slot.lookup is not None:
                self.tables[slot.request.agent].add(slot.lookup.tokens)
        else:
            self.engine.clear_slot(slot.seq_id)
        self._free.append(slot.seq_id)
        if not slot.request.cancel.is_set():
            slot.request.emit(error if error is not None else DONE)
        self._on_finish(slot.request)
        self._on_change(self.active, self.queued)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def run_together(scheduler: BatchScheduler, requests: list[Request], timeout: float) -> None:
    """Submit `requests` at once (their `emit` is replaced) and wait for all; raise the first failure, or
    EdgepackError when they do not finish within `timeout` seconds. Their results are in `request.result`."""
    finished = [threading.Event() for _ in requests]
    errors: list[Exception] = []

    def emitter(event: threading.Event) -> Callable[[object], None]:
        def emit(item: object) -> None:
            if isinstance(item, Exception):
                errors.append(item)
            if item is DONE or isinstance(item, Exception):
                event.set()
        return emit

    for request, event in zip(requests, finished, strict=True):
        request.emit = emitter(event)
        scheduler.submit(request)
    deadline = time.monotonic() + timeout
    if not all(event.wait(max(0.0, deadline - time.monotonic())) for event in finished):
        raise EdgepackError(f"{scheduler.engine.name!r}: {len(requests)} concurrent requests did not finish in "
                            f"{timeout:g}s")
    if errors:
        raise errors[0] if isinstance(errors[0], EdgepackError) else EdgepackError(f"generation failed: {errors[0]}")
