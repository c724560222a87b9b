"""What the machine we run on offers: CPU cores (physical, big/little), SIMD features, memory.

Used to pick thread counts and to describe the host as a board profile when none is named.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil

_SIMD_FLAGS = {
    "x86_64": ["avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"],
    "aarch64": ["asimd", "asimddp", "fphp", "i8mm", "sve", "sve2"],
}
_ARM_NAMES = {"asimd": "neon", "asimddp": "dotprod", "fphp": "fp16"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


# The kernel's arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h) -> the names /proc/cpuinfo's Features uses.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_ARM_HWCAP2 = {1: "sve2", 13: "i8mm", 23: "sme", 37: "sme2"}


def arm_hwcaps() -> set[str] | None:
    """This process's arm64 CPU features from the auxiliary vector (getauxval): what the kernel lets us execute, and
    what qemu-user reports for the CPU it emulates, where /proc/cpuinfo would be the host's. None off arm64."""
    if platform.machine() != "aarch64":
        return None
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    words = ((getauxval(_AT_HWCAP), _ARM_HWCAP), (getauxval(_AT_HWCAP2), _ARM_HWCAP2))
    return {name for word, bits in words for bit, name in bits.items() if word >> bit & 1}


def simd_features() -> list[str]:
    arch = platform.machine()
    flags = arm_hwcaps() or cpu_flags()
    return [_ARM_NAMES.get(f, f) for f in _SIMD_FLAGS.get(arch, []) if f in flags]


# ARM "CPU part" numbers of efficiency (LITTLE) cores, for boards whose kernel exposes no cpufreq.
_ARM_LITTLE_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd46": "Cortex-A510", "0xd80": "Cortex-A520",
                     "0xd04": "Cortex-A35"}


@dataclass(frozen=True)
class Cpu:
    id: int
    core: tuple[int, int]  # (package, core id): hyper-threads share it
    max_khz: int | None
    part: str | None  # ARM CPU part, e.g. "0xd0b"


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    cpus: tuple[int, ...]  # the logical CPUs of the chosen cores (one per core)
    reason: str


def read_cpus(sys_cpu: Path = Path("/sys/devices/system/cpu"), cpuinfo: Path = Path("/proc/cpuinfo")) -> list[Cpu]:
    """Every logical CPU with its physical core, max frequency and ARM part number, from sysfs/procfs."""
    parts = _cpuinfo_parts(cpuinfo)
    cpus = []
    for entry in sorted(sys_cpu.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        cpu_id = int(entry.name[3:])
        core = (_read_int(entry / "topology/physical_package_id") or 0, _read_int(entry / "topology/core_id"))
        cpus.append(Cpu(cpu_id, (core[0], core[1] if core[1] is not None else cpu_id),
                        _read_int(entry / "cpufreq/cpuinfo_max_freq"), parts.get(cpu_id)))
    return cpus


def plan_threads(cpus: list[Cpu], allowed: set[int], quota: float | None = None) -> ThreadPlan:
    """One thread per physical performance core we may use.

    llama.cpp's threads work in lock-step, so one slow thread (an efficiency core, or a hyper-thread
    sharing a busy core) slows them all: big.LITTLE boards and hybrid x86 parts use only the fastest
    cores (highest cpufreq max, else not a known LITTLE ARM part), one logical CPU per core, within the
    affinity mask and the cgroup CPU quota."""
    usable = [c for c in cpus if c.id in allowed] or [Cpu(i, (0, i), None, None) for i in sorted(allowed)]
    freqs = {c.max_khz for c in usable if c.max_khz}
    reason = "physical cores"
    if len(freqs) > 1:
        top = max(freqs)
        usable = [c for c in usable if c.max_khz == top]
        reason = f"performance cores ({top // 1000} MHz)"
    elif any(c.part in _ARM_LITTLE_PARTS for c in usable) and any(c.part not in _ARM_LITTLE_PARTS for c in usable):
        usable = [c for c in usable if c.part not in _ARM_LITTLE_PARTS]
        reason = "big cores (ARM part numbers)"
    chosen: dict[tuple[int, int], int] = {}
    for cpu in usable:
        chosen.setdefault(cpu.core, cpu.id)
    threads = len(chosen)
    if quota is not None and quota < threads:
        threads, reason = max(1, int(quota)), reason + f", capped by the cgroup quota ({quota:g} CPUs)"
    return ThreadPlan(threads, tuple(sorted(chosen.values()))[:threads], reason)


def thread_plan() -> ThreadPlan:
    return plan_threads(read_cpus(), set(os.sched_getaffinity(0)), _cgroup_cpu_quota())


def default_threads() -> int:
    return thread_plan().threads


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cpuinfo_parts(path: Path) -> dict[int, str]:
    parts: dict[int, str] = {}
    current = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return parts
    for line in lines:
        key, _, value = (x.strip() for x in line.partition(":"))
        if key == "processor" and value.isdigit():
            current = int(value)
        elif key == "CPU part" and current is not None:
            parts[current] = value
    return parts


def total_memory_bytes() -> int:
    return psutil.virtual_memory().total


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1.0, int(quota) / int(period))
