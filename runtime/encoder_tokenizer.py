"""What both encoder runtimes share (runtime/encoder.py: ONNX Runtime, runtime/encoder_tflite.py: TFLite): the
graph's input and output names, the lazy import of an optional package, and the tokenizer side. A leaf module, so
neither runtime imports the other to get them."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from .bundle_format import EncoderInfo
from .errors import EdgepackError

INPUTS = ("input_ids", "attention_mask")  # the graph's inputs, int64 [batch, tokens] (int32 in a .tflite)
OUTPUT = "embeddings"  # its output, float32 [batch, dimensions], pooled (and normalised if the manifest says so)


def require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise EdgepackError(f"encoders need the {name!r} package ({exc}); install edgepack with its runtime "
                            f"dependencies (pip install edgepack) on this device") from None


class EncoderTokenizer:
    """The encoder's tokenizer.json as both runtimes read it: texts and token-id inputs framed alike, cut to
    max_tokens. Its encode is safe to call from several threads."""

    def __init__(self, info: EncoderInfo, tokenizer: Path) -> None:
        tokenizers = require("tokenizers")
        self.max_tokens = info.max_tokens
        self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=info.max_tokens)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._head, self._tail = _special_tokens(self._tokenizer)
        padding = self._tokenizer.token_to_id("[PAD]")
        self.pad = 0 if padding is None else padding

    def tokens(self, item: str | list[int]) -> list[int]:
        """What the graph reads for one input: a text's tokens with the tokenizer's special tokens, or given token
        ids (without special tokens) inside the same; cut to max_tokens, keeping the beginning as the tokenizer
        does."""
        if isinstance(item, str):
            return self._tokenizer.encode(item).ids
        bad = [t for t in item if not 0 <= t < self.vocab_size]
        if bad:
            raise EdgepackError(f"token {bad[0]} is not in the vocabulary of {self.vocab_size} tokens")
        room = self.max_tokens - len(self._head) - len(self._tail)
        return self._head + list(item[:room]) + self._tail


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's post-processor puts before and after a text (BERT: [CLS], [SEP]), read
    from the encoding of a one-token text, so token-id inputs get the same frame as texts."""
    encoding = tokenizer.encode("a")
    body = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    if len(body) != 1:
        raise EdgepackError("the encoder's tokenizer does not frame a text with special tokens as expected")
    return encoding.ids[:body[0]], encoding.ids[body[0] + 1:]
