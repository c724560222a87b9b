"""Long fuzzing runs of the parsers of untrusted bytes (the targets of tests/fuzz/fuzz_targets.py), one target at a
time, each for --seconds.

    .venv/bin/python bench/fuzz.py --seconds 180                 # every target, 3 minutes each
    .venv/bin/python bench/fuzz.py --seconds 600 --target bundle --target gguf
    .venv/bin/python bench/fuzz.py --engine hypothesis --seconds 60

Engines: atheris (libFuzzer, coverage-guided; `pip install atheris`, x86_64 wheels) runs each target in a child
process from the saved corpus bench/fuzz-corpus/<target>/; new inputs it finds go to bench/out/fuzz/<target>/, a
crash to bench/out/fuzz/<target>-crash-*. The gguf target always runs on hypothesis (atheris cannot see the
coverage of llama.cpp in its worker process), mutating the header of a generated tiny model (330 KB).
`--engine hypothesis` (the default where atheris does not import) draws from the suite's strategies
(tests/fuzz/fuzz_strategies.py) without coverage guidance and saves the shrunk failing input the same way.
A finding becomes a regression test in tests/fuzz/ with that input (bench/README.md, "Fuzzing").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
CORPUS = ROOT / "bench" / "fuzz-corpus"
OUT = ROOT / "bench" / "out" / "fuzz"
TARGETS = ["bundle", "manifest", "signature", "local_config", "recipe", "request_body", "gguf"]


def make_target(name: str, work: Path) -> Callable[[bytes], None]:
    import fuzz_targets as t

    if name == "bundle":
        return t.BundleInstall(work)
    if name == "recipe":
        return t.RecipeLoad(work)
    if name == "gguf":
        return t.GgufLoader(work)
    return getattr(t, name)


def seed_inputs(name: str, work: Path) -> list[bytes]:
    import fuzz_targets as t

    if name == "gguf":
        return [t.seed_gguf(work / "seed.gguf").read_bytes()]
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir())] if (CORPUS / name).is_dir() else t.seeds()[name]


def save_seeds() -> None:
    """Write the targets' seeds as the saved corpus (bench/fuzz-corpus/<target>/seed-N)."""
    import fuzz_targets as t

    for name, inputs in t.seeds().items():
        folder = CORPUS / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, data in enumerate(inputs):
            (folder / f"seed-{i}").write_bytes(data)
        print(f"{name}: {len(inputs)} seed(s), {sum(map(len, inputs))} bytes -> {folder.relative_to(ROOT)}")


# ---- atheris: one child process per target -----------------------------------------------------------------------

def atheris_child(name: str, seconds: int) -> None:
    import atheris

    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    target = make_target(name, work)
    found = OUT / name
    found.mkdir(parents=True, exist_ok=True)
    atheris.instrument_all()
    corpus = [str(found)] + ([str(CORPUS / name)] if (CORPUS / name).is_dir() else [])
    args = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1",
            f"-artifact_prefix={OUT / name}-", *corpus]
    atheris.Setup(args, target)
    atheris.Fuzz()


def run_atheris(name: str, seconds: int) -> dict[str, object]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", name, "--seconds", str(seconds)],
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    (OUT / f"{name}.log").write_text(log)
    runs = [line for line in log.splitlines() if line.startswith("stat::number_of_executed_units")]
    crashes = sorted(str(p.relative_to(ROOT)) for p in OUT.glob(f"{name}-crash-*")) + \
        sorted(str(p.relative_to(ROOT)) for p in OUT.glob(f"{name}-timeout-*"))
    return {"target": name, "engine": "atheris", "seconds": round(time.monotonic() - started, 1),
            "inputs": int(runs[-1].split(":")[-1]) if runs else None, "exit": done.returncode, "findings": crashes,
            "last_lines": log.strip().splitlines()[-3:] if done.returncode else []}


# ---- hypothesis: the suite's strategies, for as long as asked -----------------------------------------------------

def strategy(name: str, seeds: list[bytes]):  # noqa: ANN201 - a hypothesis strategy
    import fuzz_strategies as s
    import fuzz_targets as t

    if name == "bundle":
        return s.bundle_inputs(seeds)
    if name == "recipe":
        return s.mutated(seeds)
    if name == "gguf":
        end = t.gguf_data_offset(seeds[0])
        return s.mutated(seeds, end=lambda _data: end)
    return s.json_inputs(seeds)


def run_hypothesis(name: str, seconds: int) -> dict[str, object]:
    from hypothesis import HealthCheck, given, settings

    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    target = make_target(name, work)
    count, findings = 0, []

    def recorded(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            target(data)
        except BaseException:
            (OUT / f"{name}-crash-hypothesis").write_bytes(data)  # the last one written is the shrunk input
            raise

    started = time.monotonic()
    batch = settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    test = given(strategy(name, seed_inputs(name, work)))(batch(recorded))
    while time.monotonic() - started < seconds:
        try:
            test()  # 500 fresh random inputs a call
        except Exception as exc:  # noqa: BLE001 - a finding, reported with its input
            findings.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            break
    known = getattr(target, "known_crashes", {})  # the gguf target: llama.cpp aborts already reported upstream
    return {"target": name, "engine": "hypothesis", "seconds": round(time.monotonic() - started, 1), "inputs": count,
            "exit": 1 if findings else 0, "findings": findings, "known_upstream": known}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable (default: all)")
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], help="default: atheris where it imports")
    parser.add_argument("--save-seeds", action="store_true", help="rewrite bench/fuzz-corpus/ from the targets' seeds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.child:
        atheris_child(args.child, args.seconds)
        return
    if args.save_seeds:
        save_seeds()
        return
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    results = []
    for name in args.target or TARGETS:
        # atheris sees only Python's coverage, not that of llama.cpp in its worker process: blind there, it shrinks
        # the GGUF corpus to one input. The suite's header-aware mutations do better.
        run = run_atheris if engine == "atheris" and name != "gguf" else run_hypothesis
        result = run(name, args.seconds)
        results.append(result)
        print(f"{name:13} {result['engine']:10} {result['seconds']:7.1f} s  {result['inputs'] or 0:>9} inputs  "
              f"{'findings: ' + ', '.join(result['findings']) if result['findings'] else 'no findings'}"
              f"{'; known upstream: ' + str(result['known_upstream']) if result.get('known_upstream') else ''}",
              flush=True)
    (OUT / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(1 if any(r["findings"] or r["exit"] for r in results) else 0)


if __name__ == "__main__":
    main()
