"""A model's answer read back as OpenAI tool calls: the calls, the text around them, and the same while it streams.

Each tool format (tool_formats.py) describes where its calls sit as `Trigger`s; one `StreamParser` reads them all.
`parse()` of a whole answer is the stream parser fed at once, so a streamed answer and a whole one never disagree.
"""

from __future__ import annotations

import ast
import json
import secrets
import string
from dataclasses import dataclass

_ID_ALPHABET = string.ascii_letters + string.digits
_NEED, _FAIL = -1, -2  # a scan that needs more text; a scan that found something else


def _call_id() -> str:
    """A fresh id for a call, as OpenAI shapes them."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI returns it


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of call `index`: its first delta carries id and name, later ones fragments of the arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Delta = ContentDelta | CallDelta


@dataclass(frozen=True)
class Trigger:
    """Where calls sit in a format's output: a literal that starts a region of calls, and the region's shape.

    A call is a JSON object `{"name": "<function>", "arguments": {...}}` ("parameters" is read as "arguments");
    whitespace may sit between any two parts of a region."""

    text: str
    consume: bool = True  # False: the text is the start of the first call's own JSON, e.g. '{"name"'
    open: tuple[str, ...] = ()  # literals between the trigger and the first call
    separator: str | None = None  # between two calls of a region; None: one call per region
    close: tuple[str, ...] = ()  # literals after the last call
    python: bool = False  # Llama's `name.call(key="value")` is read here too


@dataclass
class _Scan:
    """Where a JSON text stands: nesting depth and strings, enough to find where a value ends."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def run(self, text: str) -> int:
        """Characters of `text` up to and including the one that closes the value; len(text) if it stays open."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return len(text)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _literal(text: str, i: int, *options: str) -> int:
    """After optional whitespace, one of `options`: the index after it, _NEED or _FAIL."""
    i = _skip_ws(text, i)
    rest = text[i:]
    for option in options:
        if rest.startswith(option):
            return i + len(option)
    return _NEED if any(option.startswith(rest) for option in options) else _FAIL


def _string(text: str, i: int) -> tuple[int, str]:
    """A JSON string starting at i (after optional whitespace): (index after it, its value) or (_NEED|_FAIL, '')."""
    i = _skip_ws(text, i)
    if i == len(text):
        return _NEED, ""
    if text[i] != '"':
        return _FAIL, ""
    scan = _Scan(in_string=True)
    j = i + 1
    while j < len(text) and scan.in_string:
        scan.run(text[j])
        j += 1
    if scan.in_string:
        return _NEED, ""
    try:
        return j, json.loads(text[i:j])
    except json.JSONDecodeError:
        return _FAIL, ""


def _header(text: str) -> tuple[int, str]:
    """`{"name": "<name>", "arguments": ` up to the `{` that opens the arguments: (its index, name) or a status."""
    i = _literal(text, 0, "{")
    if i >= 0:
        i = _literal(text, i, '"name"')
    if i >= 0:
        i = _literal(text, i, ":")
    if i < 0:
        return i, ""
    i, name = _string(text, i)
    if i >= 0:
        i = _literal(text, i, ",")
    if i >= 0:
        i = _literal(text, i, '"arguments"', '"parameters"')
    if i >= 0:
        i = _literal(text, i, ":")
    if i >= 0:
        i = _skip_ws(text, i)
        i = _NEED if i == len(text) else i if text[i] == "{" else _FAIL
    return i, name


def _python_call(text: str) -> tuple[str, str] | None:
    """Llama's built-in tool form `name.call(key="value", ...)`: (name, arguments JSON), or None."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
                and isinstance(node.func.value, ast.Name) and not node.args
                and all(k.arg is not None for k in node.keywords)):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return None
    return node.func.value.id, json.dumps(arguments, ensure_ascii=False)


