"""Fuzzing the HTTP API's request parsers (OpenAI chat and text completions, llama-server's /completion,
/tokenize, /detokenize): a bad body is a 4xx ApiError with a one-line message, never another exception (a 500)."""

from __future__ import annotations

import fuzz_targets as targets
from fuzz_strategies import json_inputs
from hypothesis import given, settings

SEEDS = targets.seeds()


@settings(max_examples=300, deadline=2000, derandomize=True, database=None)
@given(json_inputs(SEEDS["request_body"]))
def test_request_parsers_answer_bad_bodies_with_4xx(data):
    targets.request_body(data)



def test_deeply_nested_body_is_a_400():
    """Found by this fuzzing and by bench/soak.py: msgspec's RecursionError was a 500 on every route."""
    nested = b"[" * 5000 + b"]" * 5000
    targets.request_body(b'{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "json_schema": {"a": '
                         + nested + b"}}")
