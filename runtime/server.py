"""The HTTP service: OpenAI-compatible routes, health, metrics (Starlette on uvicorn).

The model pool (runtime/pool.py) is set up in the background after the socket is open, so /health
answers 503 until it is ready (with --preload: until every model is loaded and warmed up). A model
loads on its first request within the memory budget (503 when it cannot fit) and is evicted after
keep_alive idle. Each model's requests are decoded together by its batch scheduler (continuous
batching, runtime/scheduler.py); tokens travel to the request's event loop as they are sampled. A request
for n choices submits n sequences together, the later ones taking the first's prompt cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import grammar, openai_api
from .alerts import AlertWindow
from .auth import NO_KEYS, ApiKeys, RequireApiKey
from .bundle_format import AgentInfo
from .chat_prompt import ChatPrompt, call_docs, chat_prompt, delta_docs
from .decisions import Answer, Call, compare
from .embeddings_api import EmbeddingsApi
from .engine import Engine, Generation, Sampling
from .errors import ContextOverflow, EdgepackError
from .grammar import SchemaNotSupported
from .http_common import NO_HOOKS, Hooks, once, read_body, sse
from .http_guard import CheckRequestHead
from .llama_server_api import LlamaServerApi
from .memory import process_memory
from .metrics import Metrics
from .openai_api import ApiError, CompletionRequest
from .pool import DoesNotFit, ModelPool
from .response_cache import CachedAnswer, ResponseCache, cache_key
from .sampler import GrammarError
from .scheduler import DONE, BatchScheduler, Prefix, QueueFull, Request, SlotCache, SlotController
from .sd_notify import notify, watchdog_interval, watchdog_loop
from .semantic_cache import SemanticCache, partition_key
from .tool_formats import ToolFormat
from .trial import Trial
from .verdict import tier_limit

RETRY_AFTER_SECONDS = 1
LOAD_SAMPLE_SECONDS = 5.0
EVICT_CHECK_SECONDS = 1.0
MEMORY_RETRY_AFTER_SECONDS = 5
SESSION_HEADER = "x-session-id"  # A/B: a conversation stays on one arm (docs/shadow.md)

PoolFactory = Callable[[Callable[[Engine, SlotCache, list[Prefix]], BatchScheduler]], ModelPool]


@dataclass
class _Job:
    """A request as the HTTP side sees it: the scheduler's request plus the queue its events arrive on."""

    request: Request
    started: float  # when the request arrived (time.monotonic), for time to first token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


def _new_job(prompt: list[int], sampling: Sampling, lora: tuple[str, float] | None, started: float,
             reuse_prefix: bool = True) -> _Job:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    return _Job(Request(prompt, sampling, emit, lora, reuse_prefix), started, events)




