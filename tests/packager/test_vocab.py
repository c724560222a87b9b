"""Vocabulary trimming (--vocab): tiny SentencePiece and BPE models written here, and Gemma 3 270M end to end."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_cli
from tiny_model import WORDS, TinyTokenizer, write_tiny_llama

from edgepack.packager import evaluate, vocab
from edgepack.packager.errors import PackagerError
from edgepack.packager.forward import Forward
from edgepack.runtime.store import bundle_manifest

SPACE = "\u2581"
T = gguf.TokenType


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet, in byte order (written out here, not taken from the code under test)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """Control tokens, 256 byte tokens, the space piece, then every prefix of '▁word' (so '▁the' is merged as ▁t,
    ▁th, ▁the)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [SPACE]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL]
    for word in WORDS:
        for end in range(2, len(word) + 2):
            piece = SPACE + word[: end - 1]
            if piece not in tokens:
                tokens.append(piece)
                types.append(T.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(t) for t in types]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """256 byte symbols, the prefixes of 'Ġword' with the merges that make them, and an end-of-text token."""
    tokens = _byte_symbols()
    merges = []
    for word in WORDS:
        text = "Ġ" + word
        for end in range(2, len(text) + 1):
            if text[:end] not in tokens:
                merges.append(f"{text[:end - 1]} {text[end - 1]}")
                tokens.append(text[:end])
    tokens.append("<|endoftext|>")
    types = [int(T.NORMAL)] * (len(tokens) - 1) + [int(T.CONTROL)]
    return tokens, types, merges


def write_model(path: Path, kind: str = "llama", *, tied: bool = False, n_embd: int = 256) -> Path:
    if kind == "gpt2":
        tokens, types, merges = bpe_vocab()
        tokenizer = TinyTokenizer("gpt2", tokens, types, merges=merges, bos=len(tokens) - 1, eos=len(tokens) - 1,
                                  unk=None)
    else:
        tokens, scores, types = spm_vocab()
        tokenizer = TinyTokenizer(kind, tokens, types, scores)  # "llama", or a kind that is refused
    return write_tiny_llama(path, n_layer=2, n_embd=n_embd, seed=7, name="", tokenizer=tokenizer, tied=tied)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("vocab") / "spm.gguf")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("vocab") / "bpe.gguf", "gpt2", tied=True)


AGENT_TEXT = "the word was hot and they said what we can do"
OTHER_TEXT = "which time will their way about many"


def tokenizer(path: Path) -> vocab.Tokenizer:
    return vocab.Tokenizer(gguf.GGUFReader(path), path)


def trimmed(source: Path, out: Path, text: str, size: int | None) -> tuple[int, ...]:
    tok = tokenizer(source)
    with vocab.VocabModel(source) as model:
        needed = model.tokenize(text)
    kept = vocab.select(tok, needed, size, vocab.alphabet_of([text])).kept
    vocab.write_trimmed(source, kept, out)
    return kept


def test_parse_request(tmp_path):
    assert vocab.parse_request("auto").auto
    assert vocab.parse_request("32k").size == 32768
    assert vocab.parse_request("1000").size == 1000
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n")
    assert vocab.parse_request(str(ids)).file == ids
    for bad in ("garbage", "-3", "12.5k", str(tmp_path / "missing.txt"), "0"):
        with pytest.raises(PackagerError, match="--vocab"):
            vocab.parse_request(bad)


def test_spm_pieces_follow_the_merges(spm):
    tok = tokenizer(spm)
    ids = {t: i for i, t in enumerate(tok.tokens)}
    assert tok.pieces(ids[SPACE + "the"]) == {ids[SPACE + "t"], ids[SPACE + "th"], ids[SPACE + "the"]}
    assert tok.pieces(ids["<0x41>"]) == {ids["<0x41>"]}


