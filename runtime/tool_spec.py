"""A tool an agent may call, as OpenAI declares it: the one schema shared by requests, recipes and manifests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
ToolChoice = Literal["none", "auto", "required"]


class Function(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    function: Function
    type: Literal["function"] = "function"
