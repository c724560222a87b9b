"""`edgepack doctor`: the checks against recorded board trees (tests/runtime/fixtures/boards, see its README),
fake vcgencmd / nvpmodel / systemctl scripts on a PATH, and the real command on this machine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.runtime.cli import cli
from edgepack.runtime.doctor import check_unit
from edgepack.runtime.doctor_checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    System,
    board_for_model,
    check_board,
    check_cpu,
    check_jetson,
    check_thermal,
    check_threads,
    check_throttling,
    compare_simd,
    cpu_flags,
    decode_throttled,
)

BOARDS = Path(__file__).parent / "fixtures" / "boards"
# llama_print_system_info()'s CPU section (names from ggml-cpu.cpp's ggml_backend_cpu_get_features) for a
# generic armv8-a build, an armv8.2-a+dotprod+fp16 build, and the latter with CUDA on a Jetson.
GENERIC_ARM = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
DOTPROD_ARM = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
CUDA_ARM = "CUDA : ARCHS = 870 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + DOTPROD_ARM


def board(name: str, path: Path | None = None) -> System:
    return System(root=BOARDS / name, path=str(path) if path else "", machine="aarch64")


def fake_command(directory: Path, name: str, script: str) -> Path:
    """A tiny executable shell script standing in for a board's tool."""
    directory.mkdir(exist_ok=True)
    command = directory / name
    command.write_text("#!/bin/sh\n" + script)
    command.chmod(0o755)
    return directory


@pytest.mark.parametrize(("name", "model", "cores", "threads"), [
    ("rpi4", "Raspberry Pi 4 Model B Rev 1.4", "4x performance: Cortex-A72 (0xd08) @ 1800 MHz", 4),
    ("rpi5", "Raspberry Pi 5 Model B Rev 1.0", "4x performance: Cortex-A76 (0xd0b) @ 2400 MHz", 4),
    ("jetson-orin-nano", "NVIDIA Jetson Orin Nano Developer Kit", "6x performance: Cortex-A78AE (0xd42) @ 1510 MHz",
     6),
])
def test_each_board_is_recognised_with_its_cores_and_thread_plan(name, model, cores, threads):
    system = board(name)
    found, profile = check_board(system)
    assert (found.status, found.details["model"], found.details["profile"]) == (OK, model, name)
    assert profile is not None and profile.name == name
    cpu = check_cpu(system, profile)
    assert cpu.status == OK and cores in cpu.summary, cpu.summary
    plan = check_threads(system)
    assert plan.details["threads"] == threads and plan.details["cpus"] == list(range(threads))


def test_model_strings_of_kin_boards_and_jetpack_5_map_to_the_profiles():
    assert board_for_model("NVIDIA Orin Nano Developer Kit") == "jetson-orin-nano"  # JetPack 5
    assert board_for_model("Raspberry Pi 400 Rev 1.0") == "rpi4"
    assert board_for_model("Raspberry Pi Compute Module 5 Rev 1.0") == "rpi5"
    assert board_for_model("Raspberry Pi 3 Model B Rev 1.2") == "host"
    assert board_for_model(None) == "host"


def test_a_32_bit_os_on_a_pi_fails_the_board_check():
    found, _ = check_board(System(root=BOARDS / "rpi4", machine="armv7l"))
    assert found.status == FAIL and "64-bit" in found.summary


def test_a_pi5_with_a_generic_neon_build_warns_naming_dotprod():
    check = compare_simd(cpu_flags(board("rpi5")), GENERIC_ARM)
    assert check.status == WARN
    assert "dotprod" in check.summary and check.details["build_lacks"] == ["dotprod", "fp16"]


def test_a_pi4_with_a_dotprod_build_fails_for_sigill():
    check = compare_simd(cpu_flags(board("rpi4")), DOTPROD_ARM)
    assert check.status == FAIL
    assert "SIGILL" in check.summary and check.details["cpu_lacks"] == ["fp16", "dotprod"]


@pytest.mark.parametrize(("name", "info"), [("rpi4", GENERIC_ARM), ("rpi5", DOTPROD_ARM),
                                            ("jetson-orin-nano", CUDA_ARM)])
def test_the_build_made_for_each_board_passes(name, info):
    check = compare_simd(cpu_flags(board(name)), info)
    assert check.status == OK, check.summary


def test_this_machines_build_runs_on_this_cpu():
    import llama_cpp

    check = compare_simd(cpu_flags(System()), llama_cpp.llama_print_system_info().decode())
    assert check.status in (OK, WARN) and check.details["build"], check.summary


