"""Speculative decoding: n-gram drafts, and greedy output token for token what plain decoding gives."""

from __future__ import annotations

import ctypes
import threading

import llama_cpp
import pytest
from tiny_model import write_tiny_lora

from edgepack.runtime.drafts import DraftLength, NgramTable, PromptLookup, StepCost
from edgepack.runtime.engine import Engine, Sampling
from edgepack.runtime.scheduler import DONE, BatchScheduler, Request

# ---- drafts (pure Python) ----


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(sizes=(3, 2, 1))
    lookup.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    lookup.extend([1, 2, 3])
    assert lookup.draft(4) == [4, 5, 9, 2]  # the 3-gram 1 2 3 first
    assert lookup.draft(2) == [4, 5]
    lookup.extend([6, 2, 3])  # no 3-gram 6 2 3 before; the 2-gram 2 3 last came before 6, then the end
    assert lookup.draft(5) == [6, 2, 3]
    lookup.extend([7])  # 2 3 7 again
    assert lookup.draft(5) == [8, 1, 2, 3, 6]
    lookup.extend([42])  # never seen
    assert lookup.draft(5) == []
    assert lookup.draft(0) == []


def test_prompt_lookup_falls_back_to_the_agents_earlier_requests():
    table = NgramTable(n=2)
    table.add([5, 6, 7, 8, 9, 10, 11])
    table.add([20, 6, 7, 30])  # the latest wins
    assert table.used == 6
    lookup = PromptLookup(sizes=(3, 1), table=table)
    lookup.extend([1, 6, 7])  # no own 3-gram: the table's 2-gram 6 7, and what followed
    assert lookup.draft(8) == [30]
    lookup.extend([8, 9])  # the table's 8 9 before its own 1-gram 9
    assert lookup.draft(2) == [10, 11]
    lookup.extend([1, 6, 7])  # its own 3-gram first
    assert lookup.draft(3) == [8, 9, 1]
    lookup.extend([42])  # nowhere: its own 1-grams are the last resort
    assert lookup.draft(3) == []
    assert PromptLookup(table=table).draft(3) == [] and table.follow([7], 3) == []


def test_draft_length_drafts_what_pays_and_probes_when_nothing_does():
    length = DraftLength(16, prior=0.5, probe=3)
    assert length.next(0.3) == 1  # 0.5 > 0.3, 0.25 is not
    assert length.next(0.6) == 0  # a row costs more than an even chance gives
    for _ in range(4):
        length.update(8, 8)  # whole drafts kept
    assert length.p > 0.95 and length.next(0.6) == 16  # capped at the maximum
    assert 1 <= length.next(0.99) < 16  # dearer rows: a shorter draft
    for _ in range(6):
        length.update(4, 0)  # nothing kept: p falls fast
    assert length.p < 0.2
    assert [length.next(0.3) for _ in range(6)] == [0, 0, 1, 0, 0, 1]  # one token every third step
    length.update(0, 0)  # nothing drafted: nothing learnt
    assert length.p < 0.2


def test_step_cost_fits_what_a_row_adds():
    cost = StepCost()
    assert cost.row_share(1) == 0.5  # nothing measured yet
    for _ in range(3):
        cost.observe(1, 0.010)
    assert cost.row_share(1) == 0.5  # one size of step only: no slope
    for rows, seconds in ((2, 0.014), (5, 0.026), (9, 0.042)):
        cost.observe(rows, seconds)  # 6 ms + 4 ms per row
    assert cost.row_share(1) == pytest.approx(0.4)
    assert cost.row_share(4) == pytest.approx(16 / 22)


# ---- in the scheduler: greedy identity on a tiny model ----

ALWAYS = StepCost(fixed=0.0)  # rows cost nothing: every slot drafts all it can (what identity tests need)
REPEATING = "the time of the way the time of the way the time of the way the time of"
PROMPTS = [REPEATING, "a word of", "what is the way the hot and the way", "you can use one way if they"]


