"""The acceptance of `edgepack wheels`: the Raspberry Pi 5 wheelhouse, cross-built here, installs offline on an
emulated Pi 5 (qemu -cpu cortex-a76, Debian 12's arm64 Python 3.11), installs a bundle built on x86, gives the same
greedy tokens as this machine (Gemma 3 270M) and serves an OpenAI chat request; on an emulated Pi 4 (cortex-a72,
no dotprod) the Pi 5 build dies with SIGILL as soon as llama.cpp loads, and doctor, which probes it in a child
process, says so.

Slow: a cold cross-build of llama.cpp takes about 5 minutes on 2 cores (cached afterwards), and the emulated install
about 2 minutes. Deselect with -m 'not slow'."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from arm64 import arm64_userland, board_env, board_python, run_arm64, run_board
from conftest import build_bundle, post_json, stop_server

from edgepack.packager.demo import free_port, wait_ready
from edgepack.runtime.boards import load_board
from edgepack.runtime.engine import Engine, Generation, Sampling
from edgepack.runtime.store import Store

pytestmark = pytest.mark.slow
PROMPT = ("run", "--raw", "--max-tokens", "12", "the")
GEMMA_PROMPT = "def add(a, b):\n    return"  # x86's narrowest choice in 16 tokens: 0.33 nats
GEMMA_TOKENS = 16
NEAR_TIE = 0.1  # nats between the best two tokens


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    pytest.importorskip("ziglang", reason="edgepack wheels compiles with zig: pip install 'edgepack[host]'")
    out = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "wheels", "--board", "rpi5", "-o", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pi5(wheelhouse, tmp_path_factory) -> Path:
    """A venv on the emulated Pi 5 with the runtime installed from the wheelhouse alone: its python."""
    _, sysroot = arm64_userland()
    venv = tmp_path_factory.mktemp("pi5") / "venv"
    on_pi("cortex-a76", sysroot / "usr/bin/python3.11", "-m", "venv", "--without-pip", venv)
    (pip_wheel,) = (sysroot / "usr/share/python-wheels").glob("pip-*.whl")
    # --isolated: qemu -L falls back to host files, and the host's pip.conf must not add an index.
    on_pi("cortex-a76", venv / "bin/python", pip_wheel / "pip", "install", "--isolated", "--no-index", "--find-links",
          wheelhouse, "--no-compile", "--disable-pip-version-check", "--quiet", "edgepack", timeout=900)
    return board_python(venv)


def on_pi(cpu: str, *argv, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = run_arm64(cpu, list(argv), capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def edgepack_on_pi(cpu: str, python: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = run_board(cpu, python, ["-m", "edgepack.runtime.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def pi_store(pi5, tiny_bundle, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("pi-store")
    edgepack_on_pi("cortex-a76", pi5, "install", tiny_bundle, "--store", store)
    return store


def test_the_wheelhouse_is_a_manylinux_aarch64_build_for_the_pi5_with_its_record(wheelhouse):
    record = json.loads((wheelhouse / "edgepack-wheels.json").read_text())
    (llama,) = wheelhouse.glob("llama_cpp_python-*.whl")
    assert llama.name.endswith(f"-{record['platform']}.whl") and record["platform"].endswith("_aarch64")
    assert record["board"] == "rpi5" and record["python"] == "3.11"
    assert record["llama_cpp"]["cflags"] == "-mcpu=cortex_a76"
    assert {w["file"] for w in record["wheels"]} == {p.name for p in wheelhouse.glob("*.whl")}


@pytest.fixture(scope="module")
def gemma_bundle(gemma_gguf, tmp_path_factory) -> Path:
    return build_bundle(gemma_gguf, tmp_path_factory.mktemp("gemma") / "gemma.edgepack", name="gemma",
                        board=load_board("rpi5"))


def x86_greedy(bundle: Path, store: Path) -> tuple[list[str], list[float]]:
    """This machine's greedy pieces of GEMMA_PROMPT and, at each step, the gap between its best and second-best
    log-probability: where the gap is tiny, another CPU's rounding may rightly pick the other token."""
    Store(store).install(bundle)
    manifest = Store(store).manifest()
    info = manifest.models[0]
    engine = Engine(Store(store).segment_paths(manifest, info.name), name=info.name, n_ctx=256, n_batch=256,
                    threads=2, chat_template=info.chat_template)
    try:
        result = Generation()
        pieces = list(engine.generate(engine.tokenize(GEMMA_PROMPT), Sampling(GEMMA_TOKENS, temperature=0,
                                                                              logprobs=2), result))
    finally:
        engine.close()
    return pieces, [step.top[0][1] - step.top[1][1] for step in result.logprobs]


