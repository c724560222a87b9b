"""A tiny random llama written with the gguf writer: a valid model llama.cpp loads in milliseconds.

Dimensions are multiples of 256 so every llama.cpp quant type (K-quants included) applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

WORDS = [
    "the", "a", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
    "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "hot", "word", "but",
    "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how",
    "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then",
    "them", "write",
]


def vocab() -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["\u2581" + w for w in WORDS]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * len(WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(WORDS))]
    return tokens, scores, [int(t) for t in types]


@dataclass(frozen=True)
class TinyTokenizer:
    """A tokenizer for write_tiny_llama: SentencePiece-style ("llama": scores) or BPE ("gpt2": merges)."""

    kind: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos: int = 1
    eos: int = 2
    unk: int | None = 0


def write_tiny_llama(
    path: Path,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 4,
    seed: int = 0,
    chat_template: str | None = None,
    name: str = "tiny-llama",
    changed_blocks: set[int] | frozenset[int] = frozenset(),
    changed_seed: int = 1000,
    tokenizer: TinyTokenizer | None = None,
    tied: bool = False,
) -> Path:
    """`changed_blocks` get weights from another random stream (changed_seed): a fine-tune of those blocks.
    tokenizer: the SentencePiece vocab() unless given; tied: no output.weight (the embedding is the output)."""
    rng = np.random.default_rng(seed)
    other = np.random.default_rng(changed_seed)
    if tokenizer is None:
        tokens, scores, types = vocab()
        tokenizer = TinyTokenizer("llama", tokens, types, scores)
    n_vocab = len(tokenizer.tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    if name:
        writer.add_name(name)
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(tokenizer.kind)
    writer.add_token_list(tokenizer.tokens)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(tokenizer.types)
    if tokenizer.merges is not None:
        writer.add_token_merges(tokenizer.merges)
    writer.add_bos_token_id(tokenizer.bos)
    writer.add_eos_token_id(tokenizer.eos)
    if tokenizer.unk is not None:
        writer.add_unk_token_id(tokenizer.unk)
    if chat_template:
        writer.add_chat_template(chat_template)

    def weight(*shape: int, changed: bool = False) -> np.ndarray:
        values = (rng.standard_normal(shape) * 0.08).astype(np.float32)  # always drawn: blocks stay aligned
        return (other.standard_normal(shape) * 0.08).astype(np.float32) if changed else values

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", norm())
    if not tied:
        writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        changed = i in changed_blocks
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for part in ("q", "k", "v", "output"):
            writer.add_tensor(f"blk.{i}.attn_{part}.weight", weight(n_embd, n_embd, changed=changed))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd, changed=changed))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd, changed=changed))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff, changed=changed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_lora(path: Path, *, n_embd: int = 256, n_layer: int = 4, rank: int = 8, seed: int = 1,
                    alpha: float = 16.0) -> Path:
    """A LoRA adapter for the tiny llama: attn_q and attn_v of every block."""
    targets = [(f"blk.{i}.attn_{part}.weight", n_embd, n_embd) for i in range(n_layer) for part in ("q", "v")]
    return write_lora(path, "llama", targets, rank=rank, alpha=alpha, scale=0.5, seed=seed)


def write_lora(path: Path, arch: str, targets: Iterable[tuple[str, int, int]], *, rank: int, alpha: float,
               scale: float, seed: int) -> Path:
    """A random LoRA adapter GGUF on `targets` (weight name, inputs, outputs), in llama.cpp's layout
    (lora_a: ne = [n_in, rank], lora_b: ne = [rank, n_out]); bench/bench_memory.py writes its adapters with it."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, n_in, n_out in targets:
        writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
