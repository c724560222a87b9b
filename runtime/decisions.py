"""Whether two answers to the same request make the same decision: the live release's and a candidate's.

An agent's decision is what a program acts on: the tool calls it makes (function names and parsed arguments), the
JSON document it returns, else its text. `compare()` measures each of these and gives the verdict (docs/shadow.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any, Protocol

_FENCE_RE = re.compile(r"```(?:json)?\s*\n?(.*?)\n?\s*```", re.DOTALL)


class NamedCall(Protocol):
    """A parsed tool call (tool_calls.ToolCall is one): a function name and its arguments as JSON text."""

    @property
    def name(self) -> str: ...

    @property
    def arguments(self) -> str: ...


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON text, as the model wrote it


@dataclass(frozen=True)
class Answer:
    """One release's answer, as the server has it: the content, the calls read from it, the first token.

    `first_token` is the first generated token id (or its piece); None when the answer came from a cache."""

    text: str
    tool_calls: Sequence[NamedCall] = ()
    first_token: int | str | None = None


@dataclass(frozen=True)
class Comparison:
    """Each measure is None where it does not apply (no first tokens given; neither answer a call; no JSON)."""

    exact: bool  # same text and the same calls, character for character
    first_token: bool | None
    tool_name: bool | None  # either answer calls a tool: the same function names (in any order)
    tool_args: bool | None  # ... and the same calls, arguments compared as parsed JSON values
    json: bool | None  # neither calls a tool and either text is a JSON object or array: equal as values
    agrees: bool  # the decision: tool_args where there are calls, else json where there is JSON, else exact

    def fields(self) -> dict[str, bool | None]:
        return {"exact": self.exact, "first_token": self.first_token, "tool_name": self.tool_name,
                "tool_args": self.tool_args, "json": self.json, "agrees": self.agrees}


def compare(live: Answer, candidate: Answer) -> Comparison:
    """The candidate's answer measured against the live one (see Comparison for what each field means)."""
    exact = live.text == candidate.text and _raw(live.tool_calls) == _raw(candidate.tool_calls)
    first = None
    if live.first_token is not None and candidate.first_token is not None:
        first = live.first_token == candidate.first_token
    tool_name = tool_args = document = None
    if live.tool_calls or candidate.tool_calls:
        tool_name = sorted(c.name for c in live.tool_calls) == sorted(c.name for c in candidate.tool_calls)
        tool_args = tool_name and _calls(live.tool_calls) == _calls(candidate.tool_calls)
        agrees = tool_args
    else:
        live_doc, candidate_doc = json_document(live.text), json_document(candidate.text)
        if live_doc is not None or candidate_doc is not None:
            document = live_doc is not None and live_doc == candidate_doc
        agrees = exact if document is None else document
    return Comparison(exact, first, tool_name, tool_args, document, agrees)


def json_document(text: str) -> Any | None:
    """A text that is one JSON object or array (alone or as the only fenced ```json block), as a canonical value
    that compares equal for the same document whatever its key order, whitespace or number spelling; else None."""
    stripped = text.strip()
    if fenced := _FENCE_RE.fullmatch(stripped):
        stripped = fenced.group(1).strip()
    if not stripped.startswith(("{", "[")):
        return None
    value = _parse(stripped)
    return None if value is None else _canonical(value)


def _raw(calls: Sequence[NamedCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def _calls(calls: Sequence[NamedCall]) -> list[tuple[str, Any]]:
    """The calls as (name, canonical arguments), sorted: parallel calls in another order are the same decision.
    Arguments that do not parse (a call cut off by max_tokens) are compared as their stripped text."""
    out = []
    for call in calls:
        value = _parse(call.arguments)
        out.append((call.name, ("text", call.arguments.strip()) if value is None else _canonical(value)))
    return sorted(out, key=repr)


def _parse(text: str) -> Any | None:
    """JSON with exact numbers (1, 1.0 and 1e0 are one value); None for anything that is not strict JSON."""
    try:
        return json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _canonical(value: Any) -> Any:
    """A hashable, ordered form in which only equal JSON values are equal (true is not 1, "1" is not 1)."""
    if isinstance(value, dict):
        return ("object", tuple(sorted((k, _canonical(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, Decimal):
        return ("number", value.normalize(Context(prec=max(1, len(value.as_tuple().digits)))))  # exact: no rounding
    return ("string", value)
