"""edgepack convert-lora: a PEFT adapter converted by llama.cpp's own script, then loaded and applied by llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

# The converter's own dependencies come with the convert extra (the README's test command installs it); its
# script comes from the llama-cpp-python sdist, which convert-lora fetches with pip on first use.
_CONVERT_EXTRA = "install the convert extra: pip install -e '.[convert]' (torch, transformers, safetensors)"
torch = pytest.importorskip("torch", reason=f"convert-lora needs torch: {_CONVERT_EXTRA}")
pytest.importorskip("transformers", reason=f"convert-lora needs transformers: {_CONVERT_EXTRA}")
pytest.importorskip("safetensors", reason=f"convert-lora needs safetensors: {_CONVERT_EXTRA}")
from safetensors.torch import save_file  # noqa: E402

from edgepack.packager.convert_lora import convert, convert_lora  # noqa: E402
from edgepack.packager.errors import PackagerError  # noqa: E402
from edgepack.runtime.engine import Engine, Generation, Sampling  # noqa: E402

N_LAYER, N_EMBD, RANK = 4, 256, 8
TARGETS = ("q_proj", "v_proj")


def write_hf_base(path: Path, architecture: str = "LlamaForCausalLM") -> Path:
    """The tiny llama of tiny_model.py as a Hugging Face directory: the converter reads only config.json."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": "llama", "hidden_size": N_EMBD, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": N_LAYER, "vocab_size": 320,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    }))
    return path


def write_peft_adapter(path: Path, base: Path) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter as PEFT saves it: q_proj and v_proj of every layer, random non-zero A and B."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM",
    }))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(N_LAYER):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, N_EMBD, generator=generator) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(N_EMBD, RANK, generator=generator) * 0.5
    save_file(tensors, path / "adapter_model.safetensors")
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("convert-lora")
    base = write_hf_base(root / "base")
    tensors = write_peft_adapter(root / "peft", base)
    output = root / "adapter.gguf"
    result = CliRunner().invoke(convert_lora, [str(root / "peft"), "--base", str(base), "-o", str(output)])
    assert result.exit_code == 0, result.output
    return output, result.stdout, tensors


def test_the_command_reports_what_it_wrote(converted):
    output, stdout, _ = converted
    assert stdout.strip().splitlines()[-1].startswith(f"wrote {output}: 16 tensors, rank 8, for llama (f16, ")


def test_the_output_is_a_llama_cpp_lora_adapter(converted):
    output, _, peft = converted
    reader = gguf.GGUFReader(output)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(N_LAYER) for p in "qv" for ab in "ab"}
    assert {t.tensor_type.name for t in tensors.values()} == {"F16"}
    # v_proj needs no reordering (q_proj's rows are permuted for llama.cpp's rope layout): the values carry over
    prefix = "base_model.model.model.layers.2.self_attn.v_proj"
    np.testing.assert_allclose(tensors["blk.2.attn_v.weight.lora_a"].data, peft[f"{prefix}.lora_A.weight"].numpy(),
                               atol=2e-3)
    np.testing.assert_allclose(tensors["blk.2.attn_v.weight.lora_b"].data, peft[f"{prefix}.lora_B.weight"].numpy(),
                               atol=2e-3)


def test_llama_cpp_applies_the_converted_adapter(converted, tiny_gguf):
    output, _, _ = converted
    engine = Engine([tiny_gguf], name="t", n_ctx=128, n_batch=64, threads=1)
    try:
        engine.load_adapter("x", output)

        def answer(lora: tuple[str, float] | None) -> str:
            return "".join(engine.generate(engine.tokenize("the way"), Sampling(16, temperature=0, ignore_eos=True),
                                           Generation(), lora=lora))

        plain = answer(None)
        assert answer(("x", 1.0)) != plain
        assert answer(("x", 0.0)) == plain
    finally:
        engine.close()


def test_a_directory_without_adapter_config_is_refused(tmp_path):
    base = write_hf_base(tmp_path / "base")
    (tmp_path / "peft").mkdir()
    with pytest.raises(PackagerError) as refused:
        convert(tmp_path / "peft", base, tmp_path / "adapter.gguf")
    message = str(refused.value)
    assert "\n" not in message and "adapter_config.json: no such file" in message
    assert not (tmp_path / "adapter.gguf").exists()


def test_a_failure_of_the_script_names_its_last_error_line(tmp_path):
    base = write_hf_base(tmp_path / "base", architecture="NoSuchModelForCausalLM")
    write_peft_adapter(tmp_path / "peft", base)
    with pytest.raises(PackagerError) as refused:
        convert(tmp_path / "peft", base, tmp_path / "adapter.gguf")
    message = str(refused.value)
    assert "\n" not in message and "convert_lora_to_gguf.py failed" in message
    assert "NoSuchModelForCausalLM is not supported" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "peft"]  # no output, no leftovers