class Service:
    """Holds the models and state; `app` is the ASGI application."""

    def __init__(
        self,
        make_pool: PoolFactory,
        agents: list[AgentInfo],
        *,
        preload: bool = False,
        tpot_targets: dict[str, float] | None = None,
        default_max_tokens: int = 512,
        adapter_scales: dict[str, float] | None = None,
        max_queue: int = 16,
        cache: ResponseCache | None = None,
        semantic: SemanticCache | None = None,
        semantic_all: bool = False,
        agent_digests: dict[str, str] | None = None,
        request_timeout: float = 300.0,
        cors_origins: tuple[str, ...] = (),
        api_keys: ApiKeys = NO_KEYS,
        metrics_open: bool = False,
        on_ready: Callable[[], None] = lambda: None,
        on_failure: Callable[[str], None] = lambda message: None,
        on_warning: Callable[[str], None] = lambda message: None,
        on_stopped: Callable[[], None] = lambda: None,
        trial: Trial | None = None,
    ) -> None:
        self.metrics = Metrics()
        self.trial = trial  # a candidate release beside the current one (runtime/trial.py)
        self._shadows: set[asyncio.Task] = set()
        self._live_agents: dict[str, AgentInfo] = {}  # the agents a promoted candidate replaced (for a rollback)
        self.agents = {agent.name: agent for agent in agents}
        self.adapter_scales = adapter_scales or {}
        self.default_max_tokens = default_max_tokens
        self.state = "loading"
        self.error: str | None = None
        self.pool: ModelPool | None = None
        self.preload, self.tpot_targets = preload, tpot_targets or {}
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.cache, self.semantic, self.agent_digests = cache, semantic, agent_digests or {}
        self.semantic_all = semantic_all  # --semantic-cache: every agent; else only agents with semantic_cache
        self.alerts = AlertWindow({a.name: a.latency_sla_ms for a in agents if a.latency_sla_ms})
        self._started: dict[int, float] = {}
        self._make_pool, self._on_ready, self._on_failure = make_pool, on_ready, on_failure
        self._on_warning, self._on_stopped = on_warning, on_stopped
        self.created = int(time.time())
        routes = [
            Route("/health", self.health),
            Route("/metrics", self.metrics_page),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/models", self.models),  # llama-server's paths: the same routes without /v1
            Route("/chat/completions", self.chat, methods=["POST"]),
            *LlamaServerApi(self).routes(),
            *EmbeddingsApi(self).routes(),
        ]
        # Outermost first: CORS answers a browser's preflight (which carries no key) and marks refusals too, so a
        # page can read them; a malformed head is refused before any key is compared.
        middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                 allow_headers=["*"])] if cors_origins else []
        middleware.append(Middleware(CheckRequestHead))
        if api_keys:
            middleware.append(Middleware(RequireApiKey, keys=api_keys, metrics_open=metrics_open))
        self.app = _MetricsMiddleware(
            Starlette(
                routes=routes,
                middleware=middleware,
                exception_handlers={ApiError: _api_error, HTTPException: _http_error},
                lifespan=self._lifespan,
            ),
            self.metrics,
            {r.path for r in routes},
            self.alerts,
        )

    # ---- lifecycle ----

    def _lifespan(self, app: Starlette):  # noqa: ANN202 - Starlette's lifespan protocol
        service = self

        class _Lifespan:
            async def __aenter__(self) -> None:
                threading.Thread(target=service._start_pool, name="loader", daemon=True).start()
                loop = asyncio.get_running_loop()
                self.tasks = [loop.create_task(service._sample_load()), loop.create_task(service._evict_idle())]
                interval = watchdog_interval()
                if interval:
                    self.tasks.append(loop.create_task(watchdog_loop(interval, lambda: service.state != "failed")))

            async def __aexit__(self, *exc: object) -> None:
                notify("STOPPING=1")
                for task in self.tasks:
                    task.cancel()
                if service.pool is not None:
                    await asyncio.to_thread(service.pool.close)
                if service.cache is not None:
                    service.cache.close()
                if service.state != "failed":
                    service._on_stopped()  # a clean stop (SIGTERM: uvicorn then re-raises it, ending the process)

        return _Lifespan()

    def _start_pool(self) -> None:
        try:
            pool = self._make_pool(self._scheduler)
            self.metrics.memory_budget.set(pool.budget.bytes)
            self.pool = pool
            if self.preload:
                self.state = "warming"
                for name in {agent.model: None for agent in self.agents.values()}:
                    try:
                        pool.acquire(name)
                    except DoesNotFit as exc:  # the others still serve; its requests get 503
                        self._on_warning(f"not preloaded: {exc}")
                        continue
                    pool.release(name)
                    self._loaded(name)
            self.state = "ready"
            self.metrics.ready.set(1)
            self._on_ready()
        except Exception as exc:  # noqa: BLE001 - reported through /health and the CLI
            self.state, self.error = "failed", str(exc)
            self._on_failure(str(exc))

    def _scheduler(self, engine: Engine, cache: SlotCache, prefixes: list[Prefix]) -> BatchScheduler:
        model = engine.name

        def changed(active: int, queued: int) -> None:
            self.metrics.active_slots.labels(model).set(active)
            self.metrics.queued.labels(model).set(queued)

        controller = SlotController(engine.slots, self.tpot_targets.get(model))
        return BatchScheduler(engine, max_queue=self.max_queue, on_finish=lambda r: self._record(model, r),
                              on_change=changed, controller=controller, cache=cache, prefixes=prefixes,
                              speculate=engine.draft_max)

    def _loaded(self, name: str) -> None:
        """Metrics of a model the pool has just loaded."""
        assert self.pool is not None
        model = self.pool.loaded.get(name)
        if model is None or model.reported:  # the load another waiting request already counted
            return
        model.reported = True
        m, report = self.metrics, model.warmup
        m.loads.labels(name).inc()
        m.load_seconds.labels(name).observe(model.load_seconds)
        for stage, value in (("cold", report.cold), ("warm", report.warm)):
            if value is not None:
                m.warmup_latency.labels(name, stage).set(value)
        if report.concurrent:
            m.warmup_latency.labels(name, "concurrent_ttft").set(max(report.concurrent))

    def _update_pool_metrics(self) -> None:
        pool, m = self.pool, self.metrics
        rss, pss = process_memory()
        m.rss.set(rss)
        m.pss.set(pss)
        if pool is None:
            return
        m.memory_estimate.set(pool.usage())
        m.evictions.set(pool.evictions)
        for name in {agent.model for agent in self.agents.values()}:
            model = pool.loaded.get(name)
            m.model_loaded.labels(name).set(1 if model else 0)
            if model is not None:
                controller = model.scheduler.controller
                m.slot_limit.labels(name).set(controller.limit)
                if controller.target is not None:
                    m.tpot_target.labels(name).set(controller.target)
                if controller.p95 is not None:
                    m.step_p95.labels(name).set(controller.p95)

    async def _evict_idle(self) -> None:
        while True:
            await asyncio.sleep(EVICT_CHECK_SECONDS)
            if self.pool is not None and self.pool.keep_alive is not None:
                await asyncio.to_thread(self.pool.evict_expired)

    def _record(self, model: str, request: Request) -> None:
        if request.warmup:
            return
        m, result = self.metrics, request.result
        m.generated.labels(model).inc(result.completion_tokens)
        if request.drafted:
            m.spec_drafted.labels(model, request.agent or "").inc(request.drafted)
            m.spec_accepted.labels(model, request.agent or "").inc(request.accepted)
        m.prompt.labels(model).inc(result.prompt_tokens)
        m.prompt_cached.labels(model).inc(result.cached_tokens)
        if result.finish_reason == "cancelled":
            m.cancelled.labels(model).inc()
        started = self._started.pop(id(request), None)
        if result.first_token_at is not None and started is not None:
            m.ttft.labels(model).observe(result.first_token_at - started)
        rate = result.decode_tokens_per_second
        if rate is not None:
            m.tokens_per_second.labels(model).set(rate)
            m.tpot.labels(model).observe(1 / rate)

    def _update_alerts(self) -> None:
        for name, active in self.alerts.evaluate().items():
            self.metrics.alert.labels(name).set(1 if active else 0)
        if self.trial is not None:  # the trial's verdicts that need a person: a candidate refused, a release undone
            self.metrics.alert.labels("candidate_rejected").set(1 if self.trial.mode == "rejected" else 0)
            self.metrics.alert.labels("release_rolled_back").set(1 if self.trial.mode == "rolled back" else 0)

    async def _sample_load(self) -> None:
        while True:
            self.alerts.sample_load()
            _, cpu, memory = self.alerts.load[-1]
            self.metrics.system_cpu.set(cpu)
            self.metrics.system_memory.set(memory)
            self._update_alerts()
            await asyncio.sleep(LOAD_SAMPLE_SECONDS)

    # ---- routes ----

    async def health(self, request: HttpRequest) -> Response:
        body: dict[str, Any] = {"status": "ok" if self.state == "ready" else self.state}
        if self.error:
            body["error"] = self.error
        return JSONResponse(body, status_code=200 if self.state == "ready" else 503)

    async def metrics_page(self, request: HttpRequest) -> Response:
        self._update_alerts()
        self._update_pool_metrics()
        self._update_trial_metrics()
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: HttpRequest) -> Response:
        encoders = [e.name for e in self.pool.manifest.encoders] if self.pool is not None else []
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "edgepack"}
                for n in [*self.agents, *encoders]]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: HttpRequest) -> Response:
        return await self._complete(openai_api.parse_chat(await read_body(request)),
                                    session=request.headers.get(SESSION_HEADER))

    async def completions(self, request: HttpRequest) -> Response:
        return await self._complete(openai_api.parse_completion(await read_body(request)),
                                    session=request.headers.get(SESSION_HEADER))

    # ---- generation ----

    def _agent(self, name: str | None) -> AgentInfo:
        if self.state != "ready":
            raise ApiError(503, f"the server is {self.state}; retry when /health says ok", code="not_ready")
        if name is None:
            if len(self.agents) == 1:
                return next(iter(self.agents.values()))
            raise ApiError(400, "'model' is required: this server has several agents", param="model")
        agent = self.agents.get(name)
        if agent is None:
            known = ", ".join(self.agents)
            raise ApiError(404, f"model {name!r} does not exist; available: {known}", param="model",
                           code="model_not_found")
        return agent

    async def _complete(self, req: CompletionRequest, hooks: Hooks = NO_HOOKS, session: str | None = None) -> Response:
        started = time.monotonic()
        agent = self._agent(req.model)
        trial = self.trial
        if trial is None:
            return await self._answer(req, agent, started, hooks)
        arm = "candidate" if trial.ab_candidate(agent.name, session or req.user) else "live"
        try:
            response = await self._answer(req, trial.agents[agent.name] if arm == "candidate" else agent, started,
                                          hooks)
        except ApiError as exc:
            trial.arm_answered(arm, None, exc.status >= 500 or exc.status == 429)
            raise
        streamed = isinstance(response, StreamingResponse)  # its latency is the stream's; not counted here
        seconds = None if streamed else time.monotonic() - started
        trial.arm_answered(arm, seconds, False)
        if seconds is not None:
            self.metrics.trial_latency.labels(arm).observe(seconds)
        if arm == "live" and not streamed and not hooks.prompt_tokens:
            busy = (scheduler := self._scheduler_of(agent.model)) is not None and scheduler.queued > 0
            shadow = trial.begin_shadow(agent.name, busy, _repeat_key(req, agent))
            if shadow in ("skipped", "repeat"):
                self.metrics.shadow_requests.labels(agent.name, shadow).inc()
            elif shadow == "run":
                task = asyncio.get_running_loop().create_task(self._shadow(req, agent, bytes(response.body)))
                self._shadows.add(task)
                task.add_done_callback(self._shadows.discard)
        return response

    async def _answer(self, req: CompletionRequest, agent: AgentInfo, started: float, hooks: Hooks) -> Response:
        scheduler = await self._acquire(agent.model)
        release = once(lambda: self.pool.release(agent.model))
        handed_over = False
        try:
            response = await self._complete_with(req, agent, scheduler, started, release, hooks)
            handed_over = isinstance(response, StreamingResponse)  # the stream releases the model when it ends
            return response
        finally:
            if not handed_over:
                release()

    def _scheduler_of(self, model: str) -> BatchScheduler | None:
        loaded = self.pool.loaded.get(model) if self.pool is not None else None
        return loaded.scheduler if loaded is not None else None

    async def _shadow(self, req: CompletionRequest, agent: AgentInfo, live_body: bytes) -> None:
        """Answer `req` again with the candidate's agent, after the live answer went out, and compare the two
        decisions (runtime/trial.py)."""
        trial = self.trial
        assert trial is not None
        candidate = trial.agents[agent.name]
        result = "error"
        try:
            started = time.monotonic()
            response = await self._answer(dataclasses.replace(req, stream=False), candidate, started, NO_HOOKS)
            seconds = time.monotonic() - started
            trial.arm_answered("shadow", seconds, False)
            self.metrics.trial_latency.labels("shadow").observe(seconds)
            scheduler = self._scheduler_of(candidate.model)
            engine = scheduler.engine if scheduler is not None else None
            live_doc = json.loads(live_body)
            live, other = _decision(live_doc, engine), _decision(json.loads(response.body), engine)
            comparison = compare(live, other)
            result = "agree" if comparison.agrees else "disagree"
            trial.compared(agent.name, live_doc.get("id", ""), live, other, comparison)
        except ApiError as exc:
            fatal = exc.code == "load_failed" or (exc.code == "insufficient_memory" and exc.headers is None)
            trial.shadow_failed(agent.name, exc.message, fatal)
        except Exception as exc:  # noqa: BLE001 - a failed replay must never reach the live side
            trial.shadow_failed(agent.name, f"{type(exc).__name__}: {exc}", False)
            self._on_warning(f"shadow replay failed: {type(exc).__name__}: {exc}")
        finally:
            trial.end_shadow()
            self.metrics.shadow_requests.labels(agent.name, result).inc()
            ratio = trial.agreement_ratio(agent.name)
            if ratio is not None:
                self.metrics.shadow_agreement.labels(agent.name).set(ratio)

    def _update_trial_metrics(self) -> None:
        trial = self.trial
        if trial is None:
            return
        self.metrics.candidate.clear()
        self.metrics.candidate.labels(trial.release or "", trial.mode).set(1)
        for name in trial.agents:
            self.metrics.shadow_tier_limit.labels(name).set(tier_limit(trial.tiers.get(name)))

    def switch_to_candidate(self, candidate_live: bool) -> None:
        """The trial promoted its candidate (True: its agents answer live from now on) or rolled it back."""
        trial = self.trial
        assert trial is not None
        if candidate_live:
            self._live_agents = dict(self.agents)
            digests = {a.name: trial.candidate.agent_digest(a) for a in trial.candidate.agent_list()}
            for name, agent in trial.agents.items():
                self.agents[name] = agent
                self.agent_digests[name] = digests[name]  # the caches never mix the two releases' answers
        else:
            for name, agent in self._live_agents.items():
                self.agents[name] = agent
                self.agent_digests[name] = trial.current.agent_digest(agent)

    async def _acquire(self, model: str) -> BatchScheduler:
        """The model's scheduler, loading the model first (in a worker thread) if it is not loaded."""
        pool = self.pool
        assert pool is not None
        scheduler = pool.try_acquire(model)
        if scheduler is not None:
            return scheduler
        try:
            scheduler = await asyncio.to_thread(pool.acquire, model)
        except DoesNotFit as exc:
            headers = {"Retry-After": str(MEMORY_RETRY_AFTER_SECONDS)} if exc.busy else None
            raise ApiError(503, str(exc), code="insufficient_memory", headers=headers) from None
        except EdgepackError as exc:
            raise ApiError(503, f"model {model!r} could not be loaded: {exc}", code="load_failed") from None
        self._loaded(model)
        return scheduler

    def _prompt(self, req: CompletionRequest, agent: AgentInfo, engine: Engine
                ) -> tuple[list[tuple[str, str]], ChatPrompt]:
        """The messages (the agent's system prompt first, unless the request has one) and the prompt: the chat
        template's rendering (with the tools, if any: chat_prompt.py), or a text completion's prompt
        (/apply-template shows the same)."""
        if req.kind != "chat":
            return [], ChatPrompt(req.prompt)
        try:
            plan = chat_prompt(engine, req, agent)
        except EdgepackError as exc:
            raise ApiError(400, str(exc)) from None
        return list(plan.turns), plan

    async def _complete_with(self, req: CompletionRequest, agent: AgentInfo, scheduler: BatchScheduler,
                             started: float, release: Callable[[], None], hooks: Hooks = NO_HOOKS) -> Response:
        engine = scheduler.engine
        messages, plan = self._prompt(req, agent, engine)
        text = plan.text
        prompt = list(hooks.prompt_tokens) or engine.tokenize(text)
        room = engine.n_ctx - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt alone ({len(prompt)} tokens) leaves no room for an answer in the context "
                                f"size ({engine.n_ctx}) of model {engine.name!r}: shorten it",
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens or min(agent.sampling.max_tokens or self.default_max_tokens, room)
        try:
            engine.check_fits(len(prompt), max_tokens)
        except ContextOverflow as exc:
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        sampling = Sampling.layered(max_tokens, agent.sampling, req.sampling, ignore_eos=req.ignore_eos, stop=req.stop,
                                    grammar=plan.grammar or _grammar(req), logit_bias=req.logit_bias,
                                    logprobs=req.logprobs, render_special=plan.tools is not None)
        _check_sampling(engine, sampling)

        def written(token: int) -> bytes:  # a token's text as the answer shows it (for its log-probabilities)
            return engine.token_text(token, special=sampling.render_special)

        lora = (agent.adapter, self.adapter_scales.get(agent.adapter, 1.0)) if agent.adapter else None
        rid = openai_api.new_id(req.kind)
        answer, keys = None, _CacheKeys()
        live = self.agents.get(agent.name) is agent  # a candidate's answers (A/B, shadow) are never cached
        if not hooks.prompt_tokens and req.n == 1 and live:  # n choices are n samples: never one from the cache
            answer, keys = await self._lookup(agent, req, messages, text, sampling, engine, len(prompt),
                                              by_meaning=not plan.uses_tools)
        answers = [answer] if answer is not None else self._submit(scheduler, req, prompt, sampling, lora, started,
                                                                   agent)
        cancel = once(lambda: [a.cancel() for a in answers])
        hooks.on_answer(answers[0].result)
        if req.stream:
            done = once(lambda: (cancel(), release()))  # also when the stream never started
            return StreamingResponse(
                self._stream(answers, req, rid, agent.name, keys, started, done, written, plan.tools),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(done),
            )
        pieces: list[list[str]] = [[] for _ in answers]
        try:
            async with contextlib.aclosing(_interleave([a.pieces for a in answers])) as merged:
                async for index, piece in merged:
                    if piece is not None:
                        pieces[index].append(piece)
        finally:
            cancel()
        texts = ["".join(p) for p in pieces]
        self._remember(keys, answers[0], texts[0])
        self.alerts.latency(agent.name, time.monotonic() - started)
        choices = []
        for index, (answer, text_out) in enumerate(zip(answers, texts, strict=True)):
            result = answer.result
            logprobs = openai_api.logprobs_body(req, result.logprobs, written) \
                if req.logprobs is not None else None
            calls, finish = [], result.finish_reason
            if plan.tools is not None:
                text_out, found = plan.tools.parse(text_out)
                calls = call_docs(found)
                finish = "tool_calls" if found and finish == "stop" else finish  # a call cut off stays "length"
            choices.append(openai_api.choice_doc(req, index, text_out, finish, logprobs=logprobs, tool_calls=calls))
        body = openai_api.completion_body(req, rid, agent.name, choices, answers[0].result.prompt_tokens,
                                          sum(a.result.completion_tokens for a in answers))
        return JSONResponse(body)

    def _submit(self, scheduler: BatchScheduler, req: CompletionRequest, prompt: list[int], sampling: Sampling,
                lora: tuple[str, float] | None, started: float, agent: AgentInfo) -> list[_Answer]:
        """The request's n choices, queued together (all or none): choice i samples with seed+i (when seeded),
        the later ones take the first's prompt cells (runtime/scheduler.py)."""
        jobs = [_new_job(prompt, _choice_sampling(sampling, i), lora, started, req.cache_prompt)
                for i in range(req.n)]
        for job in jobs[1:]:
            job.request.shares_prompt_of = jobs[0].request
        for job in jobs:  # drafts come from the agent's own earlier requests too; an agent may opt out
            job.request.agent, job.request.speculate = agent.name, agent.speculate
        for job in jobs:
            self._started[id(job.request)] = started
        try:
            scheduler.submit(*(job.request for job in jobs))
        except QueueFull as exc:
            for job in jobs:
                self._started.pop(id(job.request), None)
            raise ApiError(429, f"{exc}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return [_Answer(_events(job, self.request_timeout), job.request.result, job.request.cancel.set)
                for job in jobs]

    async def _stream(self, answers: list[_Answer], req: CompletionRequest, rid: str, model: str,
                      keys: _CacheKeys, started: float, done: Callable[[], None], token_text: Callable[[int], bytes],
                      tools: ToolFormat | None = None) -> AsyncIterator[bytes]:
        """Server-sent events: the choices' chunks interleaved as their pieces come, each choice's finish chunk
        when it ends, then the usage (if asked) and [DONE]."""
        choices = [_StreamedChoice(req, rid, model, index, answer, token_text, tools)
                   for index, answer in enumerate(answers)]
        try:
            if req.kind == "chat":
                for choice in choices:
                    yield sse(openai_api.chunk_body(req, rid, model, "", None, index=choice.index, first=True))
            try:
                async with contextlib.aclosing(_interleave([a.pieces for a in answers])) as merged:
                    async for index, piece in merged:
                        for chunk in choices[index].chunks(piece):
                            yield sse(chunk)
            except ApiError as exc:
                yield sse(exc.body())
                return
            if req.include_usage:
                yield sse(openai_api.usage_chunk(req, rid, model, answers[0].result.prompt_tokens,
                                                  sum(a.result.completion_tokens for a in answers)))
            yield b"data: [DONE]\n\n"
            self._remember(keys, answers[0], "".join(choices[0].pieces))
            self.alerts.latency(model, time.monotonic() - started)
        finally:
            done()  # a client that went away frees its slots at once

    # ---- caches ----

    async def _lookup(self, agent: AgentInfo, req: CompletionRequest, messages: list[tuple[str, str]], text: str,
                      sampling: Sampling, engine: Engine, prompt_tokens: int, by_meaning: bool = True
                      ) -> tuple[_Answer | None, _CacheKeys]:
        """Deterministic requests (temperature 0; any, for agents with cache_sampled) are cached: exact match
        (L1, L2), then by meaning (for all agents with --semantic-cache, else for agents that opted in)."""
        keys = _CacheKeys()
        semantic = self.semantic if by_meaning and (self.semantic_all or agent.semantic_threshold is not None) else None
        if (sampling.temperature > 0 and not agent.cache_sampled) or (self.cache is None and semantic is None) \
                or sampling.logprobs is not None:  # a cached answer has no log-probabilities to give
            return None, keys
        digest = self.agent_digests.get(agent.name, agent.name)
        params = dataclasses.asdict(sampling)
        if self.cache is not None:
            keys.exact = cache_key(digest, agent.name, req.kind, text, params)
            level, hit = self.cache.get(keys.exact)
            if hit is not None:
                return self._hit(str(level), hit, prompt_tokens), keys
        if semantic is not None and (req.kind == "text" or messages[-1][0] == "user"):
            chat = req.kind == "chat"
            context = json.dumps(messages[:-1]) if chat else ""  # the system prompt and earlier turns: exact
            embedder = agent.semantic_embedder  # an encoder of the bundle, else the model's own embedding
            partition = partition_key(f"{digest}|{embedder or ''}", agent.name, req.kind, params, context)
            embedded = time.monotonic()
            query = messages[-1][1] if chat else req.prompt
            vector = await asyncio.to_thread(engine.embedder().embed, query) if embedder is None \
                else await asyncio.to_thread(self._encode, embedder, query)
            if vector is not None:
                self.metrics.embedding_seconds.observe(time.monotonic() - embedded)
                keys.semantic = (partition, vector)
                found = semantic.lookup(partition, vector, agent.semantic_threshold)
                if found is not None:
                    self.metrics.semantic_similarity.observe(found[1])
                    return self._hit("semantic", found[0], prompt_tokens), keys
        self.metrics.cache_requests.labels("miss").inc()
        self.alerts.cache_lookup(False)
        return None, keys

    def _encode(self, name: str, text: str) -> Any:
        """`text` embedded by the bundle's encoder `name`, loaded in the budget; None (the request goes on without
        the semantic cache, and a warning says why) when the encoder cannot load."""
        assert self.pool is not None
        try:
            encoder = self.pool.acquire_encoder(name)
        except EdgepackError as exc:  # DoesNotFit included: answering matters more than caching
            self._on_warning(f"semantic cache skipped: encoder {name!r} is not available ({exc})")
            return None
        try:
            vectors, _ = encoder.embed([text])
            return vectors[0]
        finally:
            self.pool.release_encoder(name)

    def _hit(self, level: str, hit: CachedAnswer, prompt_tokens: int) -> _Answer:
        self.metrics.cache_requests.labels(level).inc()
        self.alerts.cache_lookup(True)
        result = Generation(prompt_tokens=prompt_tokens, completion_tokens=hit.completion_tokens,
                            finish_reason=hit.finish_reason)
        return _Answer(_replay(hit.text), result, lambda: None, cached=True)

    def _remember(self, keys: _CacheKeys, answer: _Answer, text: str) -> None:
        result = answer.result
        if answer.cached or result.finish_reason not in ("stop", "length"):
            return
        cached = CachedAnswer(text, result.finish_reason, result.prompt_tokens, result.completion_tokens)
        if keys.exact and self.cache is not None:
            self.cache.put(keys.exact, cached)
        if keys.semantic and self.semantic is not None:
            self.semantic.put(*keys.semantic, cached)
            self.metrics.semantic_entries.set(len(self.semantic))