@pytest.fixture(scope="module")
def tiny_q8(tiny_gguf, tmp_path_factory):
    """The tiny model in Q8_0: llama.cpp's CPU kernels give its logits bit for bit the same whether a token is
    decoded alone or beside drafted ones (F32 and F16 weights take another matrix kernel for several rows and
    differ in the last bits, which can flip a sampled token), so outputs can be compared exactly."""
    out = tmp_path_factory.mktemp("q8") / "tiny-q8.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tiny_gguf).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.fixture(scope="module")
def engines(tiny_q8):
    plain = Engine([tiny_q8], name="plain", n_ctx=256, n_batch=64, threads=2, slots=4)
    drafting = Engine([tiny_q8], name="spec", n_ctx=256, n_batch=64, threads=2, slots=4, draft_max=8)
    yield plain, drafting
    plain.close()
    drafting.close()


def run(scheduler: BatchScheduler, prompts: list[str], sampling: Sampling, **request) -> list[Request]:
    """The prompts submitted together (decoded side by side); each request's text in `request.text`."""
    requests = []
    for prompt in prompts:
        pieces: list[str] = []
        finished = threading.Event()
        requests.append(Request(scheduler.engine.tokenize(prompt), sampling,
                                lambda item, p=pieces, f=finished: f.set() if item is DONE else p.append(item),
                                **request))
        requests[-1].text, requests[-1].finished = pieces, finished
    scheduler.submit(*requests)
    for r in requests:
        assert r.finished.wait(120)
        r.text = "".join(r.text)
    return requests


def outcome(requests: list[Request]) -> list[tuple]:
    """Per request: the text, the tokens counted, why it finished and the stop string."""
    return [(r.text, r.result.completion_tokens, r.result.finish_reason, r.result.stop_word) for r in requests]


def texts(scheduler: BatchScheduler, prompts: list[str], sampling: Sampling) -> list[tuple]:
    """outcome() of the prompts, one request at a time."""
    return [outcome(run(scheduler, [prompt], sampling))[0] for prompt in prompts]


@pytest.fixture
def schedulers(engines):
    plain, drafting = engines
    made = [BatchScheduler(plain), BatchScheduler(drafting, speculate=8, cost=ALWAYS)]
    yield made
    for scheduler in made:
        scheduler.stop()


def test_greedy_output_is_identical_with_drafts_several_slots_at_once(schedulers):
    plain, spec = schedulers
    greedy = Sampling(48, temperature=0, ignore_eos=True)
    expected = outcome(run(plain, PROMPTS * 2, greedy))
    spec_requests = run(spec, PROMPTS * 2, greedy)
    assert outcome(spec_requests) == expected
    assert [(r.result.completion_tokens, r.result.finish_reason) for r in spec_requests] == [(48, "length")] * 8
    assert sum(r.accepted for r in spec_requests) == spec.accepted and any(r.drafted for r in spec_requests)
    assert texts(spec, PROMPTS, greedy) == texts(plain, PROMPTS, greedy)
    print(f"\ntiny model: {spec.accepted}/{spec.drafted} drafted tokens accepted")
    assert spec.accepted > 0 and spec.drafted > spec.accepted  # drafts both kept and rejected
    assert plain.drafted == 0


def test_small_batches_leave_drafts_what_the_batch_has_room_for(tiny_gguf):
    """n_batch 8 for 3 slots drafting up to 8 tokens each, prompts read in chunks beside them."""
    made = [BatchScheduler(Engine([tiny_gguf], name=f"small{d}", n_ctx=256, n_batch=8, threads=2, slots=3,
                                  draft_max=d), speculate=d, cost=ALWAYS) for d in (0, 8)]
    try:
        greedy = Sampling(40, temperature=0, ignore_eos=True)
        assert outcome(run(made[1], PROMPTS * 2, greedy)) == outcome(run(made[0], PROMPTS * 2, greedy))
        assert texts(made[1], PROMPTS, greedy) == texts(made[0], PROMPTS, greedy)
        assert made[1].accepted > 0
    finally:
        for scheduler in made:
            scheduler.stop()
            scheduler.engine.close()


