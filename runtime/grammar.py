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


def from_json_schema(schema: dict[str, Any]) -> str:
    """A grammar for JSON text valid under `schema` ({} or {"type": "object"}: any object)."""
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema or {"type": "object"}))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError, NotImplementedError) as exc:
        raise SchemaNotSupported(f"JSON schema not supported: {' '.join(str(exc).split()) or type(exc).__name__}") \
            from None