class _StreamedChoice:
    """One choice of a streamed answer: its pieces become chunks, as they are or read for tool calls (content and
    call deltas), with the log-probabilities not yet sent; its end becomes the finish chunk."""

    def __init__(self, req: CompletionRequest, rid: str, model: str, index: int, answer: _Answer,
                 token_text: Callable[[int], bytes], tools: ToolFormat | None) -> None:
        self.req, self.rid, self.model, self.index, self.answer = req, rid, model, index, answer
        self.token_text = token_text
        self.parser = tools.stream() if tools is not None else None
        self.pieces: list[str] = []
        self.reported = 0  # log-probabilities already sent
        self.called = False

    def chunks(self, piece: str | None) -> list[dict[str, Any]]:
        """The chunks for the next piece of text, or for the end (None)."""
        final = piece is None
        if not final:
            self.pieces.append(piece)
        out = []
        if self.parser is None:
            if piece:
                out.append(self._chunk(piece, self._new_logprobs()))
        else:
            text, calls = delta_docs(self.parser.finish() if final else self.parser.feed(piece))
            self.called = self.called or bool(calls)
            logprobs = self._new_logprobs()
            if text or calls or logprobs:
                out.append(self._chunk(text or None, logprobs, calls))
        if final:
            reason = self.answer.result.finish_reason
            out.append(self._chunk(None, None, finish="tool_calls" if self.called and reason == "stop" else reason))
        return out

    def _chunk(self, text: str | None, logprobs: dict[str, Any] | None, calls: list[dict[str, Any]] | None = None,
               finish: str | None = None) -> dict[str, Any]:
        return openai_api.chunk_body(self.req, self.rid, self.model, text, finish, index=self.index,
                                     logprobs=logprobs, tool_calls=calls)

    def _new_logprobs(self) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        entries = self.answer.result.logprobs[self.reported:]
        self.reported += len(entries)
        return openai_api.logprobs_body(self.req, entries, self.token_text, sum(map(len, self.pieces[:-1])))


