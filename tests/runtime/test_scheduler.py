"""Continuous batching: same greedy tokens as one-at-a-time decoding, slots, queue limits, cancellation."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
from conftest import start_server, stop_server, wait_ready

from edgepack.runtime.engine import Engine, Generation, Sampling
from edgepack.runtime.scheduler import DONE, BatchScheduler, QueueFull, Request

PROMPTS = ["the time", "a word of", "what is the way", "hot and", "the", "you can use", "one way", "if they"]


class Collector:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.done = threading.Event()
        self.error: Exception | None = None

    def __call__(self, event: object) -> None:
        if event is DONE:
            self.done.set()
        elif isinstance(event, Exception):
            self.error = event
            self.done.set()
        else:
            self.pieces.append(event)


@pytest.fixture(scope="module")
def sequential(tiny_gguf) -> list[str]:
    engine = Engine([tiny_gguf], name="seq", n_ctx=256, n_batch=64, threads=2)
    try:
        return ["".join(engine.generate(engine.tokenize(p), Sampling(40, temperature=0, ignore_eos=True),
                                        Generation())) for p in PROMPTS]
    finally:
        engine.close()


@pytest.mark.parametrize(("slots", "n_batch"), [(4, 64), (3, 8)])
def test_batched_greedy_equals_sequential(tiny_gguf, sequential, slots, n_batch):
    """More requests than slots, and (n_batch=8) prompts longer than a batch: chunked prefill."""
    engine = Engine([tiny_gguf], name="batch", n_ctx=256, n_batch=n_batch, threads=2, slots=slots)
    scheduler = BatchScheduler(engine)
    try:
        collectors = [Collector() for _ in PROMPTS]
        for prompt, collector in zip(PROMPTS, collectors, strict=True):
            scheduler.submit(Request(engine.tokenize(prompt), Sampling(40, temperature=0, ignore_eos=True),
                                     collector))
        for collector in collectors:
            assert collector.done.wait(60) and collector.error is None
        assert ["".join(c.pieces) for c in collectors] == sequential
    finally:
        scheduler.stop()
        engine.close()


def test_queue_limit_and_cancellation_free_slots(tiny_gguf):
    engine = Engine([tiny_gguf], name="q", n_ctx=256, n_batch=64, threads=1, slots=1)
    seen: list[Request] = []
    scheduler = BatchScheduler(engine, max_queue=1, on_finish=seen.append)
    try:
        long = Sampling(240, temperature=0, ignore_eos=True)
        first, second = Collector(), Collector()
        running = Request(engine.tokenize("the"), long, first)
        scheduler.submit(running)
        deadline = time.monotonic() + 10
        while scheduler.active < 1:  # admitted into the slot, so the queue is empty again
            assert time.monotonic() < deadline
            time.sleep(0.005)
        waiting = Request(engine.tokenize("a"), long, second)
        scheduler.submit(waiting)
        with pytest.raises(QueueFull):
            scheduler.submit(Request(engine.tokenize("hot"), long, Collector()))
        running.cancel.set()
        assert second.done.wait(30) and second.error is None
        assert running.result.finish_reason == "cancelled" and running.result.completion_tokens < 240
        assert waiting.result.completion_tokens == 240
        assert seen == [running, waiting]
    finally:
        scheduler.stop()
        engine.close()


def test_full_queue_gets_429_with_retry_after(served_store):
    # a long context so the first generation holds the slot for seconds even on a fast machine; closing the
    # stream cancels it
    process, base = start_server(served_store, "--threads", "1", "--slots", "1", "--max-queue", "0", "--ctx", "32768")
    try:
        wait_ready(base, process)
        body = {"model": "tiny", "prompt": "the", "max_tokens": 32000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=90) as client, client.stream("POST", base + "/v1/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection, which frees the slot
            next(lines)  # the first request holds the only slot
            refused = client.post(base + "/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
        deadline = time.monotonic() + 20
        while True:  # the slot comes back once the stream is gone
            ok = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 2},
                            timeout=30)
            if ok.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ok.status_code == 200
    finally:
        stop_server(process)


def test_request_timeout_gives_504_and_frees_the_slot(served_store):
    process, base = start_server(served_store, "--threads", "1", "--slots", "1", "--request-timeout", "0.005",
                                 "--ctx", "32768", "--preload")
    try:
        wait_ready(base, process)
        too_long = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 100000},
                              timeout=30)
        assert too_long.status_code == 400  # cannot fit the context at all: refused before it starts
        body = {"model": "tiny", "prompt": "the", "max_tokens": 32000, "ignore_eos": True}  # never done in 5 ms
        timed_out = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert timed_out.status_code == 504 and "did not finish" in timed_out.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while "edgepack_generations_cancelled_total{model=\"tiny\"} 1.0" not in httpx.get(base + "/metrics").text:
            # counted whether it was cancelled in its slot or while it still waited for one
            assert time.monotonic() < deadline, "the timed-out generation was not cancelled"
            time.sleep(0.05)
        active = [line for line in httpx.get(base + "/metrics").text.splitlines()
                  if line.startswith("edgepack_active_slots{")]
        assert active == ['edgepack_active_slots{model="tiny"} 0.0']
    finally:
        stop_server(process)


def test_prefix_reuse_gives_the_same_tokens_and_skips_the_shared_prompt(tiny_gguf, sequential):
    """A slot keeps its KV cells: a prompt that starts like the slot's last one processes only the rest."""
    engine = Engine([tiny_gguf], name="prefix", n_ctx=256, n_batch=64, threads=2, slots=2)
    scheduler = BatchScheduler(engine)

    def run(prompt: str, tokens: int = 40) -> tuple[str, Generation]:
        collector = Collector()
        request = Request(engine.tokenize(prompt), Sampling(tokens, temperature=0, ignore_eos=True), collector)
        scheduler.submit(request)
        assert collector.done.wait(60) and collector.error is None
        return "".join(collector.pieces), request.result

    try:
        text, result = run(PROMPTS[2])
        assert text == sequential[2] and result.cached_tokens == 0
        again, result = run(PROMPTS[2])  # the whole prompt is cached: only its last token is fed again
        assert again == sequential[2] and result.cached_tokens == result.prompt_tokens - 1
        # a longer prompt that continues the first one reuses at least its tokens
        follow = PROMPTS[2] + sequential[2]
        expected = "".join(Engine.generate(fresh := Engine([tiny_gguf], name="f", n_ctx=256, n_batch=64, threads=2),
                                           fresh.tokenize(follow), Sampling(8, temperature=0, ignore_eos=True),
                                           Generation()))
        fresh.close()
        text, result = run(follow, 8)
        assert text == expected and result.cached_tokens >= len(engine.tokenize(PROMPTS[2]))
        other, result = run(PROMPTS[0])  # little in common (BOS, a few byte tokens): still the same answer
        assert other == sequential[0] and result.cached_tokens < result.prompt_tokens // 2
    finally:
        scheduler.stop()
        engine.close()


