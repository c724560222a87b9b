"""Quality of a candidate against its reference: perplexity, KL divergence, top-1 agreement, task agreement.

Text metrics follow llama.cpp's `llama-perplexity --kl-divergence`: the text is tokenized once, cut into
n_ctx-token chunks (BOS first), and with scoring="half" (the default, llama-perplexity's convention)
only positions n_ctx/2 .. n_ctx-2 of each chunk are scored, so every scored token has at least half a
context before it; scoring="all" scores positions 0 .. n_ctx-2.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.runtime.engine import Engine, Generation, Sampling

from .errors import PackagerError
from .forward import Forward
from .vocab import VocabModel

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


class Reference:
    """The reference model's view of an evaluation text, computed once and compared with any number of
    candidates, as llama-perplexity's --kl-divergence-base file is.

    The logits of every scored position go to a scratch file as llama.cpp returns them (float32), chunk
    after chunk; a comparison reads them back a few rows at a time, so memory never holds more than one
    model and a few MiB of rows. llama-perplexity stores log-probabilities rounded to 16 bits, half the
    bytes, which moves small divergences by up to 0.3% (bench/README.md); these figures are not rounded.
    """

    def __init__(
        self, paths: list[Path], text: str, *, ctx: int = 512, scoring: str = "half", max_chunks: int | None = None,
        threads: int = 2, scratch: Path | None = None,
    ) -> None:
        if scoring not in SCORINGS:
            raise PackagerError(f"unknown scoring {scoring!r}: choose half or all")
        self.ctx, self.scoring, self.threads = ctx, scoring, threads
        self.first = ctx // 2 if scoring == "half" else 0
        self._file = tempfile.TemporaryFile(prefix="edgepack-reference-", dir=scratch)
        try:
            with Forward(paths, n_ctx=ctx, threads=threads) as model:
                self.n_vocab = model.n_vocab
                self.chunks = model.chunks(model.tokenize(text), max_chunks)
                if not self.chunks:
                    raise PackagerError(f"evaluation text is shorter than one chunk of {ctx} tokens")
                _check_room(scratch, len(self.chunks) * (ctx - 1 - self.first) * self.n_vocab * 4)
                for chunk in self.chunks:
                    self._file.write(model.run(chunk, self.first)[:-1])
            self._file.flush()
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compare(self, candidate: list[Path], *, max_chunks: int | None = None) -> TextMetrics:
        """PPL of both, KL(reference || candidate) per position, top-1 agreement, over the first chunks."""
        chunks = self.chunks[:max_chunks]
        rows = self.ctx - 1 - self.first
        per_chunk = []
        with Forward(candidate, n_ctx=self.ctx, threads=self.threads) as model:
            if model.n_vocab != self.n_vocab:
                raise PackagerError(f"vocabularies differ ({self.n_vocab} vs {model.n_vocab} tokens): not comparable")
            block = max(1, _BLOCK_VALUES // self.n_vocab)
            buffers = _Buffers(block, self.n_vocab)
            for index, chunk in enumerate(chunks):
                logits = model.run(chunk, self.first)
                targets = np.asarray(chunk[self.first + 1 :])
                for start in range(0, rows, block):
                    stop = min(start + block, rows)
                    reference = self._read(index * rows + start, stop - start, buffers.reference)
                    per_chunk.append(_compare_rows(reference, logits[start:stop], targets[start:stop], buffers))
        kld, nll_ref, nll_cand, agree = (np.concatenate(column) for column in zip(*per_chunk, strict=True))
        return TextMetrics(
            ppl_reference=float(np.exp(nll_ref.mean())),
            ppl_candidate=float(np.exp(nll_cand.mean())),
            kld_mean=float(kld.mean()),
            kld_median=float(np.median(kld)),
            kld_p99=float(np.percentile(kld, 99)),
            top1_agreement=float(agree.mean()),
            tokens=int(kld.size),
            chunks=len(chunks),
            ctx=self.ctx,
            scoring=self.scoring,
        )

    def _read(self, row: int, count: int, buffer: np.ndarray) -> np.ndarray:
        out = buffer[:count]
        self._file.seek(row * self.n_vocab * 4)
        if self._file.readinto(out) != out.nbytes:
            raise PackagerError("the reference's scratch file is shorter than written (disk full?)")
        return out


_BLOCK_VALUES = 1 << 21  # rows are compared in blocks of about this many logits (8 MiB)


def _check_room(scratch: Path | None, size: int) -> None:
    directory = scratch or Path(tempfile.gettempdir())
    free = shutil.disk_usage(directory).free
    if size > free:
        moved = " (TMPDIR moves it)" if scratch is None else ""
        raise PackagerError(f"the reference's logits need {size / 2**20:,.0f} MiB in {directory}, which has "
                            f"{free / 2**20:,.0f} MiB free: score fewer chunks or make room{moved}")


class _Buffers:
    """Scratch arrays for one block of rows, allocated once per comparison."""

    def __init__(self, rows: int, n_vocab: int) -> None:
        self.reference, self.a, self.b = (np.empty((rows, n_vocab), dtype=np.float32) for _ in range(3))


def _normalise(logits: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the top-1 token, log-sum-exp (float64) and, in `out`, exp(logit - max) with its sum."""
    top1 = logits.argmax(axis=1)
    peak = logits[np.arange(len(logits)), top1]
    np.subtract(logits, peak[:, None], out=out)
    np.exp(out, out=out)
    total = out.sum(axis=1, dtype=np.float64)
    return top1, peak + np.log(total), total