def test_max_tokens_and_stop_strings_cut_inside_a_draft(schedulers):
    plain, spec = schedulers
    for max_tokens in (1, 2, 3, 5, 8, 13):
        sampling = Sampling(max_tokens, temperature=0, ignore_eos=True)
        assert texts(spec, [REPEATING], sampling) == texts(plain, [REPEATING], sampling)
    full = texts(plain, [REPEATING], Sampling(40, temperature=0, ignore_eos=True))[0][0]
    words = full.split()
    for stop in {words[len(words) // 2], " ".join(words[5:7]), words[-1] + "x", full[-3:]}:
        sampling = Sampling(40, temperature=0, ignore_eos=True, stop=(stop,))
        assert texts(spec, [REPEATING], sampling) == texts(plain, [REPEATING], sampling), stop


def test_cancellation_stops_where_plain_decoding_stops(schedulers):
    def cancelled_after(scheduler: BatchScheduler, pieces_wanted: int) -> tuple[str, int, str]:
        pieces: list[str] = []
        finished = threading.Event()
        request = Request(scheduler.engine.tokenize(REPEATING), Sampling(60, temperature=0, ignore_eos=True),
                          lambda item: None)

        def emit(item: object) -> None:
            if isinstance(item, str):
                pieces.append(item)
                if len(pieces) == pieces_wanted:
                    request.cancel.set()  # from the decode thread, in the middle of a step's drafted tokens

        request.emit = emit
        scheduler._on_finish = lambda r: finished.set()
        scheduler.submit(request)
        assert finished.wait(120)
        return "".join(pieces), request.result.completion_tokens, request.result.finish_reason

    plain, spec = schedulers
    for wanted in (1, 4, 9):
        assert cancelled_after(spec, wanted) == cancelled_after(plain, wanted)
        assert cancelled_after(spec, wanted)[2] == "cancelled"


def test_prefix_reuse_with_drafts(schedulers):
    plain, spec = schedulers
    greedy = Sampling(24, temperature=0, ignore_eos=True)
    first = texts(plain, [REPEATING], greedy)[0]
    follow = REPEATING + first[0]
    expected = texts(plain, [REPEATING, follow], greedy)
    assert texts(spec, [REPEATING], greedy)[0] == first
    again = run(spec, [REPEATING], greedy)[0]
    assert again.result.cached_tokens == again.result.prompt_tokens - 1  # the slot kept its cells, drafts trimmed
    assert texts(spec, [REPEATING, follow], greedy) == expected


def test_a_shared_agent_table_drafts_from_earlier_requests(schedulers):
    plain, spec = schedulers
    greedy = Sampling(32, temperature=0, ignore_eos=True)
    expected = texts(plain, ["what is the way the hot and the way"] * 2, greedy)
    before = spec.accepted
    assert [r.result.completion_tokens for r in run(spec, ["what is the way the hot and the way"], greedy,
                                                      agent="a")] == [32]
    assert spec.tables["a"].used > 0
    requests = run(spec, ["what is the way the hot and the way"], greedy, agent="a")
    assert requests[0].result.completion_tokens == 32
    assert texts(spec, ["what is the way the hot and the way"] * 2, greedy) == expected
    assert spec.accepted > before


def test_wrong_drafts_are_rejected_and_change_nothing(schedulers):
    """The agent's table says every token is followed by another (a chain of them): the model seldom agrees."""
    plain, spec = schedulers
    greedy = Sampling(32, temperature=0, ignore_eos=True)
    expected = texts(plain, PROMPTS, greedy)
    table = spec.tables["misled"] = NgramTable(n=1)
    n_vocab = spec.engine.n_vocab
    for token in range(n_vocab):
        table.add([token, (token * 7 + 3) % n_vocab])
    requests = [run(spec, [prompt], greedy, agent="misled")[0] for prompt in PROMPTS]
    assert outcome(requests) == expected
    drafted, accepted = sum(r.drafted for r in requests), sum(r.accepted for r in requests)
    print(f"\nmisleading drafts: {accepted}/{drafted} accepted")
    assert drafted > 0 and accepted < drafted


def test_lora_adapter_with_drafts(tiny_gguf, tmp_path):
    adapter = write_tiny_lora(tmp_path / "lora.gguf")
    made = []
    for name, draft_max in (("plain-lora", 0), ("spec-lora", 8)):
        engine = Engine([tiny_gguf], name=name, n_ctx=256, n_batch=64, threads=2, slots=2, draft_max=draft_max)
        engine.load_adapter("agent", adapter)
        made.append(BatchScheduler(engine, speculate=draft_max, cost=ALWAYS))
    try:
        greedy = Sampling(40, temperature=0, ignore_eos=True)
        outs = []
        for scheduler in made:
            requests = run(scheduler, [REPEATING, PROMPTS[2]], greedy, lora=("agent", 1.0))
            outs.append(outcome(requests) + texts(scheduler, [REPEATING], greedy))
        assert outs[0] == outs[1]
        assert made[1].drafted > 0
    finally:
        for scheduler in made:
            scheduler.stop()
            scheduler.engine.close()


def test_seeded_sampled_output_is_identical_with_drafts(schedulers):
    """One random draw per emitted token, drafts or not: a seed gives the same text (so the same distribution)."""
    plain, spec = schedulers
    before = spec.drafted, spec.accepted
    for seed in (1, 2, 3):
        for temperature in (0.3, 1.0):
            sampling = Sampling(40, temperature=temperature, seed=seed, ignore_eos=True)
            assert texts(spec, PROMPTS, sampling) == texts(plain, PROMPTS, sampling), (seed, temperature)
    sampling = Sampling(40, temperature=0.5, seed=7, ignore_eos=True)
    assert outcome(run(spec, PROMPTS, sampling)) == outcome(run(plain, PROMPTS, sampling))  # side by side
    print(f"\nsampled: {spec.accepted - before[1]}/{spec.drafted - before[0]} drafted tokens accepted")
    assert spec.accepted > before[1] and spec.drafted - before[0] > spec.accepted - before[1]


def test_grammar_constrained_output_is_identical_with_drafts(schedulers):
    plain, spec = schedulers
    before = spec.drafted
    grammar = 'root ::= "the" (" the" | " time" | " of" | " way")+'
    words_ = ("the", "time", "of", "way")
    for temperature in (0, 0.8):
        sampling = Sampling(32, temperature=temperature, seed=5, grammar=grammar, ignore_eos=True)
        got, expected = texts(spec, PROMPTS, sampling), texts(plain, PROMPTS, sampling)
        assert got == expected
        for text, *_ in got:  # max_tokens may cut the last word
            *words, last = text.split()
            assert set(words) <= set(words_) and any(w.startswith(last) for w in words_), text
    assert spec.drafted > before


def test_logprobs_are_those_of_plain_decoding_with_drafts(schedulers):
    plain, spec = schedulers
    before = spec.accepted
    sampling = Sampling(32, temperature=0, logprobs=3, ignore_eos=True)
    for got, expected in zip(run(spec, PROMPTS, sampling), run(plain, PROMPTS, sampling), strict=True):
        assert got.text == expected.text and len(got.result.logprobs) == len(expected.result.logprobs) == 32
        assert got.result.logprobs == expected.result.logprobs
    assert spec.accepted > before


def test_an_agent_without_speculation_never_drafts(schedulers):
    _, spec = schedulers
    before = spec.drafted
    run(spec, [REPEATING], Sampling(24, temperature=0, ignore_eos=True), speculate=False)
    assert spec.drafted == before


def test_speculate_needs_room_for_the_drafts(engines):
    from edgepack.runtime.errors import EdgepackError

    with pytest.raises(EdgepackError, match="draft_max"):
        BatchScheduler(engines[0], speculate=4)


# ---- Gemma 3 270M: an agent's answer that copies a tool call from its prompt ----

CALL = ('{"name": "create_ticket", "arguments": {"project": "EDGE-PLATFORM", "title": "Sensor gateway drops MQTT '
        'packets after firmware 2.4.1", "priority": "high", "assignee": "maria.kowalski", "labels": ["mqtt", '
        '"firmware", "regression"]}}')
AGENT = [("system", "You are a support agent. You answer only with a tool call in JSON."),
         ("user", f"Earlier you made this tool call:\n{CALL}\nThe server timed out. Send exactly the same tool call "
                  "again, nothing else.")]
# longer than Gemma 3's sliding window (512): the window's layers keep only its last cells, drafts or not
LONG = [("system", "You are a support agent. You answer only with a tool call in JSON. Ticket history:\n"
         + "\n".join(f"- ticket {i}: sensor {i * 7 % 13} reported packet loss on gateway {i % 5}" for i in range(40))),
        AGENT[1]]


def test_gemma_agent_answer_is_identical_with_drafts(gemma_gguf):
    outputs, rates = [], []
    for draft_max in (0, 12):
        engine = Engine([gemma_gguf], name="gemma", n_ctx=2048, n_batch=256, threads=2, slots=2,
                        chat_template="gemma", draft_max=draft_max)
        scheduler = BatchScheduler(engine, speculate=draft_max, cost=ALWAYS)
        try:
            prompts = [engine.format_chat(AGENT), engine.format_chat(LONG)]
            assert len(engine.tokenize(prompts[1])) > 600
            outputs.append(texts(scheduler, prompts, Sampling(64, temperature=0)))
            rates.append((scheduler.accepted, scheduler.drafted))
        finally:
            scheduler.stop()
            engine.close()
    accepted, drafted = rates[1]
    print(f"\nGemma 3 270M, agent prompts: {accepted}/{drafted} drafted tokens accepted; {outputs[1][0][0][:80]!r}")
    assert outputs[1] == outputs[0]
    assert accepted > drafted / 2


# ---- through `edgepack serve` ----

def test_serve_speculate_gives_the_same_answers_and_counts_drafts_per_agent(tiny_gguf, tmp_path):
    """The real server with --speculate 8: the same greedy answers as without, drafted/accepted tokens in the
    metrics under the agent's name, and an agent with `speculate = false` never drafted."""
    import json
    import re
    import urllib.request

    from conftest import serving

    from edgepack.packager import recipe as recipe_mod
    from edgepack.packager.build import BuildOptions, build
    from edgepack.runtime.boards import load_board
    from edgepack.runtime.store import Store

    (tmp_path / "edgepack.toml").write_text(f"""
[models.tiny]
source = "{tiny_gguf}"
quant = "keep"
[agents.writer]
model = "tiny"
[agents.careful]
model = "tiny"
speculate = false
""")
    bundle = tmp_path / "agents.edgepack"
    build(BuildOptions(output=bundle, recipe=recipe_mod.load(tmp_path / "edgepack.toml"), board=load_board("host"),
                       quiet=True, no_eval=True, bundle_version=1))
    Store(tmp_path / "store").install(bundle)

    def answers(base):
        out = []
        for agent in ("writer", "careful"):
            for prompt in (REPEATING, PROMPTS[2], REPEATING):  # again: the agent's table drafts its own answer
                body = json.dumps({"model": agent, "prompt": prompt, "max_tokens": 24, "temperature": 0}).encode()
                request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    out.append(json.loads(response.read())["choices"][0]["text"])
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            return out, response.read().decode()

    with serving(tmp_path / "store", "--threads", "1", "--no-cache") as base:
        plain, _ = answers(base)
    with serving(tmp_path / "store", "--threads", "1", "--no-cache", "--speculate", "8") as base:
        drafted, metrics = answers(base)
    assert drafted == plain

    def counted(name, agent):
        found = re.search(rf'{name}_total{{agent="{agent}",model="tiny"}} (\S+)', metrics)
        return float(found.group(1)) if found else 0.0

    assert counted("edgepack_spec_accepted_tokens", "writer") > 0
    assert counted("edgepack_spec_drafted_tokens", "writer") >= counted("edgepack_spec_accepted_tokens", "writer")
    assert counted("edgepack_spec_drafted_tokens", "careful") == 0

