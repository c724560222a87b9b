"""Measured compression on tiny models: eval numbers, imatrix, the planner's budget, gates, pruning."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from conftest import build_bundle, run_cli

from edgepack.packager import evaluate, gguf_info, imatrix, plan, quant_types, quantize
from edgepack.packager.errors import PackagerError
from edgepack.packager.plan import Option, knapsack
from edgepack.runtime.bundle_format import Manifest
from edgepack.runtime.engine import Engine, Generation, Sampling

TEXT = evaluate.default_text("eval")


@pytest.fixture(scope="module")
def calibration(tiny_gguf) -> imatrix.Imatrix:
    return imatrix.collect([tiny_gguf], evaluate.default_text("calibration"), max_chunks=2)


def manifest_of(bundle) -> Manifest:
    with tarfile.open(bundle) as archive:
        return Manifest.from_json(archive.extractfile("manifest.json").read())


def test_identical_models_have_zero_kld_and_full_agreement(tiny_gguf):
    metrics = evaluate.compare_text([tiny_gguf], [tiny_gguf], TEXT, max_chunks=2)
    assert metrics.kld_mean == pytest.approx(0, abs=1e-9) and metrics.kld_p99 == pytest.approx(0, abs=1e-9)
    assert metrics.top1_agreement == 1.0 and metrics.ppl_reference == metrics.ppl_candidate
    assert metrics.tokens == 2 * (512 - 1 - 256) and metrics.scoring == "half"
    every = evaluate.compare_text([tiny_gguf], [tiny_gguf], TEXT, max_chunks=2, scoring="all")
    assert every.tokens == 2 * 511


def test_eval_numbers_follow_the_definitions(tiny_gguf, tmp_path):
    """Recompute PPL, KLD and agreement for one chunk straight from the two models' logits."""
    from edgepack.packager.forward import Forward

    q4 = tmp_path / "q4.gguf"
    quantize.quantize(tiny_gguf, q4, quant_types.parse("Q4_0"))
    metrics = evaluate.compare_text([tiny_gguf], [q4], TEXT, max_chunks=1, scoring="all")
    with Forward([tiny_gguf], n_ctx=512, threads=2) as ref, Forward([q4], n_ctx=512, threads=2) as cand:
        chunk = ref.chunks(ref.tokenize(TEXT), 1)[0]
        a, b = ref.run(chunk)[:-1].astype(np.float64), cand.run(chunk)[:-1].astype(np.float64)
    pa = np.exp(a - a.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b - b.max(1, keepdims=True))
    pb /= pb.sum(1, keepdims=True)
    kld = (pa * np.log(pa / pb)).sum(1)
    nll = -np.log(pb[np.arange(511), chunk[1:]])
    assert metrics.kld_mean == pytest.approx(kld.mean(), rel=1e-6)
    assert metrics.ppl_candidate == pytest.approx(np.exp(nll.mean()), rel=1e-6)
    assert metrics.top1_agreement == pytest.approx((a.argmax(1) == b.argmax(1)).mean())
    assert metrics.kld_mean > 0 and metrics.top1_agreement < 1


