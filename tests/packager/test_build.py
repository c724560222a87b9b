"""edgepack build: quantization by llama.cpp, deterministic GGUF split segments, choices and refusals."""

from __future__ import annotations

import json
import tarfile

import pytest
from conftest import build_bundle, run_cli
from tiny_model import write_tiny_llama

from edgepack.packager import gguf_info, segment
from edgepack.packager.errors import PackagerError
from edgepack.runtime.bundle_format import Manifest
from edgepack.runtime.engine import Engine, Generation, Sampling


def manifest_of(bundle) -> Manifest:
    with tarfile.open(bundle) as archive:
        return Manifest.from_json(archive.extractfile("manifest.json").read())


def test_build_quantizes_and_records_the_model(tiny_bundle, tiny_gguf):
    manifest = manifest_of(tiny_bundle)
    model = manifest.models[0]
    assert model.file_type == "Q8_0"
    assert model.quant_types.get("Q8_0", 0) > 0 and "F32" in model.quant_types  # norms stay f32
    assert model.architecture == "llama" and model.parameters == gguf_info.read(tiny_gguf).parameters
    assert model.chat_template == "llama3"  # the tiny model has none: llama.cpp's built-in for llama
    assert manifest.llama_cpp_version.startswith("llama.cpp")
    # metadata split, one per 4 blocks (4 blocks), then output, output_norm, token_embd
    assert len(model.segments) == 1 + 1 + 3
    assert set(model.segments) == set(manifest.blobs)
    assert all(b.zsize > 0 and b.size > 0 for b in manifest.blobs.values())


def test_segments_are_valid_gguf_splits_that_llama_cpp_loads(tiny_gguf, tmp_path):
    info = gguf_info.read(tiny_gguf)
    segments = segment.write_segments(info, tmp_path, blocks_per_segment=2)
    assert [s.label for s in segments] == ["metadata", "blk.0-1", "blk.2-3", "output", "output_norm", "token_embd"]
    assert segments[0].tensors == 0
    first = gguf_info.read(segments[0].path)
    assert first.kv_count == info.kv_count + 3 and not first.tensors
    # Greedy generation from the splits equals generation from the original file.
    prompt_text = "the time was hot and"
    outputs = []
    for paths in ([tiny_gguf], [s.path for s in segments]):
        engine = Engine(paths, name="t", n_ctx=128, n_batch=32, threads=2)
        try:
            outputs.append("".join(engine.generate(engine.tokenize(prompt_text), Sampling(16, temperature=0),
                                                   Generation())))
        finally:
            engine.close()
    assert outputs[0] == outputs[1] and outputs[0]


def test_layout_is_deterministic_and_shared_tensors_give_identical_segments(tmp_path):
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=1, name="another name")  # same tensors, other metadata
    c = write_tiny_llama(tmp_path / "c.gguf", seed=2)
    digests = {}
    for path in (a, b, c):
        out = tmp_path / path.stem
        out.mkdir()
        digests[path.stem] = [s.digest for s in segment.write_segments(gguf_info.read(path), out, 2)]
    again = tmp_path / "again"
    again.mkdir()
    assert digests["a"] == [s.digest for s in segment.write_segments(gguf_info.read(a), again, 2)]
    assert digests["a"][0] != digests["b"][0]  # metadata differs
    assert digests["a"][1:] == digests["b"][1:]  # every tensor segment is byte-identical
    # Another seed: same metadata and all-ones output_norm (shared), other random weights.
    assert [x == y for x, y in zip(digests["a"], digests["c"], strict=True)] == [True, False, False, False, True, False]


def test_keep_on_quantized_source_and_requantize_needs_a_flag(tiny_gguf, tmp_path):
    q8 = build_bundle(tiny_gguf, tmp_path / "q8.edgepack", quant="Q8_0")
    # Extract the quantized model back into one GGUF by quantizing directly, as a user's source would be.
    from edgepack.packager import quant_types, quantize

    source = tmp_path / "tiny-q8.gguf"
    quantize.quantize(tiny_gguf, source, quant_types.parse("Q8_0"))
    kept = manifest_of(build_bundle(source, tmp_path / "kept.edgepack"))
    assert kept.models[0].file_type == "Q8_0"
    assert kept.models[0].segments[1:] == manifest_of(q8).models[0].segments[1:]
    with pytest.raises(PackagerError, match="--allow-requantize"):
        build_bundle(source, tmp_path / "q4.edgepack", quant="Q4_0")
    requantized = manifest_of(build_bundle(source, tmp_path / "q4.edgepack", quant="Q4_0", allow_requantize=True))
    assert requantized.models[0].file_type == "Q4_0"
    # Asking for a type above the source's keeps the source (no point inflating it).
    assert manifest_of(build_bundle(source, tmp_path / "f16.edgepack", quant="F16")).models[0].file_type == "Q8_0"


def test_embedded_chat_template_is_left_to_the_model(tmp_path):
    source = write_tiny_llama(tmp_path / "t.gguf", chat_template="{% for m in messages %}<|im_start|>{% endfor %}")
    assert manifest_of(build_bundle(source, tmp_path / "t.edgepack")).models[0].chat_template is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.gguf"], "no such file"),
        (["{junk}"], "not a readable GGUF file"),
        (["{src}", "--quant", "Q9_X"], "unknown quant type 'Q9_X'"),
        (["{src}", "--board", "toaster"], "unknown board 'toaster'"),
        (["{src}", "--chat-template", "nope"], "unknown chat template 'nope'"),
        (["{src}", "--name", "../etc"], "not a valid name"),
    ],
)
def test_build_errors_are_one_line_and_write_nothing(args, message, tiny_gguf, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 100)
    out = tmp_path / "out.edgepack"
    argv = [a.format(src=tiny_gguf, junk=junk) for a in args]
    result = run_cli("build", *argv, "-o", str(out), "-q")
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob("edgepack-build-*"))


def test_build_cli_prints_a_summary_and_inspect_reads_both_kinds(tiny_gguf, tmp_path):
    out = tmp_path / "t.edgepack"
    result = run_cli("build", str(tiny_gguf), "-o", str(out), "--board", "rpi4")
    assert result.returncode == 0, result.stderr
    assert "BITS/WEIGHT" in result.stdout and "Q4_0" in result.stdout  # rpi4's default type
    doc = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert doc["board"] == "rpi4" and doc["models"][0]["file_type"] == "Q4_0"
    assert doc["runtime"]["threads"] == 4 and doc["runtime"]["n_ctx"] == 512  # capped at the model's context
    gguf_doc = json.loads(run_cli("inspect", str(tiny_gguf), "--json").stdout)
    assert gguf_doc["architecture"] == "llama" and gguf_doc["file_type"] == "F32" and gguf_doc["blocks"] == 4
    table = run_cli("inspect", str(out))
    assert table.returncode == 0 and "tiny" in table.stdout and "SEGMENTS" in table.stdout


def test_boards_lists_profiles(tmp_path):
    result = run_cli("boards", "--json")
    boards = {b["name"]: b for b in json.loads(result.stdout)}
    assert {"rpi4", "rpi5", "jetson-orin-nano", "x86-laptop", "host"} <= set(boards)
    assert boards["x86-laptop"]["cores"][1]["kind"] == "efficiency"
    assert "neon" in boards["rpi5"]["simd"]
    assert "rpi5" in run_cli("boards").stdout