def test_a_throttled_pi_warns_with_the_decoded_flags(tmp_path):
    path = fake_command(tmp_path / "bin", "vcgencmd", 'echo "throttled=0x50005"\n')
    system = board("rpi5", path)
    check = check_throttling(system, check_board(system)[1])
    assert check.status == WARN
    assert check.details["flags"] == ["under-voltage now", "throttled now", "under-voltage has occurred",
                                      "throttling has occurred"]
    assert decode_throttled(0) == [] and decode_throttled(0x80008) == ["soft temperature limit active now",
                                                                      "soft temperature limit has occurred"]


def test_without_vcgencmd_the_throttling_check_is_skipped_with_a_hint():
    system = board("rpi4")
    check = check_throttling(system, check_board(system)[1])
    assert check.status == SKIP and "raspi-utils" in check.summary


def test_a_jetson_reports_its_release_power_mode_and_build(tmp_path):
    path = fake_command(tmp_path / "bin", "nvpmodel", 'printf "NV Fan Mode:quiet\\nNV Power Mode: 15W\\n0\\n"\n')
    system = board("jetson-orin-nano", path)
    check = check_jetson(system, check_board(system)[1], gpu_offload=False)
    assert check.status == OK
    assert check.details == {"l4t": "R36.4.7", "power_mode": "15W", "cuda_build": False, "gpu_layers": 0}
    cuda = check_jetson(system, check_board(system)[1], gpu_offload=True)
    assert cuda.details["gpu_layers"] == -1 and "offloads all layers" in cuda.summary
    assert check_jetson(board("rpi5"), check_board(board("rpi5"))[1], gpu_offload=False).status == SKIP


def test_a_zone_past_its_passive_trip_point_warns(tmp_path):
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("86200\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    (zone / "trip_point_0_temp").write_text("85000\n")
    assert check_thermal(System(root=tmp_path)).status == WARN
    (zone / "temp").write_text("52582\n")
    check = check_thermal(System(root=tmp_path))
    assert check.status == OK and "cpu-thermal 52.6 °C" in check.summary


SYSTEMCTL_FAILED = """cat <<'EOF'
LoadState=loaded
UnitFileState=enabled
ActiveState=failed
SubState=failed
Result=exit-code
ExecMainStatus=1
WatchdogUSec=1min
NRestarts=5
EOF
"""


def test_the_unit_check_reads_systemctl(tmp_path):
    failed = check_unit(System(path=str(fake_command(tmp_path / "a", "systemctl", SYSTEMCTL_FAILED))))
    assert failed.status == FAIL and "enabled" in failed.summary and "watchdog 1min" in failed.summary
    absent = fake_command(tmp_path / "b", "systemctl", 'echo "LoadState=not-found"\n')
    assert check_unit(System(path=str(absent))).status == SKIP
    assert check_unit(System(path=str(tmp_path / "empty"))).summary.startswith("systemctl not on PATH")


def doctor(*args: str, path: Path | None = None):
    env = {"PATH": f"{path}{os.pathsep}{os.environ['PATH']}"} if path else None
    return CliRunner().invoke(cli, ["doctor", *args], env=env)


def test_this_machine_with_an_installed_store_passes(served_store, tmp_path):
    # A vcgencmd reporting past throttling is a warning: it does not fail the run.
    result = doctor("--store", str(served_store), path=fake_command(tmp_path / "bin", "vcgencmd",
                                                                   'echo "throttled=0x50000"\n'))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "RESULT"] and "0 fail" in lines[-1]
    assert any(line.startswith("warn") and "under-voltage has occurred" in line for line in lines)
    assert any(line.split()[:2] == ["ok", "blobs"] for line in lines)


def test_json_has_one_entry_per_check(served_store):
    result = doctor("--store", str(served_store), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = [c["name"] for c in report["checks"]]
    assert names == ["board", "cpu", "threads", "simd", "memory", "disk", "thermal", "throttling", "jetson", "store",
                     "blobs", "unit"]
    assert {c["status"] for c in report["checks"]} <= {OK, WARN, FAIL, SKIP} and report["status"] != FAIL


def test_a_damaged_blob_is_named_and_fails(served_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(served_store, store, symlinks=True)
    blob = sorted((store / "blobs").iterdir())[-1]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a re-hash finds it
    blob.write_bytes(bytes(data))
    result = doctor("--store", str(store))
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if line.split()[1:2] == ["blobs"])
    assert line.startswith("fail") and blob.name in line


def test_a_missing_blob_fails_the_store_check(served_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(served_store, store, symlinks=True)
    blob = sorted((store / "blobs").iterdir())[0]
    blob.unlink()
    result = doctor("--store", str(store), "--json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert checks["store"]["status"] == FAIL and checks["store"]["details"]["missing"] == [blob.name]


def test_no_store_skips_the_store_checks():
    result = doctor("--json")
    checks = {c["name"]: c["status"] for c in json.loads(result.output)["checks"]}
    assert checks["store"] == checks["blobs"] == checks["disk"] == SKIP