def test_the_emulated_pi5_gives_this_machines_greedy_tokens(pi5, gemma_bundle, tmp_path):
    """Gemma 3 270M, greedy: the Pi 5's NEON/dotprod kernels and this machine's AVX kernels round differently, so
    the texts must agree up to the first step whose best two tokens are within NEAR_TIE (and that must be late
    enough to have checked something real); without such a step, the whole text."""
    pieces, gaps = x86_greedy(gemma_bundle, tmp_path / "x86-store")
    store = tmp_path / "pi-store"
    edgepack_on_pi("cortex-a76", pi5, "install", gemma_bundle, "--store", store)
    arm = edgepack_on_pi("cortex-a76", pi5, "run", "--raw", "--max-tokens", str(GEMMA_TOKENS), GEMMA_PROMPT,
                         "--store", store)
    decided = next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(pieces))
    assert decided >= 8, f"x86's step {decided} is a near tie ({gaps}): choose another prompt"
    if decided == len(pieces):
        assert arm.stdout == "".join(pieces) + "\n"
    else:
        assert arm.stdout.startswith("".join(pieces[:decided])), (arm.stdout, pieces, gaps)
    assert f"{GEMMA_TOKENS} tokens" in arm.stderr


def test_the_emulated_pi5_serves_an_openai_chat_request(pi5, pi_store):
    port = free_port()
    process = subprocess.Popen(
        [str(pi5), "-m", "edgepack.runtime.cli", "serve", "--store", str(pi_store), "--port", str(port),
         "--threads", "2", "--warmup", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=board_env("cortex-a76"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, timeout=300)
        status, doc = post_json(base + "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
            timeout=300)
        assert status == 200 and doc["usage"]["completion_tokens"] == 4, doc
        assert doc["object"] == "chat.completion"
    finally:
        stop_server(process)


def test_on_an_emulated_pi4_the_pi5_build_dies_with_sigill_and_doctor_says_so(pi5, pi_store):
    doctor = edgepack_on_pi("cortex-a72", pi5, "doctor", "--store", pi_store, "--json", check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.returncode == 1 and checks["simd"]["status"] == "fail", checks["simd"]
    assert "SIGILL" in checks["simd"]["summary"] and "asimddp" not in checks["simd"]["details"]["cpu"]
    on_pi5 = edgepack_on_pi("cortex-a76", pi5, "doctor", "--store", pi_store, "--json", check=False)
    assert {c["name"]: c for c in json.loads(on_pi5.stdout)["checks"]}["simd"]["status"] == "ok"
    died = edgepack_on_pi("cortex-a72", pi5, *PROMPT, "--store", pi_store, check=False)
    assert died.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (died.returncode, died.stderr[-500:])


def test_a_wheelhouse_for_python_310_is_complete_for_a_real_python_310(wheelhouse, tmp_path):
    """pip evaluates requirement markers for the interpreter it runs in, so a 3.11 laptop's resolve would leave out
    what only 3.10 needs (tomli, exceptiongroup); a real 3.10's pip, offline, must find everything."""
    from test_pythons import interpreter

    python310 = interpreter("3.10")
    if python310 is None:
        pytest.skip("no Python 3.10 here (pyenv install 3.10)")
    out = tmp_path / "wh310"
    done = subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "wheels", "--board", "rpi5", "--python",
                           "3.10", "-o", str(out)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    # what a real pip on glibc 2.36 accepts: every manylinux_2_Y up to it, and the legacy alias of 2_17 (protobuf's
    # aarch64 wheels carry only manylinux2014)
    glibc_236 = [arg for minor in range(17, 37) for arg in ("--platform", f"manylinux_2_{minor}_aarch64")]
    glibc_236 += ["--platform", "manylinux2014_aarch64"]
    resolved = subprocess.run(
        [str(python310), "-m", "pip", "download", "--isolated", "--no-index", "--find-links", str(out),
         "--only-binary", ":all:", *glibc_236, "--implementation", "cp", "--abi", "cp310", "-d", str(tmp_path / "got"),
         "edgepack"],
        capture_output=True, text=True, timeout=300)
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    assert {p.name.split("-")[0] for p in out.glob("*.whl")} >= {"tomli", "exceptiongroup", "llama_cpp_python"}
