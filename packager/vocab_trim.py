"""The build's vocabulary step (`--vocab auto|N|FILE`): find the tokens the agent needs, trim, measure, gate.

The fill beyond the agent's own tokens ranks pieces two ways and takes a piece at the better of its two ranks: the
probability mass the source model itself gives it while reading the calibration text (what it would say in the
agent's domain and language), and the tokenizer's merge order (its training corpus frequencies).

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
import numpy as np

from . import evaluate, gates, vocab
from .errors import PackagerError
from .forward import Forward

AUTO_SIZES = tuple(k * 1024 for k in (8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 112, 128, 160, 192))
EVAL_WINDOWS = 8  # windows of 1 KiB of the evaluation text for bits per byte
ORDER_CHUNKS = 8  # 512-token chunks of the calibration text whose predictions rank the fill


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


class Trimmer:
    """The source's side of trimming, worked out once for any number of sizes: its tokenizer, the agent's tokens,
    its answers to the tasks, its bits per byte and the fill order."""

    def __init__(self, source: Path, agent: AgentText, *, eval_text: str | None, measure: bool, fill: bool,
                 threads: int, note: Callable[[str], None], id_file: Path | None = None) -> None:
        self.source, self.agent, self.threads, self.note = source, agent, threads, note
        self.tok = vocab.Tokenizer(gguf.GGUFReader(source), source)
        extra = vocab.read_id_file(id_file, self.tok.n_vocab) if id_file else set()
        self.answers = None
        if agent.tasks and measure:
            note(f"vocabulary: answers of {source.name} to {len(agent.tasks)} agent tasks")
            self.answers = evaluate.task_answers([source], agent.tasks, threads=threads,
                                                 chat_template=agent.chat_template)
        self.needed = _needed(source, agent, self.answers) | extra
        self.alphabet = vocab.alphabet_of([agent.calibration, *agent.system_prompts,
                                           *(self.answers.prompts + self.answers.answers if self.answers else [])])
        self.eval_text = (eval_text if eval_text is not None else evaluate.default_text("eval")) if measure else None
        self.windows = evaluate.text_windows(self.eval_text, 1024, EVAL_WINDOWS) if self.eval_text else []
        self.bpb = evaluate.bits_per_byte([source], self.windows, threads=threads)[0] if measure else None
        self.order = None
        if fill:
            note("vocabulary: ranking the pieces by the model's own predictions on the calibration text")
            self.order = fill_order(source, self.tok, agent.calibration, threads)

    def required(self) -> int:
        return len(vocab.select(self.tok, self.needed, None, self.alphabet, self.order).kept)

    def attempt(self, size: int | None, work: Path) -> tuple[vocab.Selection, Trial, Path]:
        """The source trimmed to `size` tokens (None: the required ones) in `work`, measured."""
        selection = vocab.select(self.tok, self.needed, size, self.alphabet, self.order)
        kept = len(selection.kept)
        self.note(f"vocabulary: {kept:,} of {self.tok.n_vocab:,} tokens")
        path = work / f"vocab-{kept}.gguf"
        vocab.write_trimmed(self.source, selection.kept, path)
        return selection, self._measure(path, selection.kept), path

    def _measure(self, path: Path, kept: tuple[int, ...]) -> Trial:
        calibration = vocab.unchanged_share(self.source, path, kept, self.agent.calibration)
        if self.eval_text is None or self.bpb is None:
            return Trial(len(kept), path.stat().st_size, None, None, None, calibration, None, None)
        bpb = evaluate.bits_per_byte([path], self.windows, threads=self.threads)[0]
        tasks = None
        if self.answers is not None and self.agent.tasks:
            mine = evaluate.task_answers([path], self.agent.tasks, threads=self.threads,
                                         chat_template=self.agent.chat_template)
            tasks = evaluate.task_agreement(self.answers.answers, mine.answers)
        degradation = max(bpb / self.bpb - 1, 1 - tasks.exact_match if tasks else 0.0)
        return Trial(len(kept), path.stat().st_size, self.bpb, bpb, tasks, calibration,
                     vocab.unchanged_share(self.source, path, kept, self.eval_text), degradation)


def trim(source: Path, request: vocab.Request, work: Path, agent: AgentText, *, eval_text: str | None,
         tier: str | None, threads: int, note: Callable[[str], None]) -> Trimmed:
    if request.auto and tier is None:
        raise PackagerError("--vocab auto needs a tolerance tier (--tier critical|general|low-risk)")
    started = time.monotonic()
    trimmer = Trimmer(source, agent, eval_text=eval_text, measure=eval_text is not None or tier is not None,
                      fill=request.file is None, threads=threads, note=note, id_file=request.file)
    trials: list[Trial] = []
    if request.auto:
        assert tier is not None
        required = trimmer.required()
        sizes = [required] + [s for s in AUTO_SIZES if required < s < trimmer.tok.n_vocab]
        chosen = None
        low, high = 0, len(sizes) - 1  # degradation falls as the vocabulary grows: bisect the ladder
        while low <= high:
            middle = (low + high) // 2
            result = trimmer.attempt(sizes[middle], work)
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
        chosen = trimmer.attempt(request.size, work)
        trials.append(chosen[1])
    selection, trial, path = chosen
    report = {
        "request": str(request), "source_tokens": trimmer.tok.n_vocab, "kept": len(selection.kept),
        "required": selection.required, "tokenizer": trimmer.tok.kind_name,
        "seconds": round(time.monotonic() - started, 2), **trial_dict(trial),
    }
    if request.auto:
        report["trials"] = [trial_dict(t) for t in trials]
    return Trimmed(path, report, verdict(trial, tier) if tier else None)


def verdict(trial: Trial, tier: str) -> gates.Verdict:
    limit = gates.tolerance(tier)
    passed = trial.passes(tier)
    advice = "" if passed else " — keep more tokens (--vocab N) or loosen the --tier"
    return gates.Verdict(tier, passed, trial.degradation or 0.0,
                         f"vocabulary {'passes' if passed else 'exceeds'} the {tier} tier (< {limit:.1%}): "
                         f"{_worst(trial)}{advice}")


def fill_order(source: Path, tok: vocab.Tokenizer, text: str, threads: int) -> list[int]:
    """Plain pieces by the better of two ranks: the model's predicted probability mass over the text, and the
    tokenizer's merge order."""
    mass = np.zeros(tok.n_vocab, dtype=np.float64)
    with Forward([source], n_ctx=512, threads=threads) as model:
        for chunk in model.chunks(model.tokenize(text), ORDER_CHUNKS):
            logits = model.run(chunk)
            for start in range(0, len(logits), 16):
                rows = logits[start:start + 16]
                weights = np.exp(rows - rows.max(axis=1, keepdims=True))
                mass += (weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)
    if not mass.any():  # a text shorter than one chunk: the merge order alone
        return tok.frequency_order()
    by_mass = np.empty(tok.n_vocab)
    by_mass[np.argsort(-mass, kind="stable")] = np.arange(tok.n_vocab)
    merged = tok.frequency_order()
    by_merge = np.full(tok.n_vocab, np.inf)
    by_merge[merged] = np.arange(len(merged))
    return [int(i) for i in np.argsort(np.minimum(by_mass, by_merge), kind="stable") if tok.types[i] == vocab.NORMAL]


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


def _worst(trial: Trial) -> str:
    rise = (trial.bpb_candidate or 0) / (trial.bpb_reference or 1) - 1
    changed = 1 - trial.tasks.exact_match if trial.tasks else None
    if changed is not None and changed >= rise:
        return f"task answers changed {changed:.2%}"
    return f"bits per byte +{rise:.2%}"


def trial_dict(trial: Trial) -> dict[str, Any]:
    doc = asdict(trial)
    doc["kept"] = doc.pop("size")
    for key in ("bpb_reference", "bpb_candidate", "unchanged_calibration", "unchanged_eval", "degradation"):
        if doc[key] is not None:
            doc[key] = round(float(doc[key]), 6)  # a numpy float would reach the manifest as text
    return doc
