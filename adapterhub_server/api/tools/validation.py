"""Checks of a request's `tools`, `tool_choice` and `parallel_tool_calls`, on the wire dicts.

Each mistake raises `InvalidRequestError` whose `param` points at the offending field
(`tools[3].function.name`), as OpenAI's errors do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from adapterhub_server.errors import InvalidRequestError

__all__ = ["MAX_TOOLS", "TOOL_NAME_PATTERN", "ToolChoice", "resolve_tool_choice", "validate_tools"]

MAX_TOOLS = 128
"""OpenAI's limit on `tools` per request."""

TOOL_NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""Function names OpenAI accepts (matched in full)."""


@dataclass(frozen=True)
class ToolChoice:
    """`tool_choice` with its default applied."""

    mode: Literal["none", "auto", "required", "function"]
    function: str | None = None
    """The forced function's name (mode "function")."""

    @property
    def forced(self) -> bool:
        """The output must be a call: decode under `forcing.forced_call_schema`."""
        return self.mode in ("required", "function")


def validate_tools(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel_tool_calls: bool | None = None,
) -> ToolChoice:
    """Check the tool fields of a chat request and return the effective tool choice.

    Raises:
        InvalidRequestError: a malformed tool, more than `MAX_TOOLS`, a bad or duplicate
            name, an unknown `tool_choice` (or one naming a tool not offered), or a
            `tool_choice` other than "none" without tools.
    """
    if tools is not None:
        _check_tools(tools)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError(
            "parallel_tool_calls must be a boolean", param="parallel_tool_calls"
        )
    return resolve_tool_choice(tools, tool_choice)


def resolve_tool_choice(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None
) -> ToolChoice:
    """`tool_choice` as a `ToolChoice`: absent means "auto" with tools, "none" without.

    Raises:
        InvalidRequestError: as `validate_tools` does for `tool_choice`.
    """
    names = [tool["function"]["name"] for tool in tools or ()]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or "
                f'{{"type": "function", "function": {{"name": ...}}}}, not {tool_choice[:40]!r}',
                param="tool_choice",
            )
        choice = ToolChoice(tool_choice)
    elif isinstance(tool_choice, Mapping):
        if tool_choice.get("type") != "function":
            raise InvalidRequestError(
                "tool_choice.type must be 'function'", param="tool_choice.type"
            )
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                "tool_choice.function.name must be a string", param="tool_choice.function.name"
            )
        choice = ToolChoice("function", name)
    else:
        raise InvalidRequestError("tool_choice must be a string or an object", param="tool_choice")
    if choice.mode != "none" and not names:
        raise InvalidRequestError(
            f"tool_choice {choice.function or choice.mode!r} needs `tools`", param="tool_choice"
        )
    if choice.function is not None and choice.function not in names:
        raise InvalidRequestError(
            f"tool_choice names {choice.function[:80]!r}, which is not among `tools`",
            param="tool_choice.function.name",
        )
    return choice


def _check_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InvalidRequestError("tools must be an array", param="tools")
    if not tools:
        raise InvalidRequestError("tools must not be empty; omit it instead", param="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(
            f"at most {MAX_TOOLS} tools per request, got {len(tools)}", param="tools"
        )
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if tool.get("type") != "function":
            raise InvalidRequestError(f"{where}.type must be 'function'", param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequestError(
                f"{where}.function must be an object", param=f"{where}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.fullmatch(name):
            raise InvalidRequestError(
                f"{where}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise InvalidRequestError(
                f"{where}.function.name {name!r} repeats tools[{seen[name]}]",
                param=f"{where}.function.name",
            )
        seen[name] = i
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidRequestError(
                f"{where}.function.parameters must be a JSON schema object",
                param=f"{where}.function.parameters",
            )
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequestError(
                f"{where}.function.strict must be a boolean", param=f"{where}.function.strict"
            )
