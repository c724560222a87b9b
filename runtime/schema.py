"""The one schema layer: every input that crosses a border (manifest, recipe, local.json, board profile,
HTTP request body) is declared as a msgspec Struct and decoded here, once, into typed objects.

Errors name the input and the path of the bad field: `manifest.json: models[0].segments: expected array, got str`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import EdgepackError

T = TypeVar("T")

# Names become file names and URL parts on the device: keep them boring.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"  # \Z: "$" would let a final newline through (msgspec searches)
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
_NAME_RE = re.compile(NAME_PATTERN)
_NAME_RULE = "a name of letters, digits, '.', '_' or '-' (max 64)"


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The base of file schemas: immutable, unknown fields refused (a typo is an error)."""


class SchemaError(EdgepackError):
    """An input that does not match its schema; `path` is the bad field ('' for the whole input)."""

    def __init__(self, where: str, path: str, message: str) -> None:
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        self.path, self.reason = path, message


def decode_json(data: bytes | str, kind: type[T], where: str, dec_hook: Any = None) -> T:
    """JSON text -> `kind`, or SchemaError naming `where` and the field."""
    try:
        return msgspec.json.decode(data, type=kind, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise _schema_error(where, exc, "") from None
    except msgspec.DecodeError as exc:
        raise SchemaError(where, "", _malformed(data, exc)) from None
    except UnicodeDecodeError as exc:  # msgspec lets this through for bytes that are not UTF-8 at all
        raise SchemaError(where, "", f"not UTF-8 text ({exc.reason})") from None
    except RecursionError:  # msgspec follows nesting on the C stack, up to Python's recursion limit
        raise SchemaError(where, "", "JSON nested too deeply") from None


def convert(doc: Any, kind: type[T], where: str, prefix: str = "", dec_hook: Any = None) -> T:
    """Already parsed data (TOML tables, JSON values) -> `kind`; `prefix` is the path of `doc` in its input."""
    try:
        return msgspec.convert(doc, kind, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise _schema_error(where, exc, prefix) from None
    except RecursionError:
        raise SchemaError(where, prefix, "nested too deeply") from None


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise EdgepackError(f"{what} {value!r} is not a valid name: expected {_NAME_RULE}")
    return value


def _malformed(data: bytes | str, exc: msgspec.DecodeError) -> str:
    """The syntax error, in words. A lone surrogate escape (\\ud800) fits JSON's grammar but is no character
    (RFC 8259 section 8.2); msgspec refuses it with a message that may not say so, Python's json reads it."""
    try:
        json.dumps(json.loads(data), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return ("a string holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff), which is no character: send "
                "the character itself or both halves of its surrogate pair")
    except (ValueError, RecursionError):
        pass
    return f"not valid JSON ({_one_line(exc)})"


_AT = re.compile(r"^(?P<message>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _schema_error(where: str, exc: msgspec.ValidationError, prefix: str) -> SchemaError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    path = (match.group("path") or "").lstrip(".")
    path = f"{prefix}{'' if path.startswith('[') or not prefix or not path else '.'}{path}"
    message = _readable(match.group("message"))
    return SchemaError(where, path, f"a key: {message}" if match.group("key") else message)


def _readable(message: str) -> str:
    """msgspec's 'Expected `int`, got `float`' -> 'expected int, got float' (one line, plain words)."""
    escaped = NAME_PATTERN.replace("\\", "\\\\")  # msgspec shows the pattern with its backslash doubled
    message = message.replace("`", "").replace(f"str matching regex '{escaped}'", _NAME_RULE)
    if message.startswith("Expected "):
        message = "e" + message[1:]
    if message.startswith("Object contains unknown field "):
        message = f"unknown field {message.removeprefix('Object contains unknown field ')}"
    if message.startswith("Object missing required field "):
        message = f"missing required field {message.removeprefix('Object missing required field ')}"
    return _one_line(message)


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())
