"""Measured compression on Gemma 3 270M: does the imatrix help, does the planner beat llama.cpp's
uniform mixes at the same size, what does pruning cost? Reference: the shipped Q4_K_M file; every
candidate is requantized from it (fine for relative comparison).

    .venv/bin/python bench/bench_plan.py [--chunks 8] [--threads 2]

Writes bench/results/plan-<date>.json and prints the table (see bench/README.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import OUT, model_path, write_results

from edgepack.packager import evaluate, gguf_info, imatrix, plan, prune, quant_types, quantize
from edgepack.packager.compress import CALIBRATION_CHUNKS

WORK = OUT / "plan"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=8, help="eval chunks of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    source = model_path()
    info = gguf_info.read(source)
    eval_text = evaluate.default_text("eval")
    rows: list[dict] = []
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):  # noqa: ANN001, ANN202
        started = time.monotonic()
        result = fn(*a, **kw)
        timings[name] = round(time.monotonic() - started, 2)
        return result

    def measure(label: str, kind: str, path: Path, predicted: float | None = None, seconds: float | None = None):
        m = evaluate.compare_text([source], [path], eval_text, max_chunks=args.chunks, threads=args.threads)
        model = gguf_info.read(path)
        rows.append({"label": label, "kind": kind, "size": model.size, "bpw": round(model.bits_per_weight, 3),
                     "ppl": m.ppl_candidate, "kld_mean": m.kld_mean, "kld_p99": m.kld_p99,
                     "top1": m.top1_agreement, "predicted_error": predicted, "seconds": seconds,
                     "ppl_reference": m.ppl_reference, "tokens": m.tokens})
        print(f"{label:24s} {model.size / 2**20:7.1f} MiB  KLD {m.kld_mean:.4f}  top-1 {m.top1_agreement:.2%}",
              flush=True)

    matrix = timed("calibrate", imatrix.collect, [source], evaluate.default_text("calibration"),
                   threads=args.threads, max_chunks=CALIBRATION_CHUNKS)
    uniform_sizes = {}
    for name in ("Q4_K_M", "Q3_K_M"):
        for use in (False, True):
            path = WORK / f"{name}{'-imatrix' if use else ''}.gguf"
            started = time.monotonic()
            quantize.quantize(source, path, quant_types.parse(name), allow_requantize=True,
                              imatrix=matrix if use else None, threads=args.threads)
            measure(f"{name}{' + imatrix' if use else ''}", "uniform", path, seconds=time.monotonic() - started)
            if use:
                uniform_sizes[name] = path.stat().st_size
    ladder = timed("ladder", plan.build_ladder, info, matrix, WORK, allow_requantize=True, threads=args.threads)
    for index, name in enumerate(plan.LADDER):
        predicted = sum(t.options[index].error for t in ladder.tensors)
        measure(f"{name} pure + imatrix", "uniform", ladder.files[name], predicted)
    for name, size in uniform_sizes.items():
        started = time.monotonic()
        chosen = plan.choose(ladder, size)
        path = WORK / f"plan-{name}.gguf"
        quantize.quantize(source, path, quant_types.parse(chosen.base), allow_requantize=True, imatrix=matrix,
                          tensor_types=chosen.tensor_types(), pure=True, threads=args.threads)
        measure(f"plan @ {name} size", "plan", path, chosen.predicted_error, time.monotonic() - started)
        rows[-1]["target"] = size
    influence = timed("block influence", prune.block_influence, [source], evaluate.default_text("calibration"),
                      n_layer=info.block_count, threads=args.threads)
    order = [i for i in np.argsort(influence) if i not in (0, info.block_count - 1)]
    for count in (1, 2):
        path = WORK / f"pruned-{count}.gguf"
        quantize.quantize(source, path, quant_types.parse("Q4_K_M"), allow_requantize=True, imatrix=matrix,
                          prune_layers=[int(i) for i in order[:count]], threads=args.threads)
        measure(f"Q4_K_M - {count} block(s)", "pruned", path)
    scored = [r for r in rows if r["predicted_error"] is not None]
    ranks = [np.argsort(np.argsort([r[key] for r in scored])) for key in ("predicted_error", "kld_mean")]
    spearman = float(np.corrcoef(ranks[0], ranks[1])[0, 1])
    result = {
        "model": source.name, "eval_chunks": args.chunks, "threads": args.threads,
        "timings_s": timings, "rows": rows, "block_influence": influence,
        "pruned_order": [int(i) for i in order[:2]], "proxy_vs_kld_spearman": spearman,
    }
    print(f"\nproxy vs measured KLD, Spearman rank correlation: {spearman:.3f}")
    print(f"timings: {timings}")
    write_results("plan", result)


if __name__ == "__main__":
    main()
