"""The build's vocabulary step (`--vocab auto|N|FILE`): find the tokens the agent needs, trim, measure, gate.

Quality is measured against the untrimmed source with what does not depend on the vocabulary: bits per byte on the
evaluation text and the greedy answers to the agent tasks; plus the share of text whose tokenization is unchanged.
`auto` tries sizes from small to large and keeps the smallest within the tier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from . import evaluate, gates, vocab
from .errors import PackagerError

AUTO_SIZES = (8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072)
EVAL_WINDOWS = 8  # windows of 1 KiB of the evaluation text for bits per byte


@dataclass(frozen=True)
class AgentText:
    """What the vocabulary is chosen from."""

    calibration: str
    system_prompts: tuple[str, ...] = ()
    tasks: list[dict[str, Any]] | None = None
    chat_template: str | None = None


@dataclass(frozen=True)
class Trial:
    size: int
    file_size: int
    bpb_reference: float | None
    bpb_candidate: float | None
    tasks: evaluate.TaskMetrics | None
    unchanged_calibration: float
    unchanged_eval: float | None
    degradation: float | None  # the worst of 1 - task exact match and the relative rise in bits per byte

    def passes(self, tier: str) -> bool:
        return self.degradation is not None and self.degradation < gates.tolerance(tier)


@dataclass(frozen=True)
class Trimmed:
    path: Path
    report: dict[str, Any]  # the manifest's quality["vocab"]
    verdict: gates.Verdict | None


def trim(source: Path, request: vocab.Request, work: Path, agent: AgentText, *, eval_text: str | None,
         tier: str | None, threads: int, note: Callable[[str], None]) -> Trimmed:
    if request.auto and tier is None:
        raise PackagerError("--vocab auto needs a tolerance tier (--tier critical|general|low-risk)")
    started = time.monotonic()
    tok = vocab.Tokenizer(gguf.GGUFReader(source), source)
    extra = vocab.read_id_file(request.file, tok.n_vocab) if request.file else set()
    measure = eval_text is not None or tier is not None
    answers = None
    if agent.tasks and (measure or request.auto):
        note(f"vocabulary: answers of {source.name} to {len(agent.tasks)} agent tasks")
        answers = evaluate.task_answers([source], agent.tasks, threads=threads, chat_template=agent.chat_template)
    needed = _needed(source, agent, answers) | extra
    alphabet = vocab.alphabet_of([agent.calibration, *agent.system_prompts,
                                  *(answers.prompts + answers.answers if answers else [])])
    text = eval_text if eval_text is not None else evaluate.default_text("eval")
    windows = evaluate.text_windows(text, 1024, EVAL_WINDOWS)
    bpb_source = evaluate.bits_per_byte([source], windows, threads=threads)[0] if measure or request.auto else None

    def attempt(size: int | None) -> tuple[vocab.Selection, Trial, Path]:
        selection = vocab.select(tok, needed, size, alphabet)
        kept = len(selection.kept)
        note(f"vocabulary: {kept:,} of {tok.n_vocab:,} tokens")
        path = work / f"vocab-{kept}.gguf"
        vocab.write_trimmed(source, selection.kept, path)
        trial = _measure(source, path, selection.kept, agent.calibration, text if measure or request.auto else None,
                         windows, bpb_source, answers, agent, threads)
        return selection, trial, path

    trials: list[Trial] = []
    if request.auto:
        assert tier is not None
        required = len(vocab.select(tok, needed, None, alphabet).kept)
        sizes = [required] + [s for s in AUTO_SIZES if required < s < tok.n_vocab]
        chosen = None
        low, high = 0, len(sizes) - 1  # degradation falls as the vocabulary grows: bisect the ladder
        while low <= high:
            middle = (low + high) // 2
            result = attempt(sizes[middle])
            trials.append(result[1])
            if result[1].passes(tier):
                chosen, high = result, middle - 1
            else:
                low = middle + 1
        if chosen is None:
            worst = trials[-1]
            raise PackagerError(f"--vocab auto: even {worst.size:,} tokens exceed the {tier} tier "
                                f"(degradation {worst.degradation:.2%}); pass --vocab N or a looser --tier")
    else:
        chosen = attempt(request.size)
        trials.append(chosen[1])
    selection, trial, path = chosen
    verdict = None
    if tier is not None:
        limit = gates.tolerance(tier)
        passed = trial.passes(tier)
        verdict = gates.Verdict(tier, passed, trial.degradation or 0.0,
                                f"vocabulary {'passes' if passed else 'exceeds'} the {tier} tier (< {limit:.1%}): "
                                f"{_worst(trial)}" + ("" if passed else " — keep more tokens (--vocab N) or loosen "
                                                                         "the --tier"))
    report = {
        "request": str(request), "source_tokens": tok.n_vocab, "kept": len(selection.kept),
        "required": selection.required, "tokenizer": tok.kind_name, "seconds": round(time.monotonic() - started, 2),
        **_trial_dict(trial),
    }
    if request.auto:
        report["trials"] = [_trial_dict(t) for t in trials]
    return Trimmed(path, report, verdict)


def _needed(source: Path, agent: AgentText, answers: evaluate.Answers | None) -> set[int]:
    """Ids of the source's tokenization of the agent's text: calibration text, system prompts, task prompts in the
    chat template (its control tokens parsed) and the source's answers."""
    with vocab.VocabModel(source) as model:
        ids = set(model.tokenize(agent.calibration))
        for prompt in agent.system_prompts:
            ids.update(model.tokenize(prompt))
        if answers is not None:
            for prompt, answer in zip(answers.prompts, answers.answers, strict=True):
                ids.update(model.tokenize(prompt, special=True))
                ids.update(model.tokenize(prompt + answer, special=True))
    return ids


def _measure(source: Path, path: Path, kept: tuple[int, ...], calibration: str, eval_text: str | None,
             windows: list[str], bpb_source: float | None, answers: evaluate.Answers | None, agent: AgentText,
             threads: int) -> Trial:
    size = len(kept)
    calibration_share = vocab.unchanged_share(source, path, kept, calibration)
    if eval_text is None:
        return Trial(size, path.stat().st_size, None, None, None, calibration_share, None, None)
    bpb = evaluate.bits_per_byte([path], windows, threads=threads)[0]
    tasks = None
    if answers is not None and agent.tasks:
        mine = evaluate.task_answers([path], agent.tasks, threads=threads, chat_template=agent.chat_template)
        tasks = evaluate.task_agreement(answers.answers, mine.answers)
    assert bpb_source is not None
    degradation = max(bpb / bpb_source - 1, 1 - tasks.exact_match if tasks else 0.0)
    return Trial(size, path.stat().st_size, bpb_source, bpb, tasks, calibration_share,
                 vocab.unchanged_share(source, path, kept, eval_text), degradation)


def _worst(trial: Trial) -> str:
    rise = (trial.bpb_candidate or 0) / (trial.bpb_reference or 1) - 1
    changed = 1 - trial.tasks.exact_match if trial.tasks else None
    if changed is not None and changed >= rise:
        return f"task answers changed {changed:.2%}"
    return f"bits per byte +{rise:.2%}"


def _trial_dict(trial: Trial) -> dict[str, Any]:
    doc = asdict(trial)
    doc["kept"] = doc.pop("size")
    for key in ("bpb_reference", "bpb_candidate", "unchanged_calibration", "unchanged_eval", "degradation"):
        if doc[key] is not None:
            doc[key] = round(doc[key], 6)
    return doc
