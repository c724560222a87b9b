"""Boards that heal themselves, measured (issue 12), on Gemma 3 270M:

- flash: the time to make a flashed image from a Raspberry Pi OS-sized stock image (512 MiB bootfs, a 2.4 GiB
  root holding `--os-mib` of stand-in OS files) and the image's size; the rpi5 wheelhouse (`edgepack wheels`,
  cached cross-build);
- install --activate: the time to activate a healthy release, and to detect a broken one and roll back, for a
  release over the memory budget, one whose chat template fails, and one with a segment built broken.

Medians of --runs. Run: .venv/bin/python bench/bench_heal.py [--runs 3] [--os-mib 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, model_path, write_results
from disk_images import make_pi_image

EDGEPACK = [sys.executable, "-m", "edgepack.runtime.cli"]


def edgepack(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*EDGEPACK, *map(str, args)], capture_output=True, text=True)
    if ok and done.returncode != 0:
        raise SystemExit(f"edgepack {args[0]} failed: {done.stderr.strip()}")
    return done


def timed(*args: object, ok: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = edgepack(*args, ok=ok)
    return time.perf_counter() - started, done


def bench_flash(work: Path, bundle: Path, runs: int, os_mib: int) -> dict:
    wheels = work / "wheels"
    edgepack("wheels", "--board", "rpi5", "-o", wheels)
    filler = work / "os-files"
    with open(filler, "wb") as f:
        for _ in range(os_mib):
            f.write(os.urandom(1 << 20))
    stock = work / "raspios.img"
    make_pi_image(stock, root_mib=2400, boot_mib=512, filler=filler)
    seconds, sizes, stdout = [], [], ""
    for run in range(runs):
        out = work / f"flashed-{run}.img"
        took, done = timed("flash", "--board", "rpi5", "--image", stock, "--bundle", bundle, "--wheels", wheels,
                           "-o", out, "--hostname", "agent-1")
        seconds.append(took)
        sizes.append(out.stat().st_size)
        stdout = done.stdout.strip().splitlines()[0]
        out.unlink()
    return {"stock_bytes": stock.stat().st_size, "image_bytes": statistics.median(sizes),
            "wheelhouse_bytes": sum(w.stat().st_size for w in wheels.glob("*.whl")),
            "bundle_bytes": bundle.stat().st_size, "seconds": seconds, "median_seconds": statistics.median(seconds),
            "summary": stdout}


def bench_activation(work: Path, bundle: Path, runs: int) -> dict:
    """Per run: a new store, the bundle activated (healthy), then each broken release tried (each rolled back)."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime"))
    from test_activation import break_a_segment, break_the_template, rewritten

    broken = {"over the memory budget (50 MiB)": (rewritten(bundle, work / "v2.edgepack", lambda *_: None),
                                                  ["--memory-budget", "50MiB"]),
              "chat template fails": (break_the_template(bundle, work / "template.edgepack", 3), []),
              "segment built broken": (break_a_segment(bundle, work / "segment.edgepack", 4), [])}
    times: dict[str, list[float]] = {"healthy release activated": []}
    messages = {}
    for run in range(runs):
        store = work / f"store-{run}"
        took, _ = timed("install", bundle, "--store", store, "--activate")
        times["healthy release activated"].append(took)
        for name, (release, flags) in broken.items():
            took, done = timed("install", release, "--store", store, "--activate", *flags, ok=False)
            if done.returncode != 1 or "rolled back" not in done.stderr:
                raise SystemExit(f"{name}: not rolled back: {done.stderr.strip()}")
            times.setdefault(name, []).append(took)
            messages[name] = done.stderr.strip().splitlines()[-1]
    return {name: {"seconds": [round(t, 2) for t in values], "median_seconds": round(statistics.median(values), 2),
                   **({"message": messages[name]} if name in messages else {})} for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--os-mib", type=int, default=1800, help="stand-in OS files in the stock root (MiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as scratch:
        work = Path(scratch)
        bundle = work / "gemma.edgepack"
        edgepack("build", model_path(), "-o", bundle, "--quant", "keep", "--no-eval", "-q", "--bundle-version", "1")
        result = {"flash": bench_flash(work, bundle, args.runs, args.os_mib)}
        print(json.dumps(result["flash"], indent=2), flush=True)
        result["activation"] = bench_activation(work, bundle, args.runs)
        print(json.dumps(result["activation"], indent=2))
    write_results("heal", result)


if __name__ == "__main__":
    main()