@dataclass
class _CacheKeys:
    exact: str | None = None
    semantic: tuple[str, Any] | None = None  # partition, embedding vector


@dataclass
class _Answer:
    """Where a response's text comes from: a live generation or the cache."""

    pieces: AsyncIterator[str]
    result: Generation
    cancel: Callable[[], None]
    cached: bool = False


def _choice_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice `index`'s sampling: seed+index, so the choices differ and a seeded request is reproducible."""
    if index == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index)


def _grammar(req: CompletionRequest) -> str | None:
    """The grammar a request's constraint asks for (400 when its JSON schema cannot be converted)."""
    constraint = req.constraint
    if constraint is None:
        return None
    if constraint.kind == "grammar":
        return constraint.grammar
    try:
        return grammar.from_json_schema(constraint.schema or {})
    except SchemaNotSupported as exc:
        param = "json_schema" if req.kind == "text" else "response_format"
        raise ApiError(400, str(exc), param=param) from None


def _check_sampling(engine: Engine, sampling: Sampling) -> None:
    """What only the model can judge: token ids in range, a grammar that compiles against its vocabulary."""
    for token, _ in sampling.logit_bias:
        if token >= engine.n_vocab:
            raise ApiError(400, f"logit_bias: token {token} is not in the vocabulary of {engine.n_vocab} tokens",
                           param="logit_bias")
    try:
        engine.check_grammar(sampling)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param="grammar") from None


