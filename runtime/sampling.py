"""Sampling parameters, defined once: what a recipe's agent, a manifest's agent and a request may set
(SamplingParams), and the settings a generation runs with once every level is applied (Sampling).

Levels, later ones win: llama.cpp-server's defaults (Sampling's), the agent's (recipe -> manifest), the request's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated

import msgspec


def _range(low: float, high: float) -> msgspec.Meta:
    return msgspec.Meta(ge=low, le=high)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Settable sampling parameters; None means "not set here" (the next level's value applies)."""

    temperature: Annotated[float, _range(0.0, 2.0)] | None = None
    top_p: Annotated[float, _range(0.0, 1.0)] | None = None
    top_k: Annotated[int, _range(0, 100_000)] | None = None
    min_p: Annotated[float, _range(0.0, 1.0)] | None = None
    repeat_penalty: Annotated[float, _range(0.0, 10.0)] | None = None
    frequency_penalty: Annotated[float, _range(-2.0, 2.0)] | None = None
    presence_penalty: Annotated[float, _range(-2.0, 2.0)] | None = None
    seed: Annotated[int, _range(-(2**63), 2**63 - 1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def given(self) -> dict[str, float | int]:
        """Only the parameters set at this level."""
        return {name: value for name in self.__struct_fields__ if (value := getattr(self, name)) is not None}


SAMPLING_KEYS = SamplingParams.__struct_fields__


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model (before sampling settings), with the top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Sampling:
    """What one generation runs with (the engine's input)."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # llama.cpp GBNF with a `root` rule: only text it accepts is generated
    render_special: bool = False  # special tokens written as text (tool-call markers such as <|python_tag|>)
    logit_bias: tuple[tuple[int, float], ...] = ()  # token id -> bias added to its logit (-inf: never)
    logprobs: int | None = None  # None: not computed; N: the chosen token's log-probability and the top N

    @classmethod
    def layered(cls, max_tokens: int, *levels: SamplingParams, **request: object) -> Sampling:
        """Defaults, then each level's parameters that are set (later levels win), then the request's own
        settings (`request`: stop, grammar, ...); max_tokens is decided by the caller (from the prompt's length)."""
        settable = {f.name for f in fields(cls)} - {"max_tokens"}
        chosen: dict[str, object] = {}
        for level in levels:
            chosen.update({k: v for k, v in level.given().items() if k in settable})
        return cls(max_tokens=max_tokens, **{**chosen, **request})
