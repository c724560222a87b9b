"""A candidate release beside the current one: the store's candidate link, promote and reject, and serve's trial
(shadow replays compared decision by decision, A/B routing, the automatic verdict) on real tiny models."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from edgepack.packager import recipe as recipe_mod
from edgepack.packager.build import BuildOptions, build
from edgepack.runtime.boards import load_board
from edgepack.runtime.decision_log import read_log
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store
from edgepack.runtime.trial_command import parse_share, start_trial
from tests.conftest import build_bundle, run_cli, serving
from tests.tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_gguf):
    """v1 (the shipped release), v2 (the same weights, a new build: agrees on every decision) and v3 (its blocks
    retrained with other weights: decides differently)."""
    folder = tmp_path_factory.mktemp("trial")
    changed = write_tiny_llama(folder / "changed.gguf", changed_blocks={0, 1, 2, 3}, changed_seed=7)
    return {
        "v1": build_bundle(tiny_gguf, folder / "v1.edgepack", name="tiny", no_eval=True),
        "v2": build_bundle(tiny_gguf, folder / "v2.edgepack", name="tiny", no_eval=True, bundle_version=2),
        "v3": build_bundle(changed, folder / "v3.edgepack", name="tiny", no_eval=True, bundle_version=3),
    }


def store_with(tmp_path, bundles, candidate):
    store = Store(tmp_path / "store")
    store.install(bundles["v1"])
    store.install(bundles[candidate], candidate=True)
    return store


def test_a_candidate_sits_beside_the_current_release(tmp_path, bundles):
    store = Store(tmp_path / "store")
    with pytest.raises(EdgepackError, match="a candidate needs a current release"):
        store.install(bundles["v2"], candidate=True)
    first = store.install(bundles["v1"])
    with pytest.raises(EdgepackError, match="already the current one"):
        store.install(bundles["v1"], candidate=True)
    result = store.install(bundles["v3"], candidate=True)
    assert result.candidate and result.blobs_skipped > 0  # the blocks it did not retrain are shared
    assert store.release_id() == first.release and store.release_id("candidate") == result.release
    assert store.release_id("previous") is None
    assert store.gc()[0] == []  # gc keeps the candidate and its blobs
    assert store.manifest("candidate").bundle_version == 3


def test_promote_and_reject_by_hand_record_the_verdict(tmp_path, bundles):
    store = store_with(tmp_path, bundles, "v2")
    v1, v2 = store.release_id(), store.release_id("candidate")
    result = run_cli("promote", "--store", str(store.root), "--reason", "looked fine")
    assert result.returncode == 0, result.stderr
    assert (store.release_id(), store.release_id("previous"), store.release_id("candidate")) == (v2, v1, None)
    assert store.verdict(v2)["verdict"] == "promoted" and store.verdict(v2)["reason"] == "looked fine"
    store.install(bundles["v3"], candidate=True)
    v3 = store.release_id("candidate")
    result = run_cli("reject", "--store", str(store.root))
    assert result.returncode == 0, result.stderr
    assert store.release_id("candidate") is None and store.release_id() == v2
    assert store.verdict(v3)["verdict"] == "rejected" and store.verdict(v3)["against"] == v2
    result = run_cli("reject", "--store", str(store.root))
    assert result.returncode == 1 and "no candidate release" in result.stderr


def test_install_candidate_refuses_activate(tmp_path, bundles):
    result = run_cli("install", str(bundles["v2"]), "--store", str(tmp_path / "s"), "--candidate", "--activate")
    assert result.returncode == 1 and "--candidate and --activate do not go together" in result.stderr


def metrics(base):
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text, name, **labels):
    """The sample of `name` with exactly these labels (in any order), 0 if absent."""
    for found in re.finditer(re.escape(name) + r"\{([^}]*)\} (\S+)", text):
        if dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) == labels:
            return float(found.group(2))
    return 0.0


def ask(base, text, session=None, user=None):
    headers = {"Content-Type": "application/json", **({"X-Session-Id": session} if session else {})}
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 6,
                       "temperature": 0, **({"user": user} if user else {})}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/chat/completions", body, headers),
                                timeout=60) as response:
        return json.loads(response.read())


def shadowed(base, count):
    """Send `count` different requests one by one, each after the previous replay finished."""
    for i in range(count):
        ask(base, f"question number {i}: what comes next?")
        for _ in range(200):
            text = metrics(base)
            done = sum(metric(text, "edgepack_shadow_requests_total", agent="tiny", result=r)
                       for r in ("agree", "disagree", "error", "skipped"))
            if done >= i + 1:
                break
            time.sleep(0.005)
    return metrics(base)


def test_a_faithful_candidate_is_promoted_and_then_answers_live(tmp_path, bundles):
    store = store_with(tmp_path, bundles, "v2")
    v1, v2 = store.release_id(), store.release_id("candidate")
    with serving(store.root, "--threads", "1", "--no-cache", "--shadow-rate", "100%", "--auto-promote") as base:
        text = shadowed(base, 200)  # 0 of 200 changed: the 95% Wilson bound 1.9% is under the general tier's 2%
        assert metric(text, "edgepack_shadow_requests_total", agent="tiny", result="agree") == 200
        assert metric(text, "edgepack_shadow_agreement_ratio", agent="tiny") == 1.0
        assert metric(text, "edgepack_candidate_info", release=v2, mode="promoted") == 1
        assert (store.release_id(), store.release_id("previous"), store.release_id("candidate")) == (v2, v1, None)
        evidence = store.verdict(v2)
        assert evidence["verdict"] == "promoted" and evidence["agents"]["tiny"]["compared"] == 200
        before = metric(metrics(base), "edgepack_generated_tokens_total", model="candidate.tiny")
        live_before = metric(metrics(base), "edgepack_generated_tokens_total", model="tiny")
        ask(base, "after the promotion")
        for _ in range(50):  # the scheduler counts a generation's tokens just after its answer went out
            text = metrics(base)
            if metric(text, "edgepack_generated_tokens_total", model="candidate.tiny") > before:
                break
            time.sleep(0.1)
        assert metric(text, "edgepack_generated_tokens_total", model="candidate.tiny") > before
        assert metric(text, "edgepack_generated_tokens_total", model="tiny") == live_before


def test_a_candidate_that_decides_differently_is_rejected_with_its_evidence(tmp_path, bundles):
    store = store_with(tmp_path, bundles, "v3")
    v3 = store.release_id("candidate")
    with serving(store.root, "--threads", "1", "--no-cache", "--shadow-rate", "100%", "--auto-promote",
                 "--min-decisions", "20") as base:
        text = shadowed(base, 20)
        assert metric(text, "edgepack_candidate_info", release=v3, mode="rejected") == 1
        assert metric(text, "edgepack_alert", alert="candidate_rejected") == 1
        assert metric(text, "edgepack_shadow_requests_total", agent="tiny", result="disagree") >= 15
        assert store.release_id("candidate") is None and store.verdict(v3)["verdict"] == "rejected"
        shown = run_cli("status", "--url", base)
        assert shown.returncode == 0, shown.stderr
        assert f"{v3} (rejected)" in shown.stdout and re.search(r"shadow tiny +\d+\.\d% agree of 2\d", shown.stdout)
        logged = list(read_log(store.root / "decisions" / "log.jsonl"))
        assert logged and all(r.live.text != r.candidate.text for r in logged)
        assert {r.candidate_release for r in logged} == {v3}
        ask(base, "after the rejection")  # no more replays
        assert sum(metric(metrics(base), "edgepack_shadow_requests_total", agent="tiny", result=r)
                   for r in ("agree", "disagree")) == sum(metric(text, "edgepack_shadow_requests_total", agent="tiny",
                                                                 result=r) for r in ("agree", "disagree"))


def generated(base):
    text = metrics(base)
    return (metric(text, "edgepack_generated_tokens_total", model="tiny"),
            metric(text, "edgepack_generated_tokens_total", model="candidate.tiny"))


def test_ab_keeps_a_conversation_on_one_arm(tmp_path, bundles):
    store = store_with(tmp_path, bundles, "v3")
    with serving(store.root, "--threads", "1", "--no-cache", "--shadow-rate", "0", "--ab", "50%") as base:
        arms = {}
        for session in [f"user-{i}" for i in range(8)]:
            before = generated(base)
            for turn in range(3):  # the header, else OpenAI's user field, names the conversation
                ask(base, f"turn {turn}", *((session, None) if int(session[-1]) % 2 else (None, session)))
            for _ in range(50):  # the tokens are counted just after the last answer went out
                after = generated(base)
                if sum(after) - sum(before) >= 18:
                    break
                time.sleep(0.1)
            live, candidate = (a - b for a, b in zip(after, before, strict=True))
            assert (live == 0) != (candidate == 0), (session, live, candidate)  # one release per conversation
            arms[session] = "candidate" if candidate else "live"
        assert set(arms.values()) == {"live", "candidate"}  # 50%: both arms took some of 8 conversations
        text = metrics(base)
        assert metric(text, "edgepack_trial_request_duration_seconds_count", arm="candidate") > 0
        assert metric(text, "edgepack_trial_request_duration_seconds_count", arm="live") > 0


def test_the_candidates_recipe_sets_its_agents_shadow_rates_and_auto_promotion(tmp_path, bundles, tiny_gguf):
    (tmp_path / "edgepack.toml").write_text(f"""