def test_slot_controller_shrinks_over_target_and_grows_back():
    from edgepack.runtime.scheduler import SlotController

    controller = SlotController(4, target=0.010, window=10)
    for _ in range(10):
        controller.observe(0.020)
    assert controller.limit == 3 and controller.p95 == 0.020
    for _ in range(30):
        controller.observe(0.020)
    assert controller.limit == 1  # never below one slot
    for _ in range(10):
        controller.observe(0.008)  # under target but not well under: hold
    assert controller.limit == 1
    for _ in range(40):
        controller.observe(0.002)
    assert controller.limit == 4  # never above the slots
    free = SlotController(4, target=None)
    for _ in range(100):
        free.observe(1.0)
    assert free.limit == 4


def test_adaptive_limit_caps_the_batch_and_shows_in_metrics(served_store):
    """A target no step can meet: the controller lets one slot decode at a time, visibly in /metrics, and
    concurrent requests wait for it although slots are free."""
    process, base = start_server(served_store, "--threads", "1", "--slots", "4", "--tpot-target", "0.1",
                                 "--ctx", "8192")
    askers: list[threading.Thread] = []
    try:
        wait_ready(base, process)
        body = {"model": "tiny", "prompt": "the", "max_tokens": 200, "ignore_eos": True}
        # 200 decode steps over the target: the limit drops by one slot every 32, from 4 to 1
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        metrics = httpx.get(base + "/metrics").text
        assert 'edgepack_slot_limit{model="tiny"} 1.0' in metrics
        assert 'edgepack_tpot_target_seconds{model="tiny"} 0.0001' in metrics

        def ask() -> None:  # long enough to be still running while we look; the server is stopped under it
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(base + "/v1/completions", json={**body, "max_tokens": 8000}, timeout=300)

        askers = [threading.Thread(target=ask) for _ in range(4)]
        for asker in askers:
            asker.start()
        deadline = time.monotonic() + 120  # for a loaded machine; the state below holds for seconds
        while True:
            gauges = {line.split("{")[0]: float(line.split()[-1]) for line in httpx.get(base + "/metrics").text
                      .splitlines() if line.startswith(("edgepack_active_slots{", "edgepack_queue_depth{"))}
            active, queued = gauges["edgepack_active_slots"], gauges["edgepack_queue_depth"]
            assert active <= 1, f"{active:g} requests decoded together under a limit of one slot"
            if (active, queued) == (1, 3):  # all four submitted: one decodes, three wait with three slots free
                break
            assert time.monotonic() < deadline, f"never saw 1 active and 3 queued (last: {active:g}, {queued:g})"
            time.sleep(0.05)
    finally:
        process.kill()  # not a graceful stop, which would wait for the four long generations
        process.wait()
        for asker in askers:
            asker.join(60)
