"""Vocabulary trimming: keep the tokens an agent uses, rewrite the tokenizer and the embedding/output rows.

Kept: every token that is not a plain piece (control, user-defined, unknown, byte fallback), every id a special-token
key names, the given tokens together with the pieces the tokenizer merges them from (without those it could never
produce them), then, up to the requested size, the tokenizer's own merge order (its learned frequency ranks) among
pieces written in the characters of the agent's text. Written with gguf-py; llama.cpp loads the result unchanged.
"""

from __future__ import annotations

import ctypes
import heapq
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from edgepack.runtime import llama

from .errors import PackagerError
from .forward import token_piece

SPM, BPE = "llama", "gpt2"  # tokenizer.ggml.model values: SentencePiece-style (Gemma, Llama 2), byte-level BPE
_KIND_NAMES = {SPM: "SentencePiece", BPE: "BPE"}
_VOCAB_TENSORS = ("token_embd.weight", "output.weight")  # rows indexed by token id
_TOKENIZER_ARRAYS = {gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.SCORES, gguf.Keys.Tokenizer.TOKEN_TYPE,
                     gguf.Keys.Tokenizer.MERGES}
NORMAL = int(gguf.TokenType.NORMAL)
_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class Request:
    """A parsed `--vocab`: 'auto', a kept-vocabulary size, or a file of token ids to keep."""

    auto: bool = False
    size: int | None = None
    file: Path | None = None

    def __str__(self) -> str:
        return "auto" if self.auto else str(self.size) if self.size is not None else str(self.file)


def parse_request(text: str, where: str = "--vocab", base: Path | None = None) -> Request:
    """'auto', a count ('32768', '32k' = 32,768) or an existing file of token ids (relative to `base`); anything
    else is refused, the error naming `where` the value came from."""
    value = text.strip()
    if value.lower() == "auto":
        return Request(auto=True)
    match = re.fullmatch(r"(\d+)([kK]?)", value)
    if match:
        size = int(match[1]) * (1024 if match[2] else 1)
        if size < 1:
            raise PackagerError(f"{where} {text}: a vocabulary needs at least one token")
        return Request(size=size)
    path = Path(value) if base is None or Path(value).is_absolute() else base / value
    if not path.is_file():
        raise PackagerError(f"{where} {text!r}: expected 'auto', a token count (32768, 32k) or a file of token ids; "
                            f"{path} is not a file")
    return Request(file=path)


def read_id_file(path: Path, n_vocab: int) -> set[int]:
    """Token ids, one per line ('#' starts a comment), each below the model's vocabulary size."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackagerError(f"--vocab {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    ids = set()
    for number, line in enumerate(lines, 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not item.isdigit():
            raise PackagerError(f"--vocab {path}:{number}: {item!r} is not a token id")
        if int(item) >= n_vocab:
            raise PackagerError(f"--vocab {path}:{number}: token id {item} is out of range (the model has "
                                f"{n_vocab:,} tokens, ids 0-{n_vocab - 1})")
        ids.add(int(item))
    if not ids:
        raise PackagerError(f"--vocab {path}: no token ids")
    return ids


class Tokenizer:
    """A GGUF's tokenizer as gguf-py reads it, and which pieces each token is merged from."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        fields = reader.fields
        kind_field = fields.get(gguf.Keys.Tokenizer.MODEL)
        self.kind = kind_field.contents() if kind_field is not None else None
        if self.kind not in _KIND_NAMES:
            raise PackagerError(f"{path.name}: tokenizer {self.kind!r} cannot be trimmed: edgepack trims "
                                "SentencePiece-style ('llama': Gemma, Llama 2) and BPE ('gpt2': Qwen, Llama 3) "
                                "tokenizers")
        self.tokens: list[str] = fields[gguf.Keys.Tokenizer.LIST].contents()
        n = len(self.tokens)
        types = fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
        self.types = np.asarray(types.contents(), dtype=np.int32) if types else np.full(n, NORMAL, np.int32)
        scores = fields.get(gguf.Keys.Tokenizer.SCORES)
        self.scores = np.asarray(scores.contents(), dtype=np.float32) if scores else None
        merges = fields.get(gguf.Keys.Tokenizer.MERGES)
        self.merges: list[str] = merges.contents() if merges else []
        if self.kind == SPM and self.scores is None:
            raise PackagerError(f"{path.name}: a SentencePiece tokenizer without scores cannot be trimmed")
        if self.kind == BPE and not self.merges:
            raise PackagerError(f"{path.name}: a BPE tokenizer without merges cannot be trimmed")
        self.ids = {t: i for i, t in enumerate(self.tokens)}  # llama.cpp's text_to_token: the last of duplicates
        self.special_ids = {k: f.contents() for k, f in fields.items()
                            if k.startswith("tokenizer.ggml.") and k.endswith(("_token_id", "_token_ids"))}
        self._parents: dict[str, tuple[str, str]] = {}
        self._rank: dict[str, int] = {}
        for rank, merge in enumerate(self.merges):
            left, _, right = merge.partition(" ")
            self._parents.setdefault(left + right, (left, right))
            self._rank.setdefault(left + right, rank)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]

    def required(self) -> set[int]:
        """Ids every trimmed vocabulary keeps: all but plain pieces, the ids special-token keys name, and for BPE the
        single-character pieces (its 256 byte symbols: any text stays encodable), for SentencePiece its space piece
        (a space that fell back to bytes would decode as '\u2581', not as a space)."""
        keep = {int(i) for i in np.flatnonzero(self.types != NORMAL)}
        for value in self.special_ids.values():
            keep.update(v for v in (value if isinstance(value, list) else [value]) if 0 <= v < self.n_vocab)
        if self.kind == BPE:
            keep.update(i for i, t in enumerate(self.tokens) if len(t) == 1)
        elif _SPACE in self.ids:
            keep.add(self.ids[_SPACE])
        return keep

    def pieces(self, token: int) -> frozenset[int] | None:
        """The token and every piece the tokenizer forms on its way to it; None when it never produces the token."""
        return self._pieces(self.tokens[token]) if self.types[token] == NORMAL else frozenset({token})

    @cache  # noqa: B019 - one Tokenizer per trimming; the cache dies with it
    def _pieces(self, text: str) -> frozenset[int] | None:
        if self.kind == SPM:
            final, formed = spm_merges(text, self.ids, self.scores)
            return frozenset(self.ids[t] for t in formed | {text}) if final == [text] else None
        if len(text) == 1:
            return frozenset({self.ids[text]})
        parents = self._parents.get(text)
        if parents is None or any(p not in self.ids for p in parents):
            return None
        left, right = (self._pieces(p) for p in parents)
        return None if left is None or right is None else left | right | {self.ids[text]}

    def frequency_order(self) -> list[int]:
        """Plain pieces, most frequent in the tokenizer's training first: SentencePiece scores are merge ranks
        (higher first), BPE tokens are ranked by the merge that creates them."""
        normal = np.flatnonzero(self.types == NORMAL)
        if self.kind == SPM:
            assert self.scores is not None
            return [int(i) for i in normal[np.argsort(-self.scores[normal], kind="stable")]]
        return sorted((int(i) for i in normal), key=lambda i: self._rank.get(self.tokens[i], -1))

    def text_of(self, token: int) -> str:
        """A piece as the text it stands for (SentencePiece spaces, BPE's byte symbols decoded)."""
        piece = self.tokens[token]
        if self.kind == SPM:
            return piece.replace(_SPACE, " ")
        decoder = _byte_decoder()
        return bytes(decoder.get(c, 0) for c in piece).decode("utf-8", "ignore")