class StreamParser:
    """Reads an answer piece by piece: `feed(piece)` and at the end `finish()` return the deltas to send.

    Text that may be the start of a trigger is held back until it is known not to be one. A call is sent once
    its name is known and its arguments have begun; the arguments are then sent as they arrive. Until then a
    region that turns out not to be a call (no JSON, no name) is content. Whitespace before a call, and at the
    start and end of the content, is dropped."""

    def __init__(self, triggers: tuple[Trigger, ...]) -> None:
        self.triggers = triggers
        self._buf = ""  # text read and not yet sent
        self._state = "text"  # text, head, args, members, between, python: the method that reads on
        self._trigger = triggers[0]  # of the region being read
        self._calls_in_region = 0
        self._index = -1  # of the last call started
        self._scan = _Scan()
        self._ws = ""  # whitespace after the content sent so far: sent only if more content follows
        self._strip = True  # drop the whitespace that starts the next content
        self._said = False  # some content was sent

    def feed(self, piece: str) -> list[Delta]:
        self._buf += piece
        out: list[Delta] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        while self._step(out, final=True):
            pass
        return out

    def _step(self, out: list[Delta], final: bool) -> bool:
        """One move of the state machine; False when it must wait for more text (or, when final, is done)."""
        return getattr(self, "_" + self._state)(out, final)

    def _text(self, out: list[Delta], final: bool) -> bool:
        found = [(i, t) for t in self.triggers if (i := self._buf.find(t.text)) >= 0]
        if found:
            i, trigger = min(found, key=lambda f: f[0])
            self._content(self._buf[:i], out)
            self._buf = self._buf[i + len(trigger.text) if trigger.consume else i:]
            self._trigger, self._calls_in_region, self._state = trigger, 0, "head"
            return True
        hold = 0 if final else max(_overlap(self._buf, t.text) for t in self.triggers)
        self._content(self._buf[: len(self._buf) - hold], out)
        self._buf = self._buf[len(self._buf) - hold:]
        return False

    def _head(self, out: list[Delta], final: bool) -> bool:
        """Before a call is known: the region's opening (or separator), then the call's name."""
        trigger = self._trigger
        first = self._calls_in_region == 0
        i = 0
        for literal in trigger.open if first else (trigger.separator,):
            i = _literal(self._buf, i, literal)
            if i < 0:
                break
        name = ""
        if i >= 0:
            if first and trigger.python and (j := _skip_ws(self._buf, i)) < len(self._buf) and self._buf[j] != "{":
                self._state = "python"
                return True
            start = _skip_ws(self._buf, i)
            end, name = _header(self._buf[start:])
            i = start + end if end >= 0 else end
        if i == _NEED and not final:
            return False
        if i < 0:  # not a call after all
            if first:  # the trigger's text was content; what follows it is read again
                self._strip = False
                self._content(trigger.text, out)
                if not trigger.consume:
                    self._buf = self._buf[len(trigger.text):]
            self._state = "text"
            return True
        self._start_call(name, out)
        self._buf = self._buf[i:]
        self._scan, self._state = _Scan(), "args"
        return True

    def _start_call(self, name: str, out: list[Delta]) -> None:
        self._ws = ""  # the whitespace before a call is not content
        self._index += 1
        self._calls_in_region += 1
        out.append(CallDelta(self._index, id=_call_id(), name=name))

    def _args(self, out: list[Delta], final: bool) -> bool:
        n = self._scan.run(self._buf)
        if n:
            out.append(CallDelta(self._index, arguments=self._buf[:n]))
        self._buf = self._buf[n:]
        if self._scan.depth == 0:
            self._state = "members"
            return True
        return False  # an answer that ends here leaves the call with its arguments as far as they went

    def _members(self, out: list[Delta], final: bool) -> bool:
        """The rest of the call's object after its arguments (e.g. Mistral's "id"), not sent."""
        i = _skip_ws(self._buf, 0)
        if i == len(self._buf) and not final:
            return False
        if self._scan.depth == 0:  # just after the arguments
            if self._buf[i:i + 1] == "}":
                self._buf, self._state = self._buf[i + 1:], "between"
                return True
            if self._buf[i:i + 1] != ",":  # the object was left unclosed: take the call as it is
                self._buf, self._state = self._buf[i:], "between"
                return True
            self._scan = _Scan(depth=1)
        n = self._scan.run(self._buf)
        self._buf = self._buf[n:]
        if self._scan.depth == 0:
            self._state = "between"
            return True
        return False

    def _between(self, out: list[Delta], final: bool) -> bool:
        """After a call: the next call of the region, or the region's closing literals."""
        trigger = self._trigger
        if trigger.separator is not None:
            i = _literal(self._buf, 0, trigger.separator)
            if i == _NEED and not final:
                return False
            if i >= 0:
                self._state = "head"
                return True
        i = 0
        for literal in trigger.close:
            i = _literal(self._buf, i, literal)
            if i == _NEED and not final:
                return False
            if i < 0:
                break
        if i >= 0:
            self._buf = self._buf[i:]
        elif i == _NEED:  # the answer ended inside the closing literals
            self._buf = ""
        self._state, self._strip = "text", not self._said
        return True

    def _python(self, out: list[Delta], final: bool) -> bool:
        """Llama's python form has no end marker but the end of the answer: read it whole."""
        if not final:
            return False
        found = _python_call(self._buf)
        if found is None:
            self._strip = False
            self._content(self._trigger.text + self._buf, out)
        else:
            name, arguments = found
            self._start_call(name, out)
            out.append(CallDelta(self._index, arguments=arguments))
        self._buf, self._state = "", "text"
        return True

    def _content(self, text: str, out: list[Delta]) -> None:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        body = text.rstrip()
        if body:
            out.append(ContentDelta(self._ws + body))
            self._ws, self._said = "", True
        self._ws += text[len(body):]


def _overlap(text: str, trigger: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `trigger`."""
    for n in range(min(len(text), len(trigger) - 1), 0, -1):
        if text.endswith(trigger[:n]):
            return n
    return 0


def collect(deltas: list[Delta]) -> tuple[str, list[ToolCall]]:
    """The deltas of a whole answer folded back into its content and calls."""
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, CallDelta):
            if d.id is not None:
                calls[d.index] = [d.id, d.name or "", ""]
            calls[d.index][2] += d.arguments
    return content, [ToolCall(*calls[i]) for i in sorted(calls)]


def parse(triggers: tuple[Trigger, ...], text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer: (its content without the calls, the calls)."""
    parser = StreamParser(triggers)
    return collect(parser.feed(text) + parser.finish())
