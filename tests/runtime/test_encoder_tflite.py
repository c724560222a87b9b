"""The runtime's TFLite encoder (runtime/encoder_tflite.py) and the choice between it and ONNX Runtime, on a tiny
encoder written as a real .tflite (tests/encoder_bundle.py) and run by ai-edge-litert's interpreter: batching over
the file's signatures, the pool's loading and hash check, /v1/embeddings through `edgepack serve --embed-runtime`."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgepack.runtime.bundle_format import EncoderInfo
from edgepack.runtime.encoder import choose_runtime, encoder_blobs, open_encoder
from edgepack.runtime.encoder_tflite import TFLiteEncoder
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.store import Store, bundle_manifest
from tests.conftest import post_json, serving, start_server, stop_server, wait_ready
from tests.encoder_bundle import tiny_encoder_bundle, tiny_reference, tiny_table, tiny_tflite

pytest.importorskip("ai_edge_litert.interpreter", reason="needs ai-edge-litert (pip install 'edgepack[test]')")

TEXTS = ["the cat sat on the mat", "a dog", "paris is the capital of france", "reset the router",
         "the dog sat", "cat", "the capital of france is paris and the cat sat on the mat"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Installed stores of the tiny encoder: .tflite only, ONNX only, both."""
    out = {}
    for key, runtimes in {"tflite": ("tflite",), "onnx": ("onnx",), "both": ("onnx", "tflite")}.items():
        bundle = tiny_encoder_bundle(tmp_path_factory.mktemp(f"bundle-{key}"), runtimes=runtimes)
        out[key] = tmp_path_factory.mktemp(f"store-{key}")
        Store(out[key]).install(bundle)
    return out


def loaded(store: Path, runtime: str = "tflite") -> TFLiteEncoder:
    info = Store(store).manifest().encoders[0]
    return open_encoder(info, runtime, Store(store).blob_path, threads=2)


def tokenizer(store: Path):  # noqa: ANN201 - a tokenizers.Tokenizer
    from tokenizers import Tokenizer

    info = Store(store).manifest().encoders[0]
    return Tokenizer.from_file(str(Store(store).blob_path(info.tokenizer)))


