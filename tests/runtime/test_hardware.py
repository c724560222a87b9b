"""Thread counts from the core layout, on sysfs/procfs trees of real boards written to disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgepack.runtime.hardware import plan_threads, read_cpus


def write_sysfs(root: Path, cpus: list[tuple[int, int, int | None]], parts: dict[int, str] | None = None) -> tuple:
    """cpus: (cpu id, core id, max kHz or None). Returns (sys cpu dir, cpuinfo path)."""
    sys_cpu = root / "sys"
    for cpu, core, khz in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text("0\n")
        if khz is not None:
            (sys_cpu / f"cpu{cpu}" / "cpufreq").mkdir()
            (sys_cpu / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{khz}\n")
    (sys_cpu / "cpufreq").mkdir(exist_ok=True)  # not a cpuN entry: must be ignored
    cpuinfo = root / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {c}\nCPU part\t: {(parts or {}).get(c, '0xd0b')}\n\n"
                               for c, _, _ in cpus))
    return sys_cpu, cpuinfo


def test_big_little_uses_only_the_big_cores(tmp_path):
    # RK3588-like: 4x A55 @ 1.8 GHz (cpu0-3) + 4x A76 @ 2.4 GHz (cpu4-7)
    layout = [(i, i, 1_800_000) for i in range(4)] + [(i, i, 2_400_000) for i in range(4, 8)]
    plan = plan_threads(read_cpus(*write_sysfs(tmp_path, layout)), set(range(8)))
    assert plan.threads == 4 and plan.cpus == (4, 5, 6, 7) and "2400 MHz" in plan.reason


def test_big_little_without_cpufreq_falls_back_to_part_numbers(tmp_path):
    layout = [(i, i, None) for i in range(6)]
    parts = {0: "0xd05", 1: "0xd05", 2: "0xd05", 3: "0xd05", 4: "0xd0b", 5: "0xd0b"}  # 4x A55 + 2x A76
    plan = plan_threads(read_cpus(*write_sysfs(tmp_path, layout, parts)), set(range(6)))
    assert plan.threads == 2 and plan.cpus == (4, 5)


def test_hybrid_x86_with_hyperthreads_one_thread_per_p_core(tmp_path):
    # 2 P-cores with 2 threads each (cpu0-3, 4.7 GHz) + 4 E-cores (cpu4-7, 3.4 GHz)
    layout = [(0, 0, 4_700_000), (1, 0, 4_700_000), (2, 1, 4_700_000), (3, 1, 4_700_000)]
    layout += [(4 + i, 8 + i, 3_400_000) for i in range(4)]
    plan = plan_threads(read_cpus(*write_sysfs(tmp_path, layout)), set(range(8)))
    assert plan.threads == 2 and plan.cpus == (0, 2)


def test_affinity_and_cgroup_quota_limit_the_threads(tmp_path):
    layout = [(i, i, 2_400_000) for i in range(4)]  # Pi 5
    cpus = read_cpus(*write_sysfs(tmp_path, layout))
    assert plan_threads(cpus, {2, 3}).threads == 2
    capped = plan_threads(cpus, set(range(4)), quota=1.5)
    assert capped.threads == 1 and "cgroup quota" in capped.reason


def planned_here(cpus: set[int]) -> tuple[int, tuple[int, ...]]:
    """thread_plan() of a child process pinned to `cpus` (as under `taskset`), read from this machine's sysfs."""
    code = "from edgepack.runtime.hardware import thread_plan; p = thread_plan(); print(p.threads, *p.cpus)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert result.returncode == 0, result.stderr
    threads, *chosen = (int(x) for x in result.stdout.split())
    return threads, tuple(chosen)


def siblings(cpu: int) -> set[int]:
    """The logical CPUs sharing `cpu`'s core, as the kernel lists them (thread_siblings_list, e.g. "0,4" or "0-1")."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    if not path.exists():
        return {cpu}
    out: set[int] = set()
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def test_this_machine_plans_within_the_affinity_mask_one_thread_per_core():
    allowed = sorted(os.sched_getaffinity(0))
    assert planned_here({allowed[-1]}) == (1, (allowed[-1],))  # pinned to one CPU: one thread, on it
    threads, chosen = planned_here(set(allowed))
    assert len(chosen) == threads and set(chosen) <= set(allowed)
    assert all(not siblings(a) & siblings(b) for a in chosen for b in chosen if a != b)  # never two on one core
