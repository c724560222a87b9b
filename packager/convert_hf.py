"""Hugging Face checkpoints as a build source: a model directory to GGUF by llama.cpp's own convert_hf_to_gguf.py.

The directory is checked first (config.json, a tokenizer, every weight shard its index names), so what cannot
convert is refused in one line before the converter runs. The GGUF is cached under the cache dir by the
checkpoint's content digest: building the same checkpoint again does not convert it again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.runtime.files import sha256_file

from .convert_lora import is_adapter
from .errors import PackagerError
from .llama_source import cache_dir, llama_cpp_version, run_converter

SCRIPT = "convert_hf_to_gguf.py"
# The converter's choice of the highest-fidelity 16-bit type: bf16 for a bf16 checkpoint, else f16 (the reference
# the build evaluates its quantized model against).
OUTTYPE = "auto"
SCRIPT_NEEDS = ("sentencepiece",)  # the converter imports it for Llama and Qwen2 even without a tokenizer.model
TOKENIZERS = ("tokenizer.json", "tokenizer.model")  # a fast tokenizer, or a SentencePiece model
WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")  # what the converter reads (with their *.index.json)
# What the converter reads, hence what the digest covers: not README.md, training state or optimizer files.
MATTERS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
           "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja", *WEIGHTS, "*.index.json")


@dataclass(frozen=True)
class Converted:
    gguf: Path  # in the cache: read it, never change it
    digest: str  # sha256 (hex) over the checkpoint's files that matter
    cached: bool  # found in the cache: no conversion ran
    seconds: float


def check(checkpoint: Path) -> None:
    """Refuse, in one line, a directory that cannot convert for a reason edgepack can see without converting."""
    if not checkpoint.is_dir():
        raise PackagerError(f"{checkpoint}: not a directory (a Hugging Face checkpoint is one)")
    if not any(checkpoint.iterdir()):
        raise PackagerError(f"{checkpoint}: empty directory (a Hugging Face checkpoint holds config.json, its "
                            "tokenizer and model*.safetensors)")
    if is_adapter(checkpoint):
        raise PackagerError(f"{checkpoint}: a PEFT LoRA adapter, not a full model: name it as an adapter over its "
                            "base in a recipe ([adapters.NAME] source = DIR), or use edgepack convert-lora")
    if not (checkpoint / "config.json").is_file():
        raise PackagerError(f"{checkpoint / 'config.json'}: no such file (a Hugging Face checkpoint has "
                            "config.json beside its tokenizer and weights)")
    if not any((checkpoint / name).is_file() for name in TOKENIZERS):
        raise PackagerError(f"{checkpoint}: has no tokenizer ({' or '.join(TOKENIZERS)}): save it beside the "
                            "weights with tokenizer.save_pretrained(DIR)")
    for index in sorted(checkpoint.glob("*.index.json")):
        _check_shards(index)
    if not _files(checkpoint, WEIGHTS):
        raise PackagerError(f"{checkpoint}: has no weights (model.safetensors, or shards named by "
                            "model.safetensors.index.json)")


def converted(checkpoint: Path, step: Callable[[str], None]) -> Converted:
    """The checkpoint's GGUF: from the cache, else converted by llama.cpp's script into the cache."""
    started = time.monotonic()
    check(checkpoint)
    digest = checkpoint_digest(checkpoint)
    folder = cache_dir() / f"hf-gguf-{llama_cpp_version()}"  # another llama.cpp converts differently
    target = folder / f"{digest}.gguf"
    if target.is_file():
        step(f"{checkpoint.name}: converted GGUF from the cache ({target})")
        return Converted(target, digest, True, time.monotonic() - started)
    step(f"{checkpoint.name}: converting with llama.cpp's {SCRIPT} (checkpoint sha256 {digest[:12]})")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        # A fixed name in a private folder: no half file in the cache, ever
        partial = Path(work) / "model.gguf"
        run_converter(SCRIPT, [str(checkpoint), "--outfile", str(partial), "--outtype", OUTTYPE], checkpoint,
                      needs=SCRIPT_NEEDS)
        if not partial.is_file():
            raise PackagerError(f"{checkpoint}: llama.cpp's {SCRIPT} wrote nothing (a sharded output?)")
        partial.replace(target)
    return Converted(target, digest, False, time.monotonic() - started)


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 over the name, size and sha256 of every file that matters, in name order."""
    outer = hashlib.sha256()
    for path in _files(checkpoint, MATTERS):
        outer.update(f"{path.name}\0{path.stat().st_size}\0{sha256_file(path)}\n".encode())
    return outer.hexdigest()


def _files(checkpoint: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in checkpoint.iterdir()
                  if p.is_file() and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns))


def _check_shards(index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise PackagerError(f"{index}: not a shard index (expected JSON with a weight_map of tensor -> file)") \
            from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise PackagerError(f"{index}: weight_map names {shard!r}, expected a file name in the same directory")
        if not (index.parent / shard).is_file():
            raise PackagerError(f"{index}: names shard {shard}, which is missing from {index.parent}")