def test_embeds_each_text_as_the_graph_computes_in_order_across_signatures(stores: dict[str, Path]) -> None:
    """Seven texts of mixed lengths: one batch-4 signature, three batch-1 runs; every row lands in its place."""
    encoder = loaded(stores["tflite"])
    vectors, tokens = encoder.embed(TEXTS)
    ids = [e.ids for e in tokenizer(stores["tflite"]).encode_batch(TEXTS)]
    expected = np.stack([tiny_reference(tiny_table(), i) for i in ids])
    assert vectors.shape == (7, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert tokens == sum(map(len, ids))
    assert (encoder.dimensions, encoder.vocab_size) == (8, 18)


def test_token_ids_embed_as_their_text_and_long_inputs_are_cut(stores: dict[str, Path]) -> None:
    encoder = loaded(stores["tflite"])
    ids = tokenizer(stores["tflite"]).encode("the cat sat", add_special_tokens=False).ids
    np.testing.assert_allclose(encoder.embed(["the cat sat"])[0], encoder.embed([ids])[0], atol=1e-6)
    long = " ".join(["cat"] * 40)
    _, tokens = encoder.embed([long])
    assert tokens == 16  # max_tokens, [CLS] and [SEP] included
    with pytest.raises(EdgepackError, match="token 99 is not in the vocabulary of 18 tokens"):
        encoder.embed([[99]])


def test_both_runtimes_give_the_same_embeddings(stores: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    tflite, _ = loaded(stores["both"], "tflite").embed(TEXTS)
    onnx, _ = loaded(stores["both"], "onnx").embed(TEXTS)
    np.testing.assert_allclose(tflite, onnx, atol=1e-5)


def test_a_file_without_the_packagers_signatures_is_one_line(tmp_path: Path, stores: dict[str, Path]) -> None:
    info = Store(stores["tflite"]).manifest().encoders[0]
    tokenizer_path = Store(stores["tflite"]).blob_path(info.tokenizer)
    no_single = tiny_tflite(tmp_path / "x.tflite", tiny_table(), [(4, 8), (4, 16)])
    with pytest.raises(EdgepackError, match=r"expected one of batch 1"):
        TFLiteEncoder(info, no_single, tokenizer_path, threads=1)
    short = tiny_tflite(tmp_path / "y.tflite", tiny_table(), [(1, 8)])
    with pytest.raises(EdgepackError, match="takes at most 8 tokens, its manifest says max_tokens 16"):
        TFLiteEncoder(info, short, tokenizer_path, threads=1)
    (tmp_path / "z.tflite").write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(EdgepackError, match="the TFLite interpreter could not load encoder 'tiny'"):
        TFLiteEncoder(info, tmp_path / "z.tflite", tokenizer_path, threads=1)


# ---- the choice ----

def info_of(stores: dict[str, Path], key: str, **changes: object) -> EncoderInfo:
    info = Store(stores[key]).manifest().encoders[0]
    return msgspec.structs.replace(info, **changes)


def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)


def test_the_preferred_runtime_when_the_encoder_has_it(stores: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    both = info_of(stores, "both")
    assert choose_runtime(both, "tflite").runtime == "tflite" and choose_runtime(both, "tflite").note is None
    assert choose_runtime(both, "onnx").runtime == "onnx"
    assert encoder_blobs(both, "tflite") == [both.tflite.digest, both.tokenizer]
    assert encoder_blobs(both, "onnx") == [both.graph, both.tokenizer]


def test_an_encoder_with_one_runtime_runs_on_that_one_and_says_so(stores: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    choice = choose_runtime(info_of(stores, "onnx"), "tflite")
    assert choice.runtime == "onnx" and choice.note == "encoder tiny has no .tflite file: running its ONNX graph"
    assert choose_runtime(info_of(stores, "tflite"), "onnx").runtime == "tflite"


def test_a_missing_interpreter_falls_back_to_onnx(stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    no_interpreter(monkeypatch)
    choice = choose_runtime(info_of(stores, "both"), "tflite")
    assert choice.runtime == "onnx" and "pip install ai-edge-litert" in choice.note
    assert choice.note.endswith("running its ONNX graph instead")


def test_neither_runtime_here_is_one_line(stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    no_interpreter(monkeypatch)
    with pytest.raises(EdgepackError, match=r"encoder 'tiny' has only an \.tflite file: TFLite encoders need a "
                                            r"TFLite interpreter: pip install ai-edge-litert"):
        choose_runtime(info_of(stores, "tflite"), "tflite")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EdgepackError, match=r"encoder 'tiny' cannot run here: .*ai-edge-litert.*'onnxruntime'"):
        choose_runtime(info_of(stores, "both"), "tflite")
    with pytest.raises(EdgepackError, match=r"encoder 'tiny' has only an ONNX graph: .*'onnxruntime' package"):
        choose_runtime(info_of(stores, "onnx"), "tflite")


def test_an_int8_file_is_refused_on_tflite_runtime(stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """tflite-runtime 2.14 runs the per-channel dynamic-range int8 file and answers wrongly (docs/tflite.md)."""
    import types

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    int8 = info_of(stores, "tflite")
    int8 = msgspec.structs.replace(int8, tflite=msgspec.structs.replace(int8.tflite, quant="int8"))
    with pytest.raises(EdgepackError, match=r"int8 \.tflite needs ai-edge-litert>=2.3 \(tflite-runtime computes it "
                                            r"wrongly\)"):
        choose_runtime(int8, "tflite")


# ---- served ----

def test_serve_embeds_with_the_tflite_file_in_the_budget(stores: dict[str, Path]) -> None:
    with serving(stores["both"], "--threads", "2", "--embed-runtime", "tflite") as base:
        code, doc = post_json(f"{base}/v1/embeddings", {"model": "tiny", "input": TEXTS})
        status = post_json(f"{base}/v1/embeddings", {"input": "a dog", "dimensions": 8})[0]
    assert code == 200 and status == 200, doc
    ids = [e.ids for e in tokenizer(stores["both"]).encode_batch(TEXTS)]
    expected = np.stack([tiny_reference(tiny_table(), i) for i in ids])
    np.testing.assert_allclose(np.array([d["embedding"] for d in doc["data"]]), expected, atol=1e-5)
    assert doc["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_serve_logs_the_runtime_it_chose(stores: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    process, base = start_server(stores["onnx"], "--threads", "2", "--embed-runtime", "tflite")
    try:
        wait_ready(base, process)
        code, doc = post_json(f"{base}/v1/embeddings", {"input": TEXTS})
    finally:
        stop_server(process)
    log = process.stderr.read()
    assert code == 200, doc
    assert "encoder tiny has no .tflite file: running its ONNX graph" in log
    assert "loaded encoder tiny (onnx)" in log


def test_a_damaged_tflite_blob_is_refused_before_the_interpreter_reads_it(tmp_path: Path) -> None:
    bundle = tiny_encoder_bundle(tmp_path / "bundle", runtimes=("tflite",))
    store = Store(tmp_path / "store")
    store.install(bundle)
    blob = store.blob_path(bundle_manifest(bundle).encoders[0].tflite.digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the weights: the interpreter would load it and answer wrongly
    blob.write_bytes(bytes(data))
    process, base = start_server(tmp_path / "store", "--threads", "2")
    try:
        wait_ready(base, process)
        code, doc = post_json(f"{base}/v1/embeddings", {"input": "a dog"})
    finally:
        stop_server(process)
    assert code == 503 and "is damaged on disk" in doc["error"]["message"], doc
    assert "loaded encoder" not in process.stderr.read()
