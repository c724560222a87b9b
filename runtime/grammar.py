"""What a constrained answer must be, as a llama.cpp grammar (GBNF): JSON, JSON of a schema, or a given grammar.

JSON schemas go through the converter llama-cpp-python ships (llama_cpp.llama_grammar, a port of llama.cpp's
json_schema_to_grammar): the same rules llama-server applies to response_format and json_schema.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp import llama_grammar

from .errors import EdgepackError


class SchemaNotSupported(EdgepackError):
    """A JSON schema the converter cannot turn into a grammar (a request's fault)."""


# llama-cpp-python's converter lets control characters into strings, which JSON forbids (json.loads refuses a raw
# newline in a string); llama.cpp's own converter excludes them. Its rule, as llama.cpp writes it:
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def strict_strings(gbnf: str) -> str:
    """The converter's grammar with JSON's own string characters (no raw control characters)."""
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


def from_json_schema(schema: dict[str, Any]) -> str:
    """A grammar for JSON text valid under `schema` ({} or {"type": "object"}: any object)."""
    try:
        return strict_strings(llama_grammar.json_schema_to_gbnf(json.dumps(schema or {"type": "object"})))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError, NotImplementedError) as exc:
        raise SchemaNotSupported(f"JSON schema not supported: {' '.join(str(exc).split()) or type(exc).__name__}") \
            from None
