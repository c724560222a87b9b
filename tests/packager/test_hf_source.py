"""Hugging Face checkpoints as a build source: tiny random Llama and Qwen2 checkpoints (and a PEFT LoRA over one)
made here by transformers, converted by llama.cpp's own convert_hf_to_gguf.py, built, installed and served."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import gguf
import pytest

_CONVERT_EXTRA = "install the convert extra: pip install -e '.[convert]'"
torch = pytest.importorskip("torch", reason=_CONVERT_EXTRA)
transformers = pytest.importorskip("transformers", reason=_CONVERT_EXTRA)
spm = pytest.importorskip("sentencepiece", reason=_CONVERT_EXTRA)
peft = pytest.importorskip("peft", reason=_CONVERT_EXTRA)

from conftest import post_json, run_cli, serving  # noqa: E402

from edgepack.packager import convert_hf, llama_source  # noqa: E402
from edgepack.packager import recipe as recipe_mod  # noqa: E402
from edgepack.packager.build import BuildOptions, build  # noqa: E402
from edgepack.packager.errors import PackagerError  # noqa: E402
from edgepack.runtime.boards import load_board  # noqa: E402
from edgepack.runtime.engine import Engine  # noqa: E402
from edgepack.runtime.store import Store, bundle_manifest  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A tiny model answers questions about the weather, numbers "
        "0123456789 and plans the steps of a task. Agents call tools, read files and write short answers.\n")
# ChatML, as Qwen2 ships it: llama.cpp's template engine recognises it
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private $EDGEPACK_CACHE (so conversions are counted here) that shares the user cache's copy of llama.cpp's
    converters (fetched from the llama-cpp-python sdist on first use)."""
    converters = llama_source.llama_cpp_files(llama_source.CONVERTER_FILES, check=llama_source.CONVERTER_FILES[0])
    folder = tmp_path_factory.mktemp("cache")
    (folder / converters.name).symlink_to(converters)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEPACK_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A 320-piece SentencePiece BPE model with byte fallback, trained here in milliseconds."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("tokenizer") / "sp.model"
    path.write_bytes(model.getvalue())
    return path


def write_checkpoint(path: Path, sp_model: Path, arch: str = "llama", tokenizer: str = "json",
                     shard: str | None = None, seed: int = 0) -> Path:
    """A tiny random checkpoint as save_pretrained writes it (hidden 64, 2 layers), with its tokenizer: a fast
    tokenizer.json (what the `tokenizers` library runs) or a SentencePiece tokenizer.model, and a chat template."""
    config_class, model_class = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    torch.manual_seed(seed)
    config = config_class(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                          eos_token_id=2, tie_word_embeddings=False)
    model_class(config).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    fast = tokenizer == "json"
    tok = (transformers.LlamaTokenizerFast if fast else transformers.LlamaTokenizer)(vocab_file=str(sp_model))
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    if fast:
        (path / "tokenizer.model").unlink(missing_ok=True)  # the fast path: tokenizer.json alone
        # Llama 2's tokenizer.json normalizer: "▁" before the text (transformers' converter leaves it out here)
        doc = json.loads((path / "tokenizer.json").read_text())
        doc["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "},
                                                        "content": "\u2581"}]}
        (path / "tokenizer.json").write_text(json.dumps(doc))
    return path


def write_peft_lora(path: Path, base: Path) -> None:
    """A PEFT LoRA as PEFT saves it, on q_proj and v_proj, with weights large enough to change greedy answers."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    model.save_pretrained(path)


def build_options(source: Path | None, output: Path, **kwargs) -> BuildOptions:
    return BuildOptions(source=source, output=output, board=load_board("host"), quiet=True, bundle_version=1,
                        quant="Q8_0", threads=2, **kwargs)


def converter_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The scripts llama.cpp's converters are asked to run while the test goes on."""
    runs: list[str] = []
    real = llama_source.run_converter

    def counted(script, *args, **kwargs):  # noqa: ANN001, ANN202 - run_converter's arguments
        runs.append(script)
        return real(script, *args, **kwargs)

    for module in (convert_hf, sys.modules["edgepack.packager.convert_lora"]):
        monkeypatch.setattr(module, "run_converter", counted)
    return runs


# ---- a checkpoint end to end, by the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sp_model) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama", sp_model, "llama", "json")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, llama_dir) -> Path:
    path = tmp_path_factory.mktemp("peft") / "lora"
    write_peft_lora(path, llama_dir)
    return path


