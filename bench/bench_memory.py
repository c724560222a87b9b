"""Resident memory of `edgepack serve` with several models or agents, and the size of a delta bundle.

On Gemma 3 270M Q4_K_M, three settings with 1, 2 and 3 models or agents in one bundle: fine-tunes whose
top quarter of blocks differ (the rest byte-identical, so those segments are stored and mapped once),
one base with LoRA adapters, and the same fine-tunes with nothing shared. /proc/PID/smaps of the server
says what is resident. Then: how big a --since delta is when one fine-tune changes again.
Run: .venv/bin/python bench/bench_memory.py [--threads 2] [--ctx 4096] [--slots 2] [--decode-runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import httpx
from common import (
    OUT,
    ROOT,
    BenchError,
    cpu_times,
    edgepack,
    free_port,
    local_url,
    model_path,
    new_client,
    others_share,
    run,
    running,
    serve_command,
    smaps_rollup,
    stream_completion,
    wait_quiet,
    wait_ready,
    write_results,
)
from tiny_model import write_lora  # tests/, on the path through common

from edgepack.packager import quant_types
from edgepack.packager.quantize import quantize
from edgepack.runtime.cli_common import format_table

WORK = OUT / "memory"
Q = gguf.GGMLQuantizationType
# Types absent from the base's Q4_K_M mix, so every 2-D weight of the top blocks changes; all take rows of 32.
TUNES = {"tune-a": Q.Q5_1, "tune-b": Q.Q4_1}
RETUNE = ("tune-a", Q.Q4_0)  # the delta: tune-a's top blocks change again
# Control: the same files rewritten with other GGUF alignments. Tensor bytes are identical, but every
# segment carries the alignment, so no digest matches and each model is its own copy.
ALIGNMENT = {"base": 32, "tune-a": 64, "tune-b": 128}
LORA_RANK, LORA_TARGETS, LORA_NAMES = 16, ("attn_q", "attn_v"), ("lora-a", "lora-b", "lora-c")
SETTINGS = ("shared", "lora", "independent")
REPACK = ("never", "always")
CHAT_TOKENS, DECODE_TOKENS, PROMPT = 8, 64, "Once upon a time"
GOAL_LORA, GOAL_SHARED, GOAL_DELTA = 1.15, 0.05, 0.35
# llama.cpp's threads spin on barriers: with 2 threads on 2 vCPUs, another busy process cuts decoding up to 15x,
# so decoding waits for a quiet second and is timed again if others used more than QUIET of the CPUs meanwhile.
# A busy machine costs time, not correctness: the memory figures do not depend on it.
QUIET, DECODE_TRIES, QUIET_WAIT_S, RETRY_PAUSE_S = 0.10, 3, 180.0, 4.0
DECODED = ("shared", "lora")  # the independent models compute exactly what the shared ones do
MIB = 2**20


@dataclass(frozen=True)
class Bundle:
    setting: str
    k: int  # models (shared, independent) or LoRA agents
    path: Path
    agents: tuple[str, ...]
    weight_bytes: int  # distinct tensor segments and adapters of the bundle: what one copy of each takes
    copies_bytes: int  # the same counted once per model: what nothing shared would take
    own_bytes: dict[str, int]  # per model: its tensor segments that no earlier model has


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    pss_kb: int
    anon_kb: int  # Pss_Anon: heap, KV caches, compute buffers, LoRA tensors, repacked weights
    weights_rss_kb: int  # mappings of the store's blobs (the mmap'd segments)
    weights_pss_kb: int
    blob_mappings: int
    rollup: dict[str, int]


@dataclass(frozen=True)
class Run:
    setting: str
    k: int
    repack: str
    weight_bytes: int
    copies_bytes: int
    memory: Memory
    decode_tps: list[float]  # empty where not timed
    ready_s: float  # server start -> /health 200 (load, repack, warm-up)
    llama_buffers_mib: dict[str, list[float]]  # the buffer sizes llama.cpp logged
    other_cpu: float  # the most other processes used of all CPUs during one timed decode (they slow it down)
    decode_tries: int


# ---- models ----


def blocks_from(reader: gguf.GGUFReader) -> int:
    """The first block of the top quarter."""
    arch = reader.fields["general.architecture"].contents()
    n = int(reader.fields[f"{arch}.block_count"].contents())
    return n - n // 4


def top_weights(reader: gguf.GGUFReader) -> list[str]:
    """The 2-D tensors (what llama.cpp quantizes) of the top quarter of blocks."""
    first = blocks_from(reader)
    return [t.name for t in reader.tensors
            if len(t.shape) >= 2 and t.name.startswith("blk.") and int(t.name.split(".")[1]) >= first]


def fine_tune(base: Path, names: list[str], out: Path, qtype: Q) -> Path:
    """A stand-in for a fine-tune of the top quarter: those tensors requantized to `qtype`; llama.cpp copies
    every other tensor as it is, since it already has the type the Q4_K_M mix gives it."""
    quantize(base, out, quant_types.parse("Q4_K_M"), allow_requantize=True,
             tensor_types={name: int(qtype) for name in names})
    return out


def realigned(src: Path, out: Path, alignment: int) -> Path:
    """The same model, written with another GGUF alignment (gguf-py's copy, as gguf_new_metadata does)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    writer.add_custom_alignment(alignment)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return out


def lora(reader: gguf.GGUFReader, out: Path, seed: int) -> Path:
    """A random rank-16 LoRA on attn_q and attn_v of every block, shapes read from the base."""
    targets = [(t.name, int(t.shape[0]), int(t.shape[1]))  # ggml order: ne0 = inputs
               for t in reader.tensors if t.name.split(".")[-2] in LORA_TARGETS]
    return write_lora(out, reader.fields["general.architecture"].contents(), targets, rank=LORA_RANK,
                      alpha=float(LORA_RANK), scale=0.01, seed=seed)


def prepare_sources(base: Path) -> dict[str, Path]:
    """name -> GGUF: base, the fine-tunes, their realigned copies (`indep-*`), the retune, the adapters."""
    reader = gguf.GGUFReader(base)  # slow (the 262k-token vocabulary): read once
    names = top_weights(reader)
    print(f"fine-tunes: blocks >= {blocks_from(reader)} requantized ({len(names)} tensors)", flush=True)
    sources = {"base": base}
    for name, qtype in TUNES.items():
        sources[name] = fine_tune(base, names, WORK / f"{name}.gguf", qtype)
    name, qtype = RETUNE
    sources[f"{name}-v2"] = fine_tune(base, names, WORK / f"{name}-v2.gguf", qtype)
    for name, alignment in ALIGNMENT.items():
        sources[f"indep-{name}"] = (sources[name] if alignment == 32
                                    else realigned(sources[name], WORK / f"indep-{name}.gguf", alignment))
    for seed, name in enumerate(LORA_NAMES, start=1):
        sources[name] = lora(reader, WORK / f"{name}.gguf", seed)
    return sources


# ---- bundles ----


def recipe_text(models: dict[str, Path], adapters: dict[str, Path], agents: dict[str, tuple[str, str | None]]) -> str:
    lines = []
    for name, path in models.items():
        lines += [f"[models.{name}]", f"source = {json.dumps(str(path))}", 'quant = "keep"', ""]
    for name, path in adapters.items():
        lines += [f"[adapters.{name}]", f"source = {json.dumps(str(path))}", 'base = "base"', ""]
    for name, (model, adapter) in agents.items():
        lines += [f"[agents.{name}]", f'model = "{model}"'] + ([f'adapter = "{adapter}"'] if adapter else []) + [""]
    return "\n".join(lines)


def build(out: Path, models: dict[str, Path], adapters: dict[str, Path] | None = None,
          agents: dict[str, tuple[str, str | None]] | None = None, version: int = 1, since: Path | None = None) -> dict:
    """`edgepack build --recipe`; returns the bundle's manifest (`edgepack inspect --json`)."""
    recipe = out.with_suffix(".toml")
    agents = agents or {f"{m}-chat": (m, None) for m in models}
    recipe.write_text(recipe_text(models, adapters or {}, agents))
    out.unlink(missing_ok=True)
    edgepack("build", "--recipe", recipe, "-o", out, "--no-eval", "--calibration", "none",
             "--bundle-version", version, "-q", *(["--since", since] if since else []))
    return inspect(out)


def weight_sizes(manifest: dict) -> tuple[int, int, dict[str, int]]:
    """Distinct tensor bytes, the same as unshared copies, and each model's bytes no earlier model has.
    Segment 0 holds only metadata: llama.cpp reads it into its own structures, it is never mapped."""
    size = {d: b["size"] for d, b in manifest["blobs"].items()}
    seen: set[str] = set()
    own: dict[str, int] = {}
    for model in manifest["models"]:
        tensors = model["segments"][1:]
        own[model["name"]] = sum(size[d] for d in tensors if d not in seen)
        seen.update(tensors)
    adapters = sum(size[a["digest"]] for a in manifest["adapters"])
    copies = sum(size[d] for m in manifest["models"] for d in m["segments"][1:])
    return sum(own.values()) + adapters, copies + adapters, own


def make_bundles(sources: dict[str, Path]) -> list[Bundle]:
    bundles = []
    for k in (1, 2, 3):
        tunes = ("base", *TUNES)[:k]
        specs = {
            "shared": ({m: sources[m] for m in tunes}, {}, None),
            "independent": ({m: sources[f"indep-{m}"] for m in tunes}, {}, None),
            "lora": ({"base": sources["base"]}, {a: sources[a] for a in LORA_NAMES[:k]},
                     {f"{a}-chat": ("base", a) for a in LORA_NAMES[:k]}),
        }
        for setting in SETTINGS:
            models, adapters, agents = specs[setting]
            path = WORK / f"{setting}-{k}.edgepack"
            manifest = build(path, models, adapters, agents)
            weights, copies, own = weight_sizes(manifest)
            names = tuple(a["name"] for a in manifest["agents"])
            bundles.append(Bundle(setting, k, path, names, weights, copies, own))
            print(f"  built {path.name}: {len(names)} agents, weights {weights / MIB:.1f} MiB "
                  f"(as copies {copies / MIB:.1f} MiB)", flush=True)
    return bundles


def sharing(manifest: dict) -> list[str]:
    """One line per model: how many of its segments (and bytes) the bundle's first model also has."""
    size = {d: b["size"] for d, b in manifest["blobs"].items()}
    first = manifest["models"][0]
    lines = []
    for model in manifest["models"][1:]:
        common = [d for d in model["segments"] if d in set(first["segments"])]
        lines.append(f"{manifest['name']}: {model['name']} shares {len(common)} of {len(model['segments'])} "
                     f"segments with {first['name']} ({sum(size[d] for d in common) / MIB:.1f} of "
                     f"{sum(size[d] for d in model['segments']) / MIB:.1f} MiB)")
    return lines


# ---- measurement ----


def read_memory(pid: int, blobs: Path) -> Memory:
    """smaps_rollup of the process, plus Rss/Pss of the mappings of the store's blob files."""
    rollup = smaps_rollup(pid)
    weights = {"Rss": 0, "Pss": 0}
    mappings, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            inside = head.group(1).startswith(f"{blobs}/")
            mappings += inside
        elif inside and (field := re.match(r"^(Rss|Pss):\s+(\d+) kB", line)):
            weights[field.group(1)] += int(field.group(2))
    return Memory(rollup["Rss"], rollup["Pss"], rollup["Pss_Anon"], weights["Rss"], weights["Pss"], mappings, rollup)


def quiet_decode(client: httpx.Client, base: str, agent: str, pid: int, runs: int) -> tuple[list[float], float, int]:
    """`runs` timed decodes while other processes leave the CPUs alone: the speeds, others' CPU share, tries.
    No speeds if the machine never went quiet: a contended figure would only measure the others."""
    other = 1.0
    for tries in range(1, DECODE_TRIES + 1):
        if not wait_quiet(QUIET, QUIET_WAIT_S, (pid,), RETRY_PAUSE_S):
            print(f"    others kept the CPUs busy for {QUIET_WAIT_S:.0f}s: decoding not timed", flush=True)
            return [], other, tries
        tps, other = [], 0.0
        for _ in range(runs):
            before = cpu_times(pid)
            tps.append(decode_tps(client, base, agent))
            other = max(other, others_share(before, cpu_times(pid)))
            if other >= QUIET:
                print(f"    others used {other:.0%} of the CPUs while decoding: timing again", flush=True)
                break
        else:
            return tps, other, tries
    return [], other, DECODE_TRIES


def llama_buffers(log: Path) -> dict[str, list[float]]:
    """The MiB llama.cpp logged per buffer kind ("CPU KV", "CPU_Mapped model", "CPU compute", ...), in order.
    Compute buffers are logged again at every re-reservation (applying a LoRA reserves again): sizes, not sums."""
    sizes: dict[str, list[float]] = {}
    for buft, kind, mib in re.findall(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([0-9.]+) MiB",
                                      log.read_text(errors="replace")):
        sizes.setdefault(f"{buft} {kind}", []).append(float(mib))
    return sizes


def chat(client: httpx.Client, base: str, agent: str) -> None:
    body = {"model": agent, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": CHAT_TOKENS,
            "temperature": 0}
    resp = client.post(f"{base}/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise BenchError(f"{agent}: HTTP {resp.status_code}: {resp.text}")


def decode_tps(client: httpx.Client, base: str, agent: str) -> float:
    """(tokens - 1) / (last - first text chunk) of one streamed completion, timed on the client as in
    bench_serve.py."""
    body = {"model": agent, "prompt": PROMPT, "max_tokens": DECODE_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    c = stream_completion(client, base, body, agent)
    if not c.usage or c.usage["completion_tokens"] != DECODE_TOKENS or len(c.stamps) < 2:
        raise BenchError(f"{agent}: expected {DECODE_TOKENS} tokens, got usage {c.usage}, {len(c.stamps)} chunks")
    return (DECODE_TOKENS - 1) / (c.stamps[-1] - c.stamps[0])


def measure(bundle: Bundle, repack: str, args: argparse.Namespace) -> Run:
    """Install into a fresh store, serve, one short chat per agent, read memory, then time decoding."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=WORK))
    try:
        edgepack("install", bundle.path, "--store", store)
        port = free_port()
        base = local_url(port)
        # --no-cache: a repeated request answered from the response cache would not run the model
        cmd = serve_command(store, port, "--threads", args.threads, "--ctx", args.ctx, "--slots", args.slots,
                            "--repack", repack, "--no-cache", "--preload")
        log = WORK / f"serve-{bundle.setting}-{bundle.k}-{repack}.log"
        started = time.perf_counter()
        with running(cmd, log) as proc, new_client() as client:
            wait_ready(base, proc, log)
            ready = time.perf_counter() - started
            for agent in bundle.agents:
                chat(client, base, agent)
            memory = read_memory(proc.pid, store / "blobs")
            if memory.blob_mappings == 0:
                raise BenchError(f"no blob of {store} is mapped by pid {proc.pid}: is it the server process?")
            tps, other, tries = [], 0.0, 0
            if bundle.setting in DECODED:
                tps, other, tries = quiet_decode(client, base, bundle.agents[0], proc.pid, args.decode_runs)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    run = Run(bundle.setting, bundle.k, repack, bundle.weight_bytes, bundle.copies_bytes, memory, tps, ready,
              llama_buffers(log), other, tries)
    print(f"  {bundle.setting:<11} k={bundle.k} repack={repack:<6} RSS {memory.rss_kb / 1024:6.1f} MiB  "
          f"PSS {memory.pss_kb / 1024:6.1f} MiB  weights PSS {memory.weights_pss_kb / 1024:6.1f} MiB  "
          f"decode {_median(tps)} tok/s (others used {other:.0%} CPU)  ready {ready:.1f}s", flush=True)
    return run


def delta_sizes(sources: dict[str, Path]) -> dict:
    """v1 = base + tune-a; v2 = base + tune-a retuned; v2 in full and as a delta --since v1, which must
    install on top of v1."""
    name, _ = RETUNE
    paths = {p: WORK / f"delta-{p}.edgepack" for p in ("v1", "v2-full", "v2")}
    v1 = build(paths["v1"], {"base": sources["base"], name: sources[name]}, version=1)
    v2_models = {"base": sources["base"], name: sources[f"{name}-v2"]}
    full = build(paths["v2-full"], v2_models, version=2)
    delta = build(paths["v2"], v2_models, version=2, since=paths["v1"])
    store = Path(tempfile.mkdtemp(prefix="store-", dir=WORK))
    try:  # a delta is only worth its size if it installs on top of v1
        edgepack("install", paths["v1"], "--store", store)
        edgepack("install", paths["v2"], "--store", store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    size = {p: path.stat().st_size for p, path in paths.items()}
    return {"v1_bytes": size["v1"], "v2_full_bytes": size["v2-full"], "v2_delta_bytes": size["v2"],
            "ratio": size["v2"] / size["v2-full"], "blobs_v2": len(full["blobs"]),
            "blobs_changed": len(set(full["blobs"]) - set(v1["blobs"])), "delta_since": delta["delta_since"],
            "installs_on_v1": True}


def inspect(bundle: Path) -> dict:
    return json.loads(edgepack("inspect", "--json", bundle))


# ---- report ----


def find(runs: list[Run], setting: str, k: int, repack: str) -> Run:
    return next(r for r in runs if (r.setting, r.k, r.repack) == (setting, k, repack))


def goals(runs: list[Run], bundles: list[Bundle], delta: dict) -> dict:
    """The three goals per repack mode; extra = 3 models minus 1, against the ideal extra bytes."""
    by = {(b.setting, b.k): b for b in bundles}
    ideal = {"shared": sum(list(by["shared", 3].own_bytes.values())[1:]),
             "independent": sum(list(by["independent", 3].own_bytes.values())[1:])}
    out: dict = {"delta": {"ratio": round(delta["ratio"], 4), "goal": GOAL_DELTA, "met": delta["ratio"] <= GOAL_DELTA}}
    for repack in REPACK:
        base, lora3 = find(runs, "shared", 1, repack).memory, find(runs, "lora", 3, repack).memory
        ratio = lora3.rss_kb / base.rss_kb
        out[f"lora/{repack}"] = {"rss_ratio": round(ratio, 4), "pss_ratio": round(lora3.pss_kb / base.pss_kb, 4),
                                 "goal": GOAL_LORA, "met": ratio <= GOAL_LORA}
        for setting in ("shared", "independent"):
            one, three = find(runs, setting, 1, repack).memory, find(runs, setting, 3, repack).memory
            extra = {m: (getattr(three, f) - getattr(one, f)) * 1024
                     for m, f in (("rss", "rss_kb"), ("pss", "pss_kb"), ("weights_pss", "weights_pss_kb"),
                                  ("weights_rss", "weights_rss_kb"), ("anon", "anon_kb"))}
            dev = {m: v / ideal[setting] - 1 for m, v in extra.items() if m != "anon"}
            out[f"{setting}/{repack}"] = {"ideal_extra_bytes": ideal[setting], "extra_bytes": extra,
                                          "deviation": {m: round(v, 4) for m, v in dev.items()},
                                          "goal": GOAL_SHARED,
                                          "met": {m: abs(v) <= GOAL_SHARED for m, v in dev.items()}}
    return out


def report_table(runs: list[Run]) -> str:
    rows = [("SETTING", "REPACK", "K", "WEIGHTS MIB", "AS COPIES MIB", "RSS MIB", "PSS MIB", "WEIGHTS RSS",
             "WEIGHTS PSS", "ANON MIB", "DECODE TOK/S", "OTHER CPU", "READY S")]
    for r in sorted(runs, key=lambda r: (SETTINGS.index(r.setting), REPACK.index(r.repack), r.k)):
        m = r.memory
        rows.append((r.setting, r.repack, str(r.k), f"{r.weight_bytes / MIB:.1f}", f"{r.copies_bytes / MIB:.1f}",
                     f"{m.rss_kb / 1024:.1f}", f"{m.pss_kb / 1024:.1f}", f"{m.weights_rss_kb / 1024:.1f}",
                     f"{m.weights_pss_kb / 1024:.1f}", f"{m.anon_kb / 1024:.1f}",
                     _median(r.decode_tps), f"{r.other_cpu:.0%}" if r.decode_tps else "-", f"{r.ready_s:.1f}"))
    return format_table(rows)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def goal_lines(result: dict, delta: dict) -> list[str]:
    lines = []
    for repack in REPACK:
        g = result[f"lora/{repack}"]
        lines.append(f"lora/{repack}: 3 LoRA agents / base alone, RSS {g['rss_ratio']:.3f} (PSS {g['pss_ratio']:.3f}); "
                     f"goal <= {GOAL_LORA}: {'met' if g['met'] else 'missed'}")
        for setting in ("shared", "independent"):
            g = result[f"{setting}/{repack}"]
            e, d = g["extra_bytes"], g["deviation"]
            lines.append(f"{setting}/{repack}: 3 models - 1: ideal {g['ideal_extra_bytes'] / MIB:.1f} MiB; "
                         f"RSS {e['rss'] / MIB:+.1f} ({d['rss']:+.1%}), PSS {e['pss'] / MIB:+.1f} ({d['pss']:+.1%}), "
                         f"weights PSS {e['weights_pss'] / MIB:+.1f} ({d['weights_pss']:+.1%}), "
                         f"anon {e['anon'] / MIB:+.1f} MiB; within {GOAL_SHARED:.0%}: "
                         + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in g["met"].items()))
    lines.append(f"delta: v2 as a delta {delta['v2_delta_bytes'] / MIB:.1f} MiB vs full "
                 f"{delta['v2_full_bytes'] / MIB:.1f} MiB = {delta['ratio']:.1%} "
                 f"({delta['blobs_changed']} of {delta['blobs_v2']} blobs); "
                 f"goal <= {GOAL_DELTA:.0%}: {'met' if result['delta']['met'] else 'missed'}")
    return lines


def save_results(args: argparse.Namespace, bundles: list[Bundle], runs: list[Run], delta: dict,
                 result: dict, shared_lines: list[str], code_at_start: str) -> None:
    write_results("memory", {
        # servers import the working tree when they start: say if it changed during the run
        "edgepack": {"at_start": code_at_start, "at_end": _git_state()},
        "settings": {"threads": args.threads, "ctx": args.ctx, "slots": args.slots, "decode_runs": args.decode_runs,
                     "chat_tokens": CHAT_TOKENS, "decode_tokens": DECODE_TOKENS, "prompt": PROMPT,
                     "tunes": {k: v.name for k, v in TUNES.items()}, "retune": [RETUNE[0], RETUNE[1].name],
                     "alignments": ALIGNMENT, "lora": {"rank": LORA_RANK, "targets": LORA_TARGETS}},
        "sharing": shared_lines,
        "bundles": [{**asdict(b), "path": b.path.name} for b in bundles],
        "runs": [asdict(r) for r in runs],
        "delta": delta,
        "goals": result,
    })


def _git_state() -> str:
    head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "runtime", "packager"]).strip()
    return f"{head}{' + uncommitted changes in runtime/ or packager/' if dirty else ''}"


# ---- main ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads per model (default 2)")
    p.add_argument("--ctx", type=int, default=4096, help="context per slot (default 4096)")
    p.add_argument("--slots", type=int, default=2, help="slots per model, the server's default (default 2)")
    p.add_argument("--decode-runs", type=int, default=5, help="64-token decodes per server, median (default 5)")
    args = p.parse_args(argv)
    if min(args.threads, args.slots, args.decode_runs) < 1 or args.ctx < 64:
        p.error("--threads, --slots and --decode-runs must be >= 1, --ctx >= 64")
    return args


def bench(args: argparse.Namespace) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    code_at_start = _git_state()
    base = model_path()
    print(f"model: {base} ({base.stat().st_size / MIB:.1f} MiB)", flush=True)
    sources = prepare_sources(base)
    bundles = make_bundles(sources)
    shared_lines = sharing(inspect(WORK / "shared-3.edgepack")) + sharing(inspect(WORK / "independent-3.edgepack"))
    for line in shared_lines:
        print(f"  {line}")
    os.environ["EDGEPACK_LLAMA_LOG"] = "1"  # llama.cpp's buffer sizes go to the server logs
    runs = [measure(b, repack, args) for b in bundles for repack in REPACK]  # both modes close in time
    delta = delta_sizes(sources)
    result = goals(runs, bundles, delta)
    print()
    print(report_table(runs))
    print()
    for line in goal_lines(result, delta):
        print(line)
    save_results(args, bundles, runs, delta, result, shared_lines, code_at_start)


def main(argv: list[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench_memory: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
