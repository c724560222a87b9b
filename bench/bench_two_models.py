"""Decode speed of model A alone, after model B (same weights, its own context and scheduler) has served, and
after B is closed: in-process, greedy 96-token generations, 2 threads, medians of 3. A check that several
loaded models do not slow each other down (all decode on one shared thread: runtime/llama.decode).
Run: .venv/bin/python bench/bench_two_models.py
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

from common import model_path

from edgepack.runtime.engine import Engine, Sampling
from edgepack.runtime.scheduler import DONE, BatchScheduler, Request


class Model:
    def __init__(self, name: str) -> None:
        self.engine = Engine([model_path()], name=name, n_ctx=2048, n_batch=512, threads=2, slots=2, repack=False)
        self.scheduler = BatchScheduler(self.engine)

    def decode_rate(self, tokens: int = 96) -> float:
        done = threading.Event()
        request = Request(self.engine.tokenize("Once upon a time"), Sampling(tokens, temperature=0, ignore_eos=True),
                          lambda event: done.set() if event is DONE else None, reuse_prefix=False)
        started = time.perf_counter()
        self.scheduler.submit(request)
        done.wait()
        return request.result.completion_tokens / (time.perf_counter() - started)

    def median(self, runs: int = 3) -> float:
        return statistics.median(self.decode_rate() for _ in range(runs))

    def close(self) -> None:
        self.scheduler.stop()
        self.engine.close()


def main() -> int:
    a = Model("a")
    a.decode_rate()  # warm
    rows = [("A alone", a.median())]
    b = Model("b")
    rows.append(("B, A loaded", b.median()))
    rows.append(("A after B served", a.median()))
    b.close()
    rows.append(("A after B closed", a.median()))
    a.close()
    for name, rate in rows:
        print(f"{name:20s} {rate:6.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