async def _replay(text: str) -> AsyncIterator[str]:
    if text:
        yield text


async def _events(job: _Job, timeout: float) -> AsyncIterator[str]:
    deadline = job.started + timeout
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            job.request.cancel.set()
            raise ApiError(504, f"generation did not finish within {timeout:g}s", code="timeout") from None
        if event is DONE:
            return
        if isinstance(event, Exception):
            message = str(event) if isinstance(event, EdgepackError) else "generation failed"
            raise ApiError(500, message)
        yield event


async def _interleave(streams: list[AsyncIterator[str]]) -> AsyncIterator[tuple[int, str | None]]:
    """The pieces of several streams as they come, each with its stream's index, and (index, None) when that
    stream ends. The first failure of any is raised; closing this stops reading them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[str]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((index, piece))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            running -= item is None
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _api_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(ApiError(exc.status_code, exc.detail).body(), status_code=exc.status_code)


# Requests whose outcome counts toward the error-rate alert: the ones that generate, on every path.
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/chat/completions", "/completion",
                               "/completions"})


class _MetricsMiddleware:
    """Counts every request by endpoint and status, and times it to its last byte (pure ASGI)."""

    def __init__(self, app: Any, metrics: Metrics, endpoints: set[str], alerts: AlertWindow) -> None:
        self.app, self.metrics, self.endpoints, self.alerts = app, metrics, endpoints, alerts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500
        started = time.monotonic()

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            if endpoint in GENERATION_ROUTES:
                self.alerts.outcome(status)


def _repeat_key(req: CompletionRequest, agent: AgentInfo) -> str | None:
    """For a greedy request, what makes its answer: identical keys get identical answers from a release, so a
    shadow trial counts such a request once (runtime/trial.py). None for sampled requests (each is a new draw)."""
    temperature = req.sampling.temperature if req.sampling.temperature is not None else agent.sampling.temperature
    if temperature is None or temperature > 0:
        return None
    what = (agent.name, req.kind, req.messages, req.prompt, req.max_tokens, req.sampling, req.stop, req.tools,
            req.tool_choice, req.parallel_tool_calls, req.constraint, req.logit_bias, req.ignore_eos)
    return hashlib.sha256(repr(what).encode()).hexdigest()


def _decision(body: dict[str, Any], engine: Engine | None) -> Answer:
    """A completion body's first choice as a decision: its text, its tool calls and its first token (the first
    token of the text, or of the first call's name, by `engine`'s vocabulary)."""
    choice = body["choices"][0]
    message = choice.get("message")
    text = (message.get("content") or "") if message is not None else choice.get("text", "")
    calls = tuple(Call(c["function"]["name"], c["function"]["arguments"])
                  for c in (message or {}).get("tool_calls") or ())
    head = text or (calls[0].name if calls else "")
    tokens = engine.tokenize(head, add_special=False) if engine is not None and head else []
    return Answer(text, calls, tokens[0] if tokens else None)
