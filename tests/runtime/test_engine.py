"""The engine's generation loop: stop strings, EOS handling, context limits."""

from __future__ import annotations

import pytest

from edgepack.runtime.engine import Engine, Generation, Sampling, _StopMatcher
from edgepack.runtime.errors import EdgepackError


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    engine = Engine([tiny_gguf], name="tiny", n_ctx=128, n_batch=16, threads=1, chat_template="chatml")
    yield engine
    engine.close()


def generate(engine: Engine, text: str, **sampling) -> tuple[str, Generation]:
    result = Generation()
    out = "".join(engine.generate(engine.tokenize(text), Sampling(**sampling), result))
    return out, result


def test_long_prompt_is_processed_in_batches(engine):
    prompt = "the time " * 4  # longer than n_batch=16 tokens
    text, result = generate(engine, prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert result.prompt_tokens > 16 and result.completion_tokens == 4


def test_ignore_eos_runs_to_max_tokens_and_counts(engine):
    _, result = generate(engine, "the", max_tokens=20, temperature=0, ignore_eos=True)
    assert result.completion_tokens == 20 and result.finish_reason == "length"
    assert result.decode_tokens_per_second and result.decode_tokens_per_second > 0


def test_context_overflow_is_refused(engine):
    with pytest.raises(EdgepackError, match="exceeds the context size"):
        generate(engine, "the " * 100, max_tokens=10)


def test_chat_template_renders_roles(engine):
    text = engine.format_chat([("system", "S"), ("user", "U")])
    assert "<|im_start|>system\nS<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["hel", "lo wo", "rld"], ("wor",), ("hello ", True)),
        (["ab", "c"], ("x",), ("abc", False)),
        (["a<", "/s", ">b"], ("</s>",), ("a", True)),
        (["a<", "b"], ("</s>",), ("a<b", False)),
    ],
)
def test_stop_matcher_holds_back_partial_matches(pieces, stops, expected):
    matcher = _StopMatcher(stops)
    out, stopped = "", False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += matcher.feed("", final=True)[0]
    assert (out, stopped) == expected
