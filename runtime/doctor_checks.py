"""The checks `edgepack doctor` runs on the machine: board, CPU, SIMD against the llama.cpp build, memory, heat,
power, Jetson. Each reads files under `System.root` and runs commands found on `System.path`, so tests run
them against recorded trees and fake commands; the store and systemd checks are in runtime/doctor.py.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import hardware
from .boards import HOST, BoardProfile, load_board
from .memory import cgroup_memory_max, format_mib, resolve_budget

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail or skip (not applicable here)
    summary: str
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    """Where the probes look: a file-system root (/proc, /sys, /etc under it), the PATH their commands are
    looked up on (None: the environment's), and the machine's architecture."""

    root: Path = Path("/")
    path: str | None = None
    machine: str = field(default_factory=platform.machine)

    @property
    def live(self) -> bool:
        """Whether this is the machine we run on (then this process's affinity and cgroup apply)."""
        return self.root == Path("/")

    def file(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.file(absolute).read_text(errors="replace")
        except OSError:
            return None

    def command(self, *argv: str, timeout: float = 10) -> tuple[int, str] | None:
        """(exit status, stdout and stderr) of a command, or None when it is not on the PATH."""
        found = shutil.which(argv[0], path=self.path)
        if found is None:
            return None
        try:
            done = subprocess.run([found, *argv[1:]], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 127, str(exc)
        return done.returncode, (done.stdout + done.stderr).strip()


# ---- board and CPU ---------------------------------------------------------------------------

# The device-tree model strings of the boards we have profiles for (Pi 400 / CM4 are a Pi 4's BCM2711, Pi 500 /
# CM5 a Pi 5's BCM2712; JetPack 5 says "NVIDIA Orin Nano Developer Kit", JetPack 6 "NVIDIA Jetson Orin Nano ...").
_BOARD_MODELS = (
    ("rpi5", re.compile(r"Raspberry Pi (?:5|500|Compute Module 5)\b")),
    ("rpi4", re.compile(r"Raspberry Pi (?:4|400|Compute Module 4)\b")),
    ("jetson-orin-nano", re.compile(r"\bOrin Nano\b")),
)
# ARM "CPU part" numbers (MIDR_EL1 part field) of the cores these boards and their kin use.
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
              "0xd47": "Cortex-A710", "0xd4b": "Cortex-A78C", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720"}


def device_model(system: System) -> str | None:
    text = system.read("/proc/device-tree/model") or system.read("/sys/firmware/devicetree/base/model")
    return text.strip("\x00\n ") if text else None


def board_for_model(model: str | None) -> str:
    """The board profile a device-tree model string names, else HOST."""
    return next((name for name, pattern in _BOARD_MODELS if model and pattern.search(model)), HOST)


def check_board(system: System) -> tuple[Check, BoardProfile | None]:
    model = device_model(system)
    name = board_for_model(model)
    profile = None if name == HOST else load_board(name)
    details = {"model": model, "profile": name, "arch": system.machine}
    where = model or "no device-tree model (not a Pi or Jetson)"
    if profile is None:
        return Check("board", OK, f"{where}; no board profile matches, serve uses the host profile "
                                  f"({system.machine})", details), None
    if profile.arch != system.machine:
        return Check("board", FAIL, f"{where}: profile {name} is {profile.arch}, but this system runs "
                                    f"{system.machine}; install a 64-bit OS", details), profile
    return Check("board", OK, f"{where}: profile {name} ({profile.arch})", details), profile


def read_cpus(system: System) -> list[hardware.Cpu]:
    return hardware.read_cpus(system.file("/sys/devices/system/cpu"), system.file("/proc/cpuinfo"))


def check_cpu(system: System, profile: BoardProfile | None) -> Check:
    cpus = read_cpus(system)
    if not cpus:
        return Check("cpu", WARN, "no CPUs under /sys/devices/system/cpu")
    cores: dict[tuple[int, int], hardware.Cpu] = {}
    for cpu in cpus:
        cores.setdefault(cpu.core, cpu)
    top = max((c.max_khz or 0) for c in cores.values())
    model = _cpuinfo_value(system, "model name") or "core"  # x86; arm64 names its cores by part number
    kinds: Counter[str] = Counter()
    for cpu in cores.values():
        little = (cpu.max_khz or top) < top or cpu.part in hardware._ARM_LITTLE_PARTS
        name = f"{_ARM_PARTS.get(cpu.part, 'ARM core')} ({cpu.part})" if cpu.part else model
        mhz = f" @ {cpu.max_khz // 1000} MHz" if cpu.max_khz else ""
        kinds[f"{'efficiency' if little else 'performance'}: {name}{mhz}"] += 1
    groups = ", ".join(f"{n}x {kind}" for kind, n in sorted(kinds.items()))
    summary = f"{len(cpus)} logical CPUs, {len(cores)} cores ({groups})"
    details = {"logical": len(cpus), "cores": len(cores), "kinds": dict(kinds)}
    if profile is not None:
        expected = sum(c.count for c in profile.cores)
        if expected != len(cores):
            return Check("cpu", WARN, f"{summary}; profile {profile.name} has {expected} ({profile.core_summary}): "
                                      "cores offline or a different board?", details)
    return Check("cpu", OK, summary, details)


def _cpuinfo_value(system: System, key: str) -> str | None:
    for line in (system.read("/proc/cpuinfo") or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def thread_plan(system: System) -> hardware.ThreadPlan:
    """The plan serve makes: this process's affinity and cgroup quota on the live system, every CPU of a tree."""
    if system.live:
        return hardware.thread_plan()
    cpus = read_cpus(system)
    return hardware.plan_threads(cpus, {c.id for c in cpus})


def check_threads(system: System, serve_threads: tuple[int, str] | None = None) -> Check:
    """`serve_threads`: what serve resolves for the current release (threads, where from), when there is one."""
    plan = thread_plan(system)
    summary = f"{plan.threads} threads on CPUs {list(plan.cpus)} ({plan.reason})"
    if serve_threads is not None and serve_threads[0] != plan.threads:
        summary = f"{serve_threads[0]} threads ({serve_threads[1]}); the core plan alone: {summary}"
    return Check("threads", OK, summary, {"threads": serve_threads[0] if serve_threads else plan.threads,
                                          "plan": plan.threads, "cpus": list(plan.cpus), "reason": plan.reason})


# ---- SIMD: the CPU's against the llama.cpp build's --------------------------------------------

# llama.cpp's system-info names (ggml-cpu.cpp, ggml_backend_cpu_get_features: compiler flags of the build) ->
# the /proc/cpuinfo flag of the instructions they need (x86 "flags", arm64 "Features") and the common name.
_X86_FEATURES = {"SSE3": ("pni", "sse3"), "SSSE3": ("ssse3", "ssse3"), "AVX": ("avx", "avx"),
                 "AVX_VNNI": ("avx_vnni", "avx-vnni"), "AVX2": ("avx2", "avx2"), "F16C": ("f16c", "f16c"),
                 "FMA": ("fma", "fma"), "BMI2": ("bmi2", "bmi2"), "AVX512": ("avx512f", "avx512"),
                 "AVX512_VBMI": ("avx512vbmi", "avx512-vbmi"), "AVX512_VNNI": ("avx512_vnni", "avx512-vnni"),
                 "AVX512_BF16": ("avx512_bf16", "avx512-bf16"), "AMX_INT8": ("amx_int8", "amx-int8")}
_ARM_FEATURES = {"NEON": ("asimd", "neon"), "ARM_FMA": ("asimd", "fma"), "FP16_VA": ("asimdhp", "fp16"),
                 "DOTPROD": ("asimddp", "dotprod"), "MATMUL_INT8": ("i8mm", "i8mm"), "SVE": ("sve", "sve"),
                 "SME": ("sme", "sme"), "SME2": ("sme2", "sme2")}


def cpu_flags(system: System) -> set[str]:
    """The CPU's feature flags: on the live arm64 machine the kernel's hwcaps (qemu-user emulates those, not
    /proc/cpuinfo), else /proc/cpuinfo's flags / Features."""
    if system.live and (hwcaps := hardware.arm_hwcaps()):
        return hwcaps
    flags: set[str] = set()
    for line in (system.read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def system_info_sections(info: str) -> dict[str, dict[str, str]]:
    """llama_print_system_info()'s "CUDA : ARCHS = 870 | ... | CPU : NEON = 1 | ..." -> {backend: {name: value}}."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for token in info.split("|"):
        backend, sep, rest = token.partition(" : ")
        if sep:
            current, token = sections.setdefault(backend.strip(), {}), rest
        name, _, value = token.partition("=")
        if name.strip():
            current[name.strip()] = value.strip()
    return sections


def compare_simd(flags: set[str], info: str) -> Check:
    """What the llama.cpp build (its system-info text) uses against what the CPU offers (its cpuinfo flags):
    fail when the build uses instructions the CPU lacks (the first one stops the process with SIGILL), warn
    when the CPU has instructions the build leaves unused (slower kernels)."""
    known = {**_X86_FEATURES, **_ARM_FEATURES}
    build = system_info_sections(info).get("CPU", {})
    used = [n for n, v in build.items() if n in known and v == "1"]
    family = _ARM_FEATURES if "asimd" in flags else _X86_FEATURES
    lacking = [known[n][1] for n in used if known[n][0] not in flags]
    unused = sorted({name for n, (flag, name) in family.items() if flag in flags and n not in used})
    names = list(dict.fromkeys(known[n][1] for n in used))
    details = {"build": names, "cpu_lacks": lacking, "build_lacks": unused}
    if not flags:
        return Check("simd", WARN, "cannot read the CPU's flags from /proc/cpuinfo", details)
    if not build:
        return Check("simd", WARN, f"llama.cpp reports no CPU features ({info.strip()[:80]!r})", details)
    if lacking:
        return Check("simd", FAIL, f"this llama.cpp build uses {', '.join(lacking)}, which the CPU lacks: it will "
                                   "stop with SIGILL (illegal instruction); install the runtime built for this "
                                   "board", details)
    uses = f"llama.cpp uses {', '.join(names)}"
    if unused:
        return Check("simd", WARN, f"{uses}; the CPU also has {', '.join(unused)}, which this build leaves unused "
                                   "(slower kernels): install the runtime built for this board", details)
    return Check("simd", OK, f"{uses}; the CPU has nothing more this build could use", details)


# ---- memory and disk ---------------------------------------------------------------------------


def meminfo(system: System) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    for line in (system.read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def check_memory(system: System, board_gib: float | None = None, weights: int = 0) -> Check:
    """`board_gib`: the current release's board memory; `weights`: its largest model's weights in bytes."""
    info = meminfo(system)
    if "MemTotal" not in info or "MemAvailable" not in info:
        return Check("memory", WARN, "cannot read MemTotal and MemAvailable from /proc/meminfo")
    cgroup = cgroup_memory_max(system.file("/sys/fs/cgroup"), system.file("/proc/self/cgroup"))
    budget = resolve_budget(None, board_gib, available=info["MemAvailable"], cgroup_max=cgroup)
    details = {"total": info["MemTotal"], "available": info["MemAvailable"], "swap_total": info.get("SwapTotal", 0),
               "swap_free": info.get("SwapFree", 0), "cgroup_max": cgroup, "budget": budget.bytes,
               "budget_reason": budget.reason, "largest_model": weights}
    swap = (f"swap {format_mib(info['SwapFree'])} free of {format_mib(info['SwapTotal'])}"
            if info.get("SwapTotal") else "no swap")
    summary = (f"{format_mib(info['MemTotal'])} total, {format_mib(info['MemAvailable'])} available, {swap}, "
               f"cgroup limit {format_mib(cgroup) if cgroup else 'none'}; serve's budget {format_mib(budget.bytes)} "
               f"({budget.reason})")
    if weights > budget.bytes:
        return Check("memory", WARN, f"{summary}: below the largest model's {format_mib(weights)} of weights, "
                                     "it cannot load", details)
    return Check("memory", OK, summary, details)


def check_disk(store: Path | None, release_bytes: int = 0) -> Check:
    if store is None or not store.is_dir():
        return Check("disk", SKIP, "no --store given" if store is None else f"no store at {store}")
    try:
        usage = shutil.disk_usage(store)
    except OSError as exc:
        return Check("disk", FAIL, f"cannot read the free space under {store}: {exc.strerror or exc}")
    details = {"free": usage.free, "total": usage.total, "release": release_bytes}
    summary = f"{format_mib(usage.free)} free of {format_mib(usage.total)} under {store}"
    if usage.free < release_bytes:
        return Check("disk", WARN, f"{summary}: less than the current release's {format_mib(release_bytes)}, an "
                                   "update of the same size would not fit (edgepack gc frees old releases)", details)
    return Check("disk", OK, summary, details)


# ---- heat and power ------------------------------------------------------------------------------

HOT_C = 80.0  # without a passive trip point: where the Pi's firmware starts to throttle
# vcgencmd get_throttled's bits (Raspberry Pi documentation, "vcgencmd"): 0-3 now, 16-19 since boot.
_THROTTLED_BITS = {0: ("under-voltage now", "under-voltage has occurred"),
                   1: ("arm frequency capped now", "arm frequency capping has occurred"),
                   2: ("throttled now", "throttling has occurred"),
                   3: ("soft temperature limit active now", "soft temperature limit has occurred")}


def check_thermal(system: System) -> Check:
    zones = []
    for zone in sorted(system.file("/sys/class/thermal").glob("thermal_zone*"), key=lambda p: p.name):
        try:
            temp = int((zone / "temp").read_text()) / 1000
            kind = (zone / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        zones.append((kind, temp, _passive_trip(zone)))
    if not zones:
        return Check("thermal", SKIP, "no thermal zones under /sys/class/thermal")
    hot = [(k, t, limit) for k, t, limit in zones if t >= (limit or HOT_C)]
    text = ", ".join(f"{k} {t:.1f} °C" for k, t, _ in zones)
    details = {k: t for k, t, _ in zones}
    if hot:
        return Check("thermal", WARN, f"{text}: {', '.join(k for k, _, _ in hot)} at or above its throttling point "
                                      f"({', '.join(f'{(limit or HOT_C):.0f} °C' for _, _, limit in hot)}); "
                                      "add cooling", details)
    return Check("thermal", OK, text, details)


def _passive_trip(zone: Path) -> float | None:
    limits = []
    for kind in zone.glob("trip_point_*_type"):
        try:
            if kind.read_text().strip() in ("passive", "hot"):
                limits.append(int(kind.with_name(kind.name.replace("_type", "_temp")).read_text()) / 1000)
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


def decode_throttled(value: int) -> list[str]:
    """vcgencmd's get_throttled bits -> what they say, e.g. 0x50005 -> under-voltage now, throttled now, ..."""
    now = [names[0] for bit, names in _THROTTLED_BITS.items() if value >> bit & 1]
    return now + [names[1] for bit, names in _THROTTLED_BITS.items() if value >> (bit + 16) & 1]


def check_throttling(system: System, profile: BoardProfile | None) -> Check:
    result = system.command("vcgencmd", "get_throttled")
    on_pi = profile is not None and profile.name.startswith("rpi")
    if result is None:
        hint = " (install raspi-utils to see the Pi's throttling)" if on_pi else ""
        return Check("throttling", SKIP, f"vcgencmd not on PATH{hint}")
    status, output = result
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", output)
    if status != 0 or match is None:
        return Check("throttling", WARN, f"vcgencmd get_throttled failed: {output[:120] or f'exit {status}'}")
    value = int(match.group(1), 16)
    flags = decode_throttled(value)
    details = {"value": match.group(1), "flags": flags}
    if flags:
        return Check("throttling", WARN, f"{match.group(1)}: {', '.join(flags)}; use the official power supply "
                                         "and cooling", details)
    return Check("throttling", OK, f"{match.group(1)}: no under-voltage or throttling since boot", details)


# ---- Jetson ----------------------------------------------------------------------------------------


def l4t_release(text: str) -> str | None:
    """"# R36 (release), REVISION: 4.7, ..." -> "R36.4.7"."""
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def check_jetson(system: System, profile: BoardProfile | None, gpu_offload: bool) -> Check:
    release_text = system.read("/etc/nv_tegra_release")
    if release_text is None and (profile is None or profile.gpu is None):
        return Check("jetson", SKIP, "not a Jetson (no /etc/nv_tegra_release)")
    release = l4t_release(release_text or "")
    power = system.command("nvpmodel", "-q")
    mode = None
    if power is not None and power[0] == 0:
        mode = next((line.split(":", 1)[1].strip() for line in power[1].splitlines()
                     if line.startswith("NV Power Mode")), None)
    layers = (profile.gpu_layers if profile else 0) if gpu_offload else 0
    build = (f"CUDA, serve offloads {'all' if layers < 0 else layers} layers (memory shared with the CPU: the "
             "budget counts them)" if gpu_offload else "CPU only (serve runs on the CPU cores; "
             "jetson-cuda/build-jetson-cuda-wheel.sh builds the CUDA one)")
    details = {"l4t": release, "power_mode": mode, "cuda_build": gpu_offload, "gpu_layers": layers}
    summary = (f"L4T {release or 'unknown'}, power mode {mode or ('unknown' if power else '? (nvpmodel not on PATH)')}"
               f", llama.cpp build: {build}")
    if release is None:
        return Check("jetson", WARN, f"{summary}; /etc/nv_tegra_release is missing or unreadable", details)
    return Check("jetson", OK, summary, details)