def _compare_rows(
    reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray, buffers: _Buffers,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """KL(ref || cand), both NLLs of the next token and top-1 agreement for a block of rows of float32 logits.

    KL = sum_i p_i * ((r_i - c_i) - (lse_r - lse_c)), with p = softmax(r): logits are subtracted first, an
    exact float32 operation for close values, so an identical candidate gives exactly 0 and a close one
    keeps its small divergence to float32 rounding of the difference (not of the logits).
    """
    n = len(reference)
    rows = np.arange(n)
    weights, diff = buffers.a[:n], buffers.b[:n]
    top_c, lse_c, _ = _normalise(candidate, diff)
    top_r, lse_r, total_r = _normalise(reference, weights)
    np.subtract(reference, candidate, out=diff)
    diff -= (lse_r - lse_c).astype(np.float32)[:, None]
    diff *= weights
    kld = diff.sum(axis=1, dtype=np.float64) / total_r
    nll_ref = lse_r - reference[rows, targets]
    nll_cand = lse_c - candidate[rows, targets]
    return kld, nll_ref, nll_cand, top_r == top_c


@dataclass(frozen=True)
class ByteMetrics:
    """Bits per byte of both models on the same windows of text: comparable across vocabularies, where perplexity
    per token is not (a model that splits text into more tokens has more, easier, predictions)."""

    bpb_reference: float
    bpb_candidate: float
    bytes: int
    windows: int


def text_windows(text: str, size: int, max_windows: int | None = None) -> list[str]:
    """The text's lines packed into windows of at most `size` bytes (a longer line is cut at a character)."""
    windows: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line.encode()) > size:
            head = line.encode()[:size].decode("utf-8", "ignore")
            if current:
                windows.append(current)
                current = ""
            windows.append(head)
            line = line[len(head):]
        if len((current + line).encode()) > size:
            windows.append(current)
            current = ""
        current += line
    if current.strip():
        windows.append(current)
    return [w for w in windows if w.strip()][:max_windows]