@pytest.fixture(scope="module")
def cli_built(llama_dir, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny-llama.edgepack"
    done = run_cli("build", str(llama_dir), "-o", str(out), "--quant", "Q8_0", "--threads", "2",
                   "--bundle-version", "1")
    assert done.returncode == 0, done.stderr
    return out, done


def test_a_checkpoint_directory_builds_by_the_command_line(cli_built, llama_dir):
    out, done = cli_built
    assert "converting with llama.cpp's convert_hf_to_gguf.py" in done.stderr
    assert "chat template: the model's own" in done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(f"wrote {out} (tiny-llama, board host)")
    info = bundle_manifest(out).models[0]
    assert (info.name, info.architecture, info.file_type) == ("tiny-llama", "llama", "Q8_0")
    assert info.source["checkpoint"] == "tiny-llama"
    assert info.source["checkpoint_sha256"] == convert_hf.checkpoint_digest(llama_dir)
    assert info.source["file_type"] == "F16"  # the converted reference the build measured against
    assert info.quality["top1_agreement"] > 0.9


def test_the_bundle_keeps_the_tokenizer_and_chat_template_and_answers(cli_built, llama_dir, tmp_path):
    out, _ = cli_built
    store = tmp_path / "store"
    assert run_cli("install", str(out), "--store", str(store)).returncode == 0
    manifest = Store(store).manifest()
    paths = Store(store).segment_paths(manifest, "tiny-llama")
    reader = gguf.GGUFReader(paths[0])
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    engine = Engine(paths, name="tiny-llama", n_ctx=128, n_batch=64, threads=1)
    try:
        for text in ("The quick brown fox plans a task.", "numbers 42 and émigré ✓"):
            assert engine.tokenize(text) == hf(text).input_ids
    finally:
        engine.close()
    ran = run_cli("run", "--store", str(store), "--max-tokens", "4", "Plan the steps")
    assert ran.returncode == 0, ran.stderr
    assert "tokens" in ran.stderr
    with serving(store, "--threads", "1") as base:
        status, answer = post_json(f"{base}/v1/chat/completions", {
            "model": "tiny-llama", "messages": [{"role": "user", "content": "Plan the steps"}], "max_tokens": 4,
            "temperature": 0})
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] >= 1


def test_a_second_build_of_the_same_checkpoint_uses_the_cache(cli_built, llama_dir, cache, tmp_path, monkeypatch):
    cached = sorted((cache / f"hf-gguf-{llama_source.llama_cpp_version()}").iterdir())
    assert [p.name for p in cached] == [f"{convert_hf.checkpoint_digest(llama_dir)}.gguf"]
    done = run_cli("build", str(llama_dir), "-o", str(tmp_path / "again.edgepack"), "--quant", "Q8_0",
                   "--bundle-version", "1")
    assert done.returncode == 0, done.stderr
    assert "converted GGUF from the cache" in done.stderr and "converting" not in done.stderr
    runs = converter_runs(monkeypatch)
    build(build_options(llama_dir, tmp_path / "third.edgepack"))
    assert runs == []
    assert bundle_manifest(tmp_path / "third.edgepack").blobs == bundle_manifest(cli_built[0]).blobs


def test_eval_measures_a_bundle_against_its_checkpoint(cli_built, llama_dir):
    done = run_cli("eval", str(llama_dir), str(cli_built[0]), "--json", "--chunks", "1", "--ctx", "64")
    assert done.returncode == 0, done.stderr
    assert "converted GGUF from the cache" in done.stderr
    assert json.loads(done.stdout)["top1_agreement"] > 0.9