def spm_merges(text: str, ids: dict[str, int], scores: np.ndarray) -> tuple[list[str], set[str]]:
    """llama.cpp's SentencePiece session on one fragment (llm_tokenizer_spm_session::tokenize): start from the
    characters, repeatedly merge the adjacent pair whose concatenation is a piece with the highest score (leftmost
    first). Returns the final symbols and every piece formed on the way."""
    texts: list[str | None] = list(text)
    n = len(texts)
    prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
    if n:
        nxt[-1] = -1
    queue: list[tuple[float, int, int, int]] = []

    def add(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = texts[left] + texts[right]  # type: ignore[operator]
        token = ids.get(joined)
        if token is not None:
            heapq.heappush(queue, (-float(scores[token]), left, right, len(joined)))

    for i in range(1, n):
        add(i - 1, i)
    formed = set()
    while queue:
        _, left, right, size = heapq.heappop(queue)
        a, b = texts[left], texts[right]
        if a is None or b is None or len(a) + len(b) != size:
            continue
        texts[left], texts[right] = a + b, None
        formed.add(a + b)
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    return [t for t in texts if t is not None], formed


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass(frozen=True)
class Selection:
    kept: tuple[int, ...]  # original ids, ascending: a kept token's new id is its index here
    required: int  # tokens every trimmed vocabulary keeps (special, bytes, the agent's and their pieces)
    unreachable: int  # given tokens the tokenizer never produces (kept anyway, as they are)


def select(tok: Tokenizer, needed: Iterable[int], size: int | None, alphabet: set[str],
           order: list[int] | None = None) -> Selection:
    """The kept ids: required, the needed ones with their pieces, then frequent pieces in `alphabet` up to `size`
    (None: no more). Refuses a size below what must be kept."""
    keep = tok.required()
    unreachable = 0
    for token in sorted(set(needed)):
        pieces = tok.pieces(token)
        if pieces is None:
            unreachable += 1
            pieces = frozenset({token})
        keep |= pieces
    required = len(keep)
    if size is not None:
        if size < required:
            raise PackagerError(f"--vocab {size}: the model's special and byte tokens and the agent's own tokens "
                                f"alone are {required:,}; ask for at least that many")
        if size >= tok.n_vocab:
            raise PackagerError(f"--vocab {size}: the model has only {tok.n_vocab:,} tokens; nothing to trim")
        for token in order if order is not None else tok.frequency_order():
            if len(keep) >= size:
                break
            if token in keep or not set(tok.text_of(token)) <= alphabet:
                continue
            pieces = tok.pieces(token)
            if pieces is not None and len(keep | pieces) <= size:
                keep |= pieces
    return Selection(tuple(sorted(keep)), required, unreachable)


def alphabet_of(texts: Iterable[str]) -> set[str]:
    """The characters a vocabulary fill may use: those of the agent's texts and printable ASCII."""
    chars = {chr(c) for c in range(32, 127)} | {"\n", "\t"}
    for text in texts:
        chars.update(text)
    return chars


def write_trimmed(source: Path, kept: tuple[int, ...], output: Path) -> None:
    """`source` with only the `kept` token ids: tokenizer arrays, merges and special ids rewritten, embedding and
    output rows sliced as stored (quantized rows are whole blocks, so no requantizing). All else is copied."""
    reader = gguf.GGUFReader(source)
    tok = Tokenizer(reader, source)
    index = np.asarray(kept, dtype=np.int64)
    new_id = {old: new for new, old in enumerate(kept)}
    _check_tensors(reader, tok.n_vocab, source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = output.with_name(output.name + ".partial")
    try:
        writer = gguf.GGUFWriter(partial, arch, use_temp_file=False)
        writer.data_alignment = reader.alignment
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE or key in _TOKENIZER_ARRAYS:
                continue
            value = field.contents()
            if key in tok.special_ids:
                value = _remapped(value, new_id)
                if value is None:
                    continue  # the key named no token of this model
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, field.types[0], sub_type=sub)
        writer.add_token_list([tok.tokens[i] for i in kept])
        writer.add_token_types([int(tok.types[i]) for i in kept])
        if tok.scores is not None:
            writer.add_token_scores([float(tok.scores[i]) for i in kept])
        if tok.merges:
            writer.add_token_merges(_kept_merges(tok, set(new_id)))
        datas = []
        for tensor in reader.tensors:
            data = tensor.data[index] if tensor.name in _VOCAB_TENSORS else tensor.data
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
            datas.append(data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in datas:
            writer.write_tensor_data(data)
        writer.close()
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _check_tensors(reader: gguf.GGUFReader, n_vocab: int, source: Path) -> None:
    if not any(t.name == "token_embd.weight" for t in reader.tensors):
        raise PackagerError(f"{source.name}: no token_embd.weight tensor: not a model whose vocabulary can be trimmed")
    for tensor in reader.tensors:
        if tensor.name not in _VOCAB_TENSORS and n_vocab in (int(d) for d in tensor.shape):
            raise PackagerError(f"{source.name}: tensor {tensor.name} has a vocabulary-sized dimension edgepack "
                                "does not know how to trim")


def _remapped(value: int | list[int], new_id: dict[int, int]) -> int | list[int] | None:
    if isinstance(value, list):
        return [new_id[v] for v in value if v in new_id]
    return new_id.get(value)


def _kept_merges(tok: Tokenizer, kept: set[int]) -> list[str]:
    """Merges of two kept pieces into a kept piece, in their order (a rank is a position in this list)."""
    out = []
    for merge in tok.merges:
        left, _, right = merge.partition(" ")
        if all(tok.ids.get(p, -1) in kept for p in (left, right, left + right)):
            out.append(merge)
    return out


class VocabModel:
    """A model's tokenizer as llama.cpp runs it (vocab_only: no weights loaded)."""

    def __init__(self, path: Path | list[Path]) -> None:
        paths = path if isinstance(path, list) else [path]
        llama.init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        raw = [str(p).encode() for p in paths]
        self._model = llama_cpp.llama_model_load_from_splits((ctypes.c_char_p * len(raw))(*raw), len(raw), params)
        if not self._model:
            raise PackagerError(f"llama.cpp could not load the tokenizer of {paths[0].name}: {llama.last_error()}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Without BOS; `special`: control tokens written in the text (a chat template's) are parsed as tokens."""
        return llama.tokenize(self._vocab, text, add_special=False, parse_special=special)

    def piece(self, token: int) -> bytes:
        return token_piece(self._vocab, token)

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> VocabModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unchanged_share(source: Path, trimmed: Path, kept: tuple[int, ...], text: str) -> float:
    """Share of the text's bytes that the trimmed tokenizer covers with the same tokens as the source's (a byte
    counts when the source token over it is also a token of the trimmed split, at the same place)."""
    if not text:
        return 1.0
    with VocabModel(source) as before, VocabModel(trimmed) as after:
        reference = _spans(before, before.tokenize(text), lambda t: t)
        candidate = set(_spans(after, after.tokenize(text), lambda t: kept[t]))
    total = reference[-1][1] if reference else 0  # the tokens' bytes (a space prefix may add one)
    return sum(end - start for start, end, _ in reference if (start, end, _) in candidate) / total if total else 1.0


def _spans(model: VocabModel, tokens: list[int], original: Callable[[int], int]) -> list[tuple[int, int, int]]:
    """(start byte, end byte, original id) of each token."""
    out, at = [], 0
    for token in tokens:
        size = len(model.piece(token))
        out.append((at, at + size, original(token)))
        at += size
    return out
