"""A chat request turned into what the engine runs: the prompt text, the grammar, and the tool format whose calls
are read back from the answer (runtime/tool_formats.py). Knows no HTTP; raises ApiError for what the client sent.

Tool calls are decoded under the format's grammar when a call is required (tool_choice "required" or a function's
name), so their arguments always parse and have the schema's types. With tool_choice "auto" the model writes
freely and its answer is read for calls: llama.cpp's lazy grammar (constrain from a trigger on) aborts the process
when the token that completes a trigger carries text the grammar refuses, which no Python code can catch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from . import tool_formats
from .bundle_format import AgentInfo
from .engine import Engine
from .errors import EdgepackError
from .openai_api import ApiError, CompletionRequest
from .tool_calls import CallDelta, ContentDelta, Delta, ToolCall


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    tools: tool_formats.ToolFormat | None = None  # the answer is read for calls of this format
    grammar: str | None = None  # the answer must be a call (tool_choice required / named)
    uses_tools: bool = False  # tools or tool history shape the prompt (answers are not cached by meaning)
    turns: tuple[tuple[str, str], ...] = ()  # (role, text) of the messages, the agent's system prompt first


def chat_prompt(engine: Engine, req: CompletionRequest, agent: AgentInfo) -> ChatPrompt:
    messages = [_message_doc(m) for m in req.messages]
    if agent.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": agent.system_prompt})
    tools = [msgspec.to_builtins(t) for t in (req.tools or agent.tools)]
    choice = req.tool_choice or agent.tool_choice or "auto"
    if choice not in ("auto", "none", "required") and choice not in {t["function"]["name"] for t in tools}:
        raise ApiError(400, f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
    history = any(m.tool_calls or m.role == "tool" for m in req.messages)
    turns = tuple((m["role"], m["content"]) for m in messages)
    try:
        if not tools and not history:
            return ChatPrompt(engine.format_chat(list(turns)), turns=turns)
        fmt = tool_formats.detect(engine.chat_template)
        rendered = fmt.render(engine.chat_template, messages, tools, eos=engine.eos_text())
        text = rendered if isinstance(rendered, str) else engine.format_chat(rendered)
        calling = bool(tools) and choice != "none"
        grammar = fmt.grammar(tools, choice=None if choice == "required" else choice,
                              parallel=req.parallel_tool_calls) if calling and choice != "auto" else None
    except EdgepackError as exc:
        raise ApiError(400, str(exc), param="tools" if tools else "messages") from None
    return ChatPrompt(text, fmt if calling else None, grammar, uses_tools=True, turns=turns)


def call_docs(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_docs(deltas: list[Delta]) -> tuple[str, list[dict[str, Any]]]:
    """Stream deltas as one chunk's content text and its `tool_calls` delta list (OpenAI's streaming shape)."""
    text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = []
    for d in deltas:
        if isinstance(d, CallDelta):
            doc: dict[str, Any] = {"index": d.index}
            if d.id is not None:
                doc.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
            else:
                doc["function"] = {"arguments": d.arguments}
            calls.append(doc)
    return text, calls


def _message_doc(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        doc["tool_calls"] = [msgspec.to_builtins(c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        doc["tool_call_id"] = message.tool_call_id
    return doc

