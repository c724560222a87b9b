"""Quality of a candidate against its reference: perplexity, KL divergence, top-1 agreement, task agreement.

Text metrics follow llama.cpp's `llama-perplexity --kl-divergence`: the text is tokenized once, cut into
n_ctx-token chunks (BOS first), and with scoring="half" (the default, llama-perplexity's convention)
only positions n_ctx/2 .. n_ctx-2 of each chunk are scored, so every scored token has at least half a
context before it; scoring="all" scores positions 0 .. n_ctx-2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.runtime.engine import Engine, Generation, Sampling

from .errors import PackagerError
from .forward import Forward

SCORINGS = ("half", "all")
DATA_DIR = Path(__file__).parent / "data"
_TASK_MAX_TOKENS = 96


@dataclass(frozen=True)
class TextMetrics:
    ppl_reference: float
    ppl_candidate: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    top1_agreement: float
    tokens: int  # positions scored
    chunks: int
    ctx: int
    scoring: str


@dataclass(frozen=True)
class TaskMetrics:
    tasks: int
    exact_match: float
    structured: int  # tasks whose reference answer is a tool call / JSON object
    name_agreement: float | None  # among structured: same function name
    arguments_agreement: float | None  # among structured: same name and same arguments


def default_text(kind: str = "eval") -> str:
    """The project's own evaluation or calibration text (packager/data, CC0)."""
    return (DATA_DIR / f"{kind}.txt").read_text()


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise PackagerError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PackagerError(f"{path}: not UTF-8 text") from None


def default_tasks_path() -> Path:
    return DATA_DIR / "tasks.jsonl"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def compare_text(
    reference: list[Path], candidate: list[Path], text: str, *, ctx: int = 512, scoring: str = "half",
    max_chunks: int | None = None, threads: int = 2,
) -> TextMetrics:
    if scoring not in SCORINGS:
        raise PackagerError(f"unknown scoring {scoring!r}: choose half or all")
    with Forward(reference, n_ctx=ctx, threads=threads) as ref, Forward(candidate, n_ctx=ctx, threads=threads) as cand:
        if ref.n_vocab != cand.n_vocab:
            raise PackagerError(f"vocabularies differ ({ref.n_vocab} vs {cand.n_vocab} tokens): not comparable")
        chunks = ref.chunks(ref.tokenize(text), max_chunks)
        if not chunks:
            raise PackagerError(f"evaluation text is shorter than one chunk of {ctx} tokens")
        first = ctx // 2 if scoring == "half" else 0
        nll_ref, nll_cand, kld, agree = [], [], [], []
        for chunk in chunks:
            targets = np.asarray(chunk[first + 1 :])
            lp_ref = log_softmax(ref.run(chunk, first)[:-1].astype(np.float64))
            lp_cand = log_softmax(cand.run(chunk, first)[:-1].astype(np.float64))
            rows = np.arange(len(targets))
            nll_ref.append(-lp_ref[rows, targets])
            nll_cand.append(-lp_cand[rows, targets])
            kld.append((np.exp(lp_ref) * (lp_ref - lp_cand)).sum(axis=1))
            agree.append(lp_ref.argmax(axis=1) == lp_cand.argmax(axis=1))
    kld_all = np.concatenate(kld)
    return TextMetrics(
        ppl_reference=float(np.exp(np.concatenate(nll_ref).mean())),
        ppl_candidate=float(np.exp(np.concatenate(nll_cand).mean())),
        kld_mean=float(kld_all.mean()),
        kld_median=float(np.median(kld_all)),
        kld_p99=float(np.percentile(kld_all, 99)),
        top1_agreement=float(np.concatenate(agree).mean()),
        tokens=int(kld_all.size),
        chunks=len(chunks),
        ctx=ctx,
        scoring=scoring,
    )


def load_tasks(path: Path) -> list[dict[str, Any]]:
    tasks = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PackagerError(f"{path}: cannot read tasks: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PackagerError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        messages = task.get("messages") if isinstance(task, dict) else None
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PackagerError(f"{path}:{number}: 'messages' must be a list of {{role, content}} strings")
        tasks.append(task)
    if not tasks:
        raise PackagerError(f"{path}: no tasks")
    return tasks


def compare_tasks(
    reference: list[Path], candidate: list[Path], tasks: list[dict[str, Any]], *, threads: int = 2,
    chat_template: str | None = None,
) -> TaskMetrics:
    """Greedy answers of both models to each agent prompt, compared exactly and as tool calls / JSON."""
    answers = []
    for paths in (reference, candidate):
        engine = Engine(paths, name="eval", n_ctx=2048, n_batch=512, threads=threads, chat_template=chat_template)
        try:
            answers.append([_answer(engine, task) for task in tasks])
        finally:
            engine.close()
    exact = [a == b for a, b in zip(*answers, strict=True)]
    structured = [(r, c) for r, c in ((_json_object(a), _json_object(b)) for a, b in zip(*answers, strict=True))
                  if r is not None]
    names = [c is not None and c.get("name") == r.get("name") for r, c in structured]
    args = [c is not None and c.get("name") == r.get("name") and c.get("arguments") == r.get("arguments")
            for r, c in structured]
    return TaskMetrics(
        tasks=len(tasks),
        exact_match=sum(exact) / len(exact),
        structured=len(structured),
        name_agreement=sum(names) / len(names) if names else None,
        arguments_agreement=sum(args) / len(args) if args else None,
    )


def _answer(engine: Engine, task: dict[str, Any]) -> str:
    prompt = engine.format_chat([(m["role"], m["content"]) for m in task["messages"]])
    tokens = engine.tokenize(prompt)
    return "".join(engine.generate(tokens, Sampling(_TASK_MAX_TOKENS, temperature=0), Generation())).strip()


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's answer (models like to wrap them in prose or code fences)."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def as_dict(text: TextMetrics, tasks: TaskMetrics | None, seconds: float) -> dict[str, Any]:
    doc: dict[str, Any] = {**asdict(text), "seconds": round(seconds, 3)}
    if tasks is not None:
        doc["tasks"] = asdict(tasks)
    return doc

