"""Board profiles: what a runtime build targets agrees with what the board's CPU offers."""

from __future__ import annotations

import pytest

from edgepack.runtime.boards import list_boards

BOARDS = {b.name: b for b in list_boards()}


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_the_build_uses_exactly_the_arm_extensions_the_cpu_has(name):
    board = BOARDS[name]
    assert board.build is not None and board.build.target.startswith(board.arch)
    if board.arch != "aarch64":
        return
    extensions = set(board.build.march.split("+")[1:])
    assert extensions == {s for s in board.simd if s in ("dotprod", "fp16", "i8mm", "sve")}, board.build.march
    assert board.build.mtune == board.cores[0].model.lower()


def test_each_board_names_its_os_python_and_glibc():
    assert {n: (b.build.python, b.build.glibc) for n, b in BOARDS.items() if n != "x86-laptop"} == {
        "rpi4": ("3.11", "2.36"), "rpi5": ("3.11", "2.36"), "jetson-orin-nano": ("3.10", "2.35")}
    assert BOARDS["jetson-orin-nano"].build.cuda_architectures == "87"