def test_spm_trim_keeps_tokenization_rows_and_specials(spm, tmp_path):
    out = tmp_path / "trimmed.gguf"
    kept = trimmed(spm, out, AGENT_TEXT, None)
    source_tokens = tokenizer(spm).tokens
    assert len(kept) < len(source_tokens)
    new = gguf.GGUFReader(out)
    tokens = new.fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [source_tokens[i] for i in kept]
    assert sum(t.startswith("<0x") for t in tokens) == 256  # byte fallback stays complete
    assert tokens[new.fields["tokenizer.ggml.bos_token_id"].contents()] == "<s>"
    assert tokens[new.fields["tokenizer.ggml.eos_token_id"].contents()] == "</s>"
    old = {t.name: t.data for t in gguf.GGUFReader(spm).tensors}
    for tensor in new.tensors:
        expected = old[tensor.name][list(kept)] if tensor.name in ("token_embd.weight", "output.weight") \
            else old[tensor.name]
        assert np.array_equal(tensor.data, expected), tensor.name
    with vocab.VocabModel(spm) as a, vocab.VocabModel(out) as b:
        assert b.n_vocab == len(kept)
        assert [kept[t] for t in b.tokenize(AGENT_TEXT)] == a.tokenize(AGENT_TEXT)
        # a removed word still encodes (as bytes) and decodes to the same text
        removed = b.tokenize(OTHER_TEXT)
        assert b"".join(b.piece(t) for t in removed) == b"".join(a.piece(t) for t in a.tokenize(OTHER_TEXT))
    assert vocab.unchanged_share(spm, out, kept, AGENT_TEXT) == 1.0
    assert vocab.unchanged_share(spm, out, kept, OTHER_TEXT) == 0.0


def test_trimmed_logits_are_the_sources_on_kept_tokens(spm, tmp_path):
    out = tmp_path / "trimmed.gguf"
    kept = trimmed(spm, out, AGENT_TEXT, None)
    with Forward([spm], n_ctx=64, threads=1) as a:
        prompt = a.tokenize(AGENT_TEXT)
        full = np.array(a.run(prompt))
    new_id = {old: new for new, old in enumerate(kept)}
    with Forward([out], n_ctx=64, threads=1) as b:
        assert b.tokenize(AGENT_TEXT) == [new_id[t] for t in prompt]
        mine = np.array(b.run([new_id[t] for t in prompt]))
    np.testing.assert_allclose(mine, full[:, list(kept)], rtol=1e-4, atol=1e-4)


def test_size_fills_with_frequent_pieces_and_refuses_too_small(spm):
    tok = tokenizer(spm)
    with vocab.VocabModel(spm) as model:
        needed = model.tokenize(AGENT_TEXT)
    required = vocab.select(tok, needed, None, vocab.alphabet_of([AGENT_TEXT])).kept
    bigger = vocab.select(tok, needed, len(required) + 10, vocab.alphabet_of([AGENT_TEXT])).kept
    assert set(required) < set(bigger) and len(required) < len(bigger) <= len(required) + 10
    # the fill takes the highest-scored pieces first: ▁t, ▁th, ▁the, ▁a, ... (WORDS' order) are all needed or early
    assert tok.tokens.index(SPACE + "o") in bigger
    with pytest.raises(PackagerError, match="at least"):
        vocab.select(tok, needed, len(required) - 1, vocab.alphabet_of([AGENT_TEXT]))
    with pytest.raises(PackagerError, match="nothing to trim"):
        vocab.select(tok, needed, tok.n_vocab, vocab.alphabet_of([AGENT_TEXT]))


def test_bpe_trim_keeps_merges_consistent(bpe, tmp_path):
    out = tmp_path / "trimmed.gguf"
    kept = trimmed(bpe, out, AGENT_TEXT, None)
    tokens = gguf.GGUFReader(out).fields["tokenizer.ggml.tokens"].contents()
    merges = gguf.GGUFReader(out).fields["tokenizer.ggml.merges"].contents()
    assert "Ġthe" in tokens and "Ġwhich" not in tokens and "Ġt h" in merges and "Ġwhic h" not in merges
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= set(tokens), merge
    with vocab.VocabModel(bpe) as a, vocab.VocabModel(out) as b:
        assert [kept[t] for t in b.tokenize(AGENT_TEXT)] == a.tokenize(AGENT_TEXT)
        assert b"".join(b.piece(t) for t in b.tokenize(OTHER_TEXT)) == OTHER_TEXT.encode()