def test_eval_cli_json_and_bad_inputs(tiny_bundle, tiny_gguf, tmp_path):
    result = run_cli("eval", str(tiny_gguf), str(tiny_bundle), "--chunks", "1", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"ppl_reference", "ppl_candidate", "kld_mean", "kld_p99", "top1_agreement", "tokens"} <= set(doc)
    assert 0 < doc["top1_agreement"] <= 1 and doc["tokens"] == 255
    short = tmp_path / "short.txt"
    short.write_text("too short")
    bad = run_cli("eval", str(tiny_gguf), str(tiny_gguf), "--text", str(short))
    assert bad.returncode == 1 and "shorter than one chunk" in bad.stderr
    missing = run_cli("eval", str(tiny_gguf), str(tmp_path / "nope.gguf"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_task_agreement_compares_greedy_answers_and_tool_calls(tiny_gguf, tmp_path):
    tasks = evaluate.load_tasks(evaluate.default_tasks_path())
    assert len(tasks) >= 20
    same = evaluate.compare_tasks([tiny_gguf], [tiny_gguf], tasks[:3], chat_template="chatml")
    assert same.exact_match == 1.0 and same.tasks == 3
    assert evaluate._json_object('Sure: {"name": "f", "arguments": {"x": 1}} done') == {
        "name": "f", "arguments": {"x": 1}}
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"messages": "hi"}\n')
    with pytest.raises(PackagerError, match="tasks.jsonl:1"):
        evaluate.load_tasks(bad)


def test_imatrix_round_trips_in_llama_cpp_format_and_quantizes(tiny_gguf, calibration, tmp_path):
    assert calibration.chunks == 2
    assert "blk.0.attn_q.weight" in calibration.sums and "output.weight" in calibration.sums
    path = tmp_path / "imatrix.gguf"
    imatrix.save(calibration, path)
    loaded = imatrix.load(path)
    assert set(loaded.sums) == set(calibration.sums)
    name = "blk.1.ffn_down.weight"
    np.testing.assert_allclose(loaded.mean_squares(name), calibration.mean_squares(name), rtol=1e-6)
    assert loaded.mean_squares(name).shape == (512,)  # one value per input channel of ffn_down
    out = tmp_path / "q.gguf"
    quantize.quantize(tiny_gguf, out, quant_types.parse("IQ4_XS"), imatrix=loaded)  # IQ types want an imatrix
    assert gguf_info.read(out).quant_types.get("IQ4_XS", 0) > 0
    cli = run_cli("calibrate", str(tiny_gguf), "-o", str(tmp_path / "cli.gguf"), "--chunks", "1")
    assert cli.returncode == 0 and "1 chunks" in cli.stdout


def test_knapsack_is_optimal_and_respects_the_budget():
    rng = np.random.default_rng(3)
    items = [tuple(Option("t", 0, int(size), float(err)) for size, err in
                   zip(rng.integers(10, 100, 3), rng.random(3), strict=True)) for _ in range(6)]
    budget = 250
    picks = knapsack(items, budget)
    assert sum(items[i][k].n_bytes for i, k in enumerate(picks)) <= budget
    import itertools

    best = min(sum(items[i][k].error for i, k in enumerate(combo))
               for combo in itertools.product(range(3), repeat=6)
               if sum(items[i][k].n_bytes for i, k in enumerate(combo)) <= budget)
    assert sum(items[i][k].error for i, k in enumerate(picks)) == pytest.approx(best, rel=1e-3, abs=1e-3)


def test_target_size_build_lands_within_3_percent_and_records_the_plan(tiny_gguf, tmp_path):
    target = int(1.4 * 2**20)
    bundle = build_bundle(tiny_gguf, tmp_path / "plan.edgepack", target_size=target)
    model = manifest_of(bundle).models[0]
    assert model.plan["target_bytes"] == target
    assert target * 0.97 <= model.plan["size"] <= target
    assert len(set(model.plan["tensors"].values())) >= 2  # a real mix, not one uniform type
    assert "kld_mean" in model.quality and model.quality["reference"] == "tiny.gguf"


def test_plan_is_better_than_the_uniform_type_of_the_same_size(tiny_gguf, calibration, tmp_path):
    ladder = plan.build_ladder(gguf_info.read(tiny_gguf), calibration, tmp_path, allow_requantize=False)
    uniform = ladder.files["Q4_K_S"]
    chosen = plan.choose(ladder, uniform.stat().st_size)
    uniform_error = sum(t.options[plan.LADDER.index("Q4_K_S")].error for t in ladder.tensors)
    assert chosen.planned_bytes <= chosen.budget
    assert chosen.predicted_error <= uniform_error * 1.01  # uniform is one feasible choice; the budget is discretised


def test_gate_refuses_a_too_lossy_candidate_and_writes_no_bundle(tiny_gguf, tmp_path):
    out = tmp_path / "lossy.edgepack"
    result = run_cli("build", str(tiny_gguf), "-o", str(out), "--quant", "Q2_K", "--tier", "critical",
                     "--report", str(tmp_path / "report"), "-q")
    assert result.returncode == 1
    assert "quality gate (tiny): exceeds the critical tier" in result.stderr
    assert not out.exists() and (tmp_path / "report" / "report.md").exists()
    ok = build_bundle(tiny_gguf, tmp_path / "ok.edgepack", quant="F16", tier="low-risk")
    quality = manifest_of(ok).models[0].quality
    assert quality["tier"] == {"name": "low-risk", "passed": True, "degradation": pytest.approx(
        1 - quality["top1_agreement"], abs=1e-6)}


def test_pruning_drops_blocks_and_the_model_still_loads_and_runs(tiny_gguf, tmp_path):
    bundle = build_bundle(tiny_gguf, tmp_path / "pruned.edgepack", quant="Q8_0", prune="1",
                          report=tmp_path / "report")
    model = manifest_of(bundle).models[0]
    pruned = model.quality["pruned_layers"]
    assert len(pruned) == 1 and pruned[0] not in (0, 3)
    from edgepack.runtime.store import Store

    store = Store(tmp_path / "store")
    store.install(bundle)
    paths = store.segment_paths(store.manifest())
    info = gguf_info.read(paths[0])
    assert info.block_count == 3
    engine = Engine(paths, name="p", n_ctx=128, n_batch=64, threads=1)
    try:
        result = Generation()
        text = "".join(engine.generate(engine.tokenize("the time"), Sampling(5, temperature=0, ignore_eos=True),
                                       result))
        assert result.completion_tokens == 5 and text
    finally:
        engine.close()
    report = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "layers.png").exists()
    assert layer_table(report) == {i: i in pruned for i in range(4)}  # every source block, the dropped one marked


def layer_table(report: str) -> dict[int, bool]:
    """The report's layer importance table: block -> marked as pruned."""
    assert "## Layer importance" in report, report
    section = report.split("## Layer importance", 1)[1].split("\n## ", 1)[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    column = cells[0].index("pruned")
    return {int(row[0]): row[column] == "✔" for row in cells[2:]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prune", "auto"], "--prune auto needs a tolerance tier"),
        (["--prune", "lots"], "expected 'auto' or a number"),
        (["--prune", "9"], "prune between 1 and 2"),
        (["--target-size", "12 parsecs"], "size '12 parsecs'"),
        (["--target-size", "1KiB"], "below the smallest plan"),
        (["--target-size", "1MiB", "--calibration", "none"], "needs an importance matrix"),
        (["--quant", "Q4_0", "--calibration", "/nonexistent.txt"], "cannot read"),
    ],
)
def test_quality_option_errors_are_one_line(args, message, tiny_gguf, tmp_path):
    out = tmp_path / "x.edgepack"
    result = run_cli("build", str(tiny_gguf), "-o", str(out), "-q", *args)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