auto_promote = true
[models.tiny]
source = "{tiny_gguf}"
[agents.tiny]
model = "tiny"
shadow_rate = 0.5
[agents.other]
model = "tiny"
""")
    recipe = recipe_mod.load(tmp_path / "edgepack.toml")
    candidate = tmp_path / "candidate.edgepack"
    build(BuildOptions(output=candidate, recipe=recipe, board=load_board("host"), quiet=True, no_eval=True,
                       bundle_version=5, name="tiny"))
    store = Store(tmp_path / "store")
    store.install(bundles["v1"])
    store.install(candidate, candidate=True)
    lines = []
    trial = start_trial(store, store.manifest(), None, "0%", False, 200, lines.append)
    assert trial.rates == {"tiny": 0.5} and trial.auto_promote  # "other" is not an agent of the current release
    assert trial.mode == "shadow" and set(trial.agents) == {"tiny"}
    flagged = start_trial(store, store.manifest(), "10%", "5%", False, 200, lines.append)
    assert flagged.rates == {"tiny": 0.1} and flagged.mode == "shadow+ab"
    assert start_trial(store, store.manifest(), "0", "0", False, 200, lines.append) is None  # the flag wins: off


@pytest.mark.parametrize(("text", "share"), [("20%", 0.2), ("0.2", 0.2), ("0", 0.0), ("100%", 1.0)])
def test_shares_read_as_percentages_or_fractions(text, share):
    assert parse_share(text, "--ab") == pytest.approx(share)


@pytest.mark.parametrize("text", ["120%", "-1", "lots", "20 %%"])
def test_bad_shares_are_one_line_errors(text):
    with pytest.raises(EdgepackError, match="--ab: expected a share"):
        parse_share(text, "--ab")


def test_a_promoted_release_that_breaks_its_sla_is_rolled_back(tmp_path, bundles, tiny_gguf):
    """The candidate agrees (the same weights), so it is promoted; its recipe's 1 ms SLA cannot be met, so after
    the rollback rule's 100 live requests the store and the process go back to the previous release."""
    (tmp_path / "edgepack.toml").write_text(f"""
auto_promote = true
[models.tiny]
source = "{tiny_gguf}"
quant = "keep"
[agents.tiny]
model = "tiny"
tier = "low-risk"
latency_sla_ms = 1
""")
    candidate = tmp_path / "candidate.edgepack"
    build(BuildOptions(output=candidate, recipe=recipe_mod.load(tmp_path / "edgepack.toml"),
                       board=load_board("host"), quiet=True, no_eval=True, bundle_version=6, name="tiny"))
    store = Store(tmp_path / "store")
    store.install(build_bundle(tiny_gguf, tmp_path / "v1.edgepack", name="tiny", no_eval=True, quant="keep"))
    v1 = store.release_id()
    store.install(candidate, candidate=True)
    new = store.release_id("candidate")
    with serving(store.root, "--threads", "1", "--no-cache", "--shadow-rate", "100%", "--min-decisions", "20") as base:
        text = shadowed(base, 80)  # 0 of 80 changed: the Wilson bound 4.6% is under the low-risk tier's 5%
        assert metric(text, "edgepack_candidate_info", release=new, mode="promoted") == 1
        assert store.release_id() == new
        for i in range(100):
            ask(base, f"after promotion {i}")
        text = metrics(base)
        assert metric(text, "edgepack_candidate_info", release=new, mode="rolled back") == 1
        assert metric(text, "edgepack_alert", alert="release_rolled_back") == 1
        assert (store.release_id(), store.release_id("previous")) == (v1, new)
        live_before = metric(text, "edgepack_generated_tokens_total", model="tiny")
        ask(base, "after the rollback")
        for _ in range(50):
            if metric(metrics(base), "edgepack_generated_tokens_total", model="tiny") > live_before:
                break
            time.sleep(0.1)
        assert metric(metrics(base), "edgepack_generated_tokens_total", model="tiny") > live_before


def test_a_repeated_greedy_request_is_compared_once(tmp_path, bundles):
    store = store_with(tmp_path, bundles, "v2")
    with serving(store.root, "--threads", "1", "--no-cache", "--shadow-rate", "100%") as base:
        shadowed(base, 2)  # two different questions
        for _ in range(3):
            ask(base, "question number 0: what comes next?")  # the first question again, word for word
        text = metrics(base)
        assert metric(text, "edgepack_shadow_requests_total", agent="tiny", result="agree") == 2
        assert metric(text, "edgepack_shadow_requests_total", agent="tiny", result="repeat") == 3