def test_bits_per_byte_same_bytes_and_renormalised(spm, tmp_path):
    out = tmp_path / "trimmed.gguf"
    trimmed(spm, out, AGENT_TEXT, None)
    text = (AGENT_TEXT + "\n") * 8
    metrics = evaluate.compare_bytes([spm], [out], text, window=128, threads=1)
    assert metrics.bytes == len(text.encode())
    # same tokens, same logits for them, a softmax over fewer tokens: each kept token is more probable
    assert 0 < metrics.bpb_candidate < metrics.bpb_reference
    same = evaluate.compare_bytes([spm], [spm], text, window=128, threads=1)
    assert same.bpb_candidate == same.bpb_reference


def test_id_file_and_unsupported_tokenizer(spm, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# mine\n300\n9999\n")
    with pytest.raises(PackagerError, match="out of range"):
        vocab.read_id_file(ids, tokenizer(spm).n_vocab)
    ids.write_text("abc\n")
    with pytest.raises(PackagerError, match="not a token id"):
        vocab.read_id_file(ids, tokenizer(spm).n_vocab)
    bert = write_model(tmp_path / "bert.gguf", "bert")
    with pytest.raises(PackagerError, match="'bert' cannot be trimmed"):
        tokenizer(bert)


@pytest.mark.parametrize("args, message", [
    (["--vocab", "garbage"], "--vocab 'garbage'"),
    (["--vocab", "10"], "ask for at least"),
    (["--vocab", "IDS"], "out of range"),
    (["--vocab", "auto"], "needs a tolerance tier"),
])
def test_cli_refuses_bad_vocab(spm, tmp_path, args, message):
    ids = tmp_path / "ids.txt"
    ids.write_text("123456\n")
    out = tmp_path / "x.edgepack"
    args = [str(ids) if a == "IDS" else a for a in args]
    done = run_cli("build", str(spm), "-o", str(out), "--quant", "keep", "--no-eval", *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 or "Traceback" not in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == [ids]  # nothing half-written


def test_cli_refuses_unsupported_tokenizer(tmp_path):
    bert = write_model(tmp_path / "bert.gguf", "bert")
    out = tmp_path / "x.edgepack"
    done = run_cli("build", str(bert), "-o", str(out), "--quant", "keep", "--no-eval", "--vocab", "300")
    assert done.returncode == 1 and "cannot be trimmed" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_cli_build_with_vocab(spm, tmp_path):
    out = tmp_path / "x.edgepack"
    size = len(spm_vocab()[0]) - 5  # the project's calibration text needs most of the tiny vocabulary
    done = run_cli("build", str(spm), "-o", str(out), "--quant", "keep", "--no-eval", "--vocab", str(size))
    assert done.returncode == 0, done.stderr
    assert f"vocabulary: {size} of {size + 5} tokens kept" in done.stdout
    quality = bundle_manifest(out).models[0].quality["vocab"]
    assert quality["kept"] == size and quality["unchanged_calibration"] == 1.0


# ---- Gemma 3 270M ----


def test_gemma_trim_and_eval_bits_per_byte(gemma_gguf, tmp_path):
    out = tmp_path / "gemma-32k.gguf"
    calibration = evaluate.default_text("calibration")
    kept = trimmed(gemma_gguf, out, calibration, 32768)
    assert len(kept) == 32768
    assert out.stat().st_size <= 130 * 2**20 < gemma_gguf.stat().st_size
    assert vocab.unchanged_share(gemma_gguf, out, kept, calibration) == 1.0
    done = run_cli("eval", str(gemma_gguf), str(out), "--chunks", "2", "--json", "--threads", "2")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert "kld_mean" not in doc  # not comparable across vocabularies
    per_byte = doc["bits_per_byte"]
    assert per_byte["windows"] == 2 and per_byte["bytes"] > 1000
    assert 0.3 < per_byte["bpb_reference"] < 3 and 0.3 < per_byte["bpb_candidate"] < 3


def test_recipe_vocab_key(spm, tmp_path):
    from edgepack.packager import recipe

    path = tmp_path / "edgepack.toml"
    (tmp_path / "ids.txt").write_text("300\n")
    path.write_text(f'[models.base]\nsource = "{spm}"\nvocab = "32k"\n')
    assert recipe.load(path).models[0].vocab == vocab.Request(size=32768)
    path.write_text(f'[models.base]\nsource = "{spm}"\nvocab = "ids.txt"\n')
    assert recipe.load(path).models[0].vocab == vocab.Request(file=tmp_path / "ids.txt")
    path.write_text(f'[models.base]\nsource = "{spm}"\nvocab = "lots"\n')
    with pytest.raises(PackagerError, match=r"models\.base\.vocab"):
        recipe.load(path)


def _greedy_answer(paths: list[Path], question: str) -> str:
    from edgepack.runtime.engine import Engine, Generation, Sampling

    engine = Engine(paths, name="g", n_ctx=512, n_batch=512, threads=2, chat_template="gemma")
    try:
        prompt = engine.format_chat([("user", question)])
        return "".join(engine.generate(engine.tokenize(prompt), Sampling(16, temperature=0), Generation()))
    finally:
        engine.close()


def test_gemma_build_with_vocab_answers_in_its_template(gemma_gguf, tmp_path):
    from edgepack.packager import model_files

    out = tmp_path / "gemma.edgepack"
    done = run_cli("build", str(gemma_gguf), "-o", str(out), "--quant", "keep", "--no-eval", "--vocab", "32k",
                   "--threads", "2", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    model = bundle_manifest(out).models[0]
    assert model.quality["vocab"]["kept"] == 32768 and model.quality["vocab"]["unchanged_calibration"] == 1.0
    files = model_files.resolve(str(out), tmp_path)
    assert sum(p.stat().st_size for p in files.paths) <= 130 * 2**20
    with vocab.VocabModel(files.paths) as trimmed_vocab:  # the template's control tokens, by their text
        prompt = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        pieces = [trimmed_vocab.piece(t) for t in trimmed_vocab.tokenize(prompt, special=True)]
    assert pieces.count(b"<start_of_turn>") == 2 and b"<end_of_turn>" in pieces
    # Gemma 3 270M repeats the question, then says a word (' mendatang') this build did not keep (--no-eval: no
    # task answers were collected): up to there the answers are the same, then the best kept token follows
    source, trimmed = (_greedy_answer(paths, "What is the capital of France?") for paths in ([gemma_gguf], files.paths))
    assert source.startswith("What is the capital of France?") and trimmed.startswith("What is the capital of France?")
    assert len(trimmed) > len("What is the capital of France?")


def test_vocab_tier_gate_and_auto_refusal(spm, tmp_path):
    calibration = tmp_path / "agent.txt"
    calibration.write_text(("hot word said we can\n") * 200)  # an agent that uses few of the tiny model's words
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"messages": [{"role": "user", "content": "hot word"}]}\n')
    common = ["--quant", "keep", "--calibration", str(calibration), "--tasks", str(tasks), "--threads", "1"]
    n_vocab = len(spm_vocab()[0])
    kept = tmp_path / "kept.edgepack"
    done = run_cli("build", str(spm), "-o", str(kept), "--vocab", str(n_vocab - 2), "--tier", "low-risk", *common)
    assert done.returncode == 0, done.stderr
    report = bundle_manifest(kept).models[0].quality["vocab"]
    assert report["kept"] == n_vocab - 2 and report["degradation"] < 0.05 and report["tasks"]["exact_match"] == 1.0
    for args, message in ((["--vocab", "auto"], "--vocab auto: even"),
                          (["--vocab", "300"], "vocabulary exceeds the low-risk tier")):
        refused = tmp_path / "refused.edgepack"
        done = run_cli("build", str(spm), "-o", str(refused), *args, "--tier", "low-risk", *common)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not refused.exists()
