"""What the machine we run on offers: CPU cores (physical, big/little), SIMD features, memory.

Used to pick thread counts and to describe the host as a board profile when none is named.
"""

from __future__ import annotations

import os
import platform
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


def simd_features() -> list[str]:
    arch = platform.machine()
    flags = cpu_flags()
    return [_ARM_NAMES.get(f, f) for f in _SIMD_FLAGS.get(arch, []) if f in flags]


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity mask and cgroup CPU quota)."""
    count = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(count, int(quota))) if quota else count


def physical_cores() -> int:
    """Physical cores within our affinity: hyper-threads only slow llama.cpp's matmuls down."""
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    logical = psutil.cpu_count() or physical
    per_core = max(1, logical // physical)
    return max(1, min(physical, usable_cpus() // per_core or 1))


def default_threads() -> int:
    return physical_cores()


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