def test_the_digest_covers_what_the_converter_reads(llama_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    digest = convert_hf.checkpoint_digest(copy)
    assert digest == convert_hf.checkpoint_digest(llama_dir)  # by content, not by path
    (copy / "README.md").write_text("trained with TRL")
    (copy / "training_args.bin").write_bytes(b"\0" * 64)
    assert convert_hf.checkpoint_digest(copy) == digest
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert convert_hf.checkpoint_digest(copy) != digest


# ---- a recipe: two checkpoints and a PEFT LoRA over one ------------------------------------------------------

def test_a_recipe_of_checkpoints_and_a_peft_lora_is_served(llama_dir, lora_dir, sp_model, cache, tmp_path,
                                                          monkeypatch):
    write_checkpoint(tmp_path / "qwen", sp_model, "qwen2", "model", seed=1)  # a SentencePiece tokenizer.model
    (tmp_path / "edgepack.toml").write_text(f'''
[models.llama]
source = "{llama_dir}"
[models.qwen]
source = "qwen"
[adapters.tuned]
source = "{lora_dir}"
base = "llama"
[agents.plain]
model = "llama"
[agents.tuned]
model = "llama"
adapter = "tuned"
[agents.qwen]
model = "qwen"
''')
    runs = converter_runs(monkeypatch)
    out = tmp_path / "agents.edgepack"
    build(build_options(None, out, recipe=recipe_mod.load(tmp_path / "edgepack.toml")))
    # the Llama checkpoint converted before is in the cache: only Qwen's and the adapter's conversions ran
    assert runs == ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py"]
    manifest = bundle_manifest(out)
    assert [(m.name, m.architecture) for m in manifest.models] == [("llama", "llama"), ("qwen", "qwen2")]
    assert [(a.name, a.base) for a in manifest.adapters] == [("tuned", "llama")]
    Store(tmp_path / "store").install(out)
    answers = {}
    with serving(tmp_path / "store", "--threads", "1") as base:
        for agent in ("plain", "tuned", "qwen"):
            status, answer = post_json(f"{base}/v1/chat/completions", {
                "model": agent, "messages": [{"role": "user", "content": "Plan the steps of a task"}],
                "max_tokens": 8, "temperature": 0})
            assert status == 200, answer
            answers[agent] = answer["choices"][0]["message"]["content"]
    assert answers["tuned"] != answers["plain"]  # the adapter is applied


def test_a_peft_adapter_over_a_gguf_base_names_the_way(lora_dir, tmp_path, tiny_gguf):
    (tmp_path / "edgepack.toml").write_text(f'''
[models.base]
source = "{tiny_gguf}"
[adapters.tuned]
source = "{lora_dir}"
base = "base"
''')
    with pytest.raises(PackagerError) as refused:
        build(build_options(None, tmp_path / "x.edgepack", recipe=recipe_mod.load(tmp_path / "edgepack.toml")))
    assert "adapters.tuned: a PEFT directory needs its base 'base' built from its Hugging Face checkpoint" in \
        str(refused.value)
    assert "edgepack convert-lora" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgepack.toml"]


# ---- refusals: one line, exit 1, nothing written -------------------------------------------------------------

def _refused(source: Path, out_dir: Path) -> str:
    with pytest.raises(PackagerError) as refused:
        build(build_options(source, out_dir / "x.edgepack"))
    message = str(refused.value)
    assert "\n" not in message
    assert not any(p.name == "x.edgepack" or p.name.startswith("edgepack-build-") for p in out_dir.iterdir())
    return message


def test_an_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _refused(tmp_path / "empty", tmp_path) == (
        f"{tmp_path / 'empty'}: empty directory (a Hugging Face checkpoint holds config.json, its tokenizer and "
        "model*.safetensors)")


def test_a_checkpoint_without_config_json_is_refused(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    assert _refused(tmp_path / "ckpt", tmp_path).startswith(f"{tmp_path / 'ckpt' / 'config.json'}: no such file")


def test_a_checkpoint_without_a_tokenizer_is_refused(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    assert _refused(tmp_path / "ckpt", tmp_path) == (
        f"{tmp_path / 'ckpt'}: has no tokenizer (tokenizer.json or tokenizer.model): save it beside the weights "
        "with tokenizer.save_pretrained(DIR)")


def test_a_sharded_checkpoint_with_a_missing_shard_is_refused(sp_model, tmp_path):
    write_checkpoint(tmp_path / "ckpt", sp_model, shard="100KB")
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    convert_hf.check(tmp_path / "ckpt")  # complete: accepted
    shards[1].unlink()
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    assert _refused(tmp_path / "ckpt", tmp_path) == (
        f"{index}: names shard {shards[1].name}, which is missing from {tmp_path / 'ckpt'}")


def test_a_peft_directory_as_the_model_is_refused(lora_dir, tmp_path):
    assert "a PEFT LoRA adapter, not a full model" in _refused(lora_dir, tmp_path)


def test_an_architecture_llama_cpp_cannot_convert_is_the_converters_refusal(llama_dir, cache, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    before = sorted(cache.rglob("*"))
    done = run_cli("build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "x.edgepack"), "-q")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.strip().endswith(f"{tmp_path / 'ckpt'}: llama.cpp's convert_hf_to_gguf.py failed: "
                                        "Model NoSuchForCausalLM is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(cache.rglob("*")) == before  # no half conversion in the cache


def test_a_tokenizer_llama_cpp_does_not_know_is_the_converters_refusal(llama_dir, cache, tmp_path):
    """A byte-level BPE tokenizer whose pre-tokenizer no model llama.cpp knows has: its converter says so."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shutil.copytree(llama_dir, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "ckpt" / name).unlink()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(TEXT.splitlines(), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path / "ckpt")
    message = _refused(tmp_path / "ckpt", tmp_path)
    assert message.startswith(f"{tmp_path / 'ckpt'}: llama.cpp's convert_hf_to_gguf.py failed: ")
    assert message.endswith("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