def bits_per_byte(paths: list[Path], windows: list[str], *, threads: int = 2) -> tuple[float, int]:
    """Bits per byte of the model over the windows, each evaluated from an empty context after BOS (every token
    predicted, so every byte counted); and the bytes counted."""
    with VocabModel(paths) as tokenizer:  # a context as long as the longest window's tokens (plus BOS)
        size = max(len(tokenizer.tokenize(w)) for w in windows) + 2
    nll, counted = 0.0, 0
    with Forward(paths, n_ctx=size, threads=threads) as model:
        for window in windows:
            tokens = model.tokenize(window)
            first = 0 if model.adds_bos else 1  # without BOS the first token has nothing to be predicted from
            counted += len(window.encode()) - (len(model.piece(tokens[0])) if first else 0)
            logits = model.run(tokens, 0)[:-1]
            targets = np.asarray(tokens[1:])
            block = max(1, _BLOCK_VALUES // model.n_vocab)
            for start in range(first, len(targets), block):
                rows = logits[start:start + block]
                _, lse, _ = _normalise(rows, np.empty_like(rows))
                nll += float((lse - rows[np.arange(len(rows)), targets[start:start + len(rows)]]).sum())
    return float(nll / np.log(2) / counted), counted


def compare_bytes(reference: list[Path], candidate: list[Path], text: str, *, window: int = 1024,
                  max_windows: int | None = None, threads: int = 2) -> ByteMetrics:
    windows = text_windows(text, window, max_windows)
    if not windows:
        raise PackagerError("evaluation text is empty")
    ref, counted = bits_per_byte(reference, windows, threads=threads)
    cand, _ = bits_per_byte(candidate, windows, threads=threads)
    return ByteMetrics(ref, cand, counted, len(windows))


def compare_text(
    reference: list[Path], candidate: list[Path], text: str, *, ctx: int = 512, scoring: str = "half",
    max_chunks: int | None = None, threads: int = 2,
) -> TextMetrics:
    """One candidate against its reference (computed for this comparison only)."""
    with Reference(reference, text, ctx=ctx, scoring=scoring, max_chunks=max_chunks, threads=threads) as ref:
        return ref.compare(candidate)


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
    return task_agreement(*(task_answers(paths, tasks, threads=threads, chat_template=chat_template).answers
                            for paths in (reference, candidate)))


@dataclass(frozen=True)
class Answers:
    prompts: list[str]  # each task's messages in the model's chat template
    answers: list[str]  # its greedy answers


def task_answers(paths: list[Path], tasks: list[dict[str, Any]], *, threads: int = 2,
                 chat_template: str | None = None) -> Answers:
    engine = Engine(paths, name="eval", n_ctx=2048, n_batch=512, threads=threads, chat_template=chat_template)
    try:
        prompts = [engine.format_chat([(m["role"], m["content"]) for m in task["messages"]]) for task in tasks]
        return Answers(prompts, [_answer(engine, prompt) for prompt in prompts])
    finally:
        engine.close()


def task_agreement(reference: list[str], candidate: list[str]) -> TaskMetrics:
    """Exact match, and among the reference's tool calls / JSON objects: same name, same name and arguments."""
    exact = [a == b for a, b in zip(reference, candidate, strict=True)]
    parsed = [(_json_object(a), _json_object(b)) for a, b in zip(reference, candidate, strict=True)]
    structured = [(r, c) for r, c in parsed if r is not None]
    names = [c is not None and c.get("name") == r.get("name") for r, c in structured]
    args = [c is not None and c.get("name") == r.get("name") and c.get("arguments") == r.get("arguments")
            for r, c in structured]
    return TaskMetrics(
        tasks=len(exact),
        exact_match=sum(exact) / len(exact),
        structured=len(structured),
        name_agreement=sum(names) / len(names) if names else None,
        arguments_agreement=sum(args) / len(args) if args else None,
    )


def _answer(engine: Engine, prompt: str) -> str:
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


def as_dict(text: TextMetrics | None, tasks: TaskMetrics | None, seconds: float,
            per_byte: ByteMetrics | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {**(asdict(text) if text else {}), "seconds": round(seconds, 3)}
    if per_byte is not None:
        doc["bits_per_byte"] = asdict(per_byte)
    if tasks is not None:
        doc["tasks"] = asdict(tasks)
    return doc

