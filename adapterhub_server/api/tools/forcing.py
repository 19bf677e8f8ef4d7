"""Forced tool calls (`tool_choice: "required"` or a named function): the JSON schema the
output is decoded under, and the calls that output stands for.

The model does not write its own call syntax here: a grammar engine constrains decoding to
the schema, as vLLM does for these two choices.

- a named function: the output is the function's arguments object;
- "required": the output is `[{"name": ..., "arguments": {...}}, ...]`, at least one call
  and exactly one when `parallel_tool_calls` is false.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterhub_server.api.tools.parsers import call_from_json, loads_strict
from adapterhub_server.api.tools.types import ToolCall, new_tool_call_id
from adapterhub_server.api.tools.validation import resolve_tool_choice

__all__ = ["calls_from_forced_output", "forced_call_schema"]

_DEFS_KEYS = ("$defs", "definitions")


def forced_call_schema(
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any],
    parallel_tool_calls: bool = True,
) -> dict[str, Any]:
    """The JSON schema the output must match for a forced `tool_choice`.

    `tools` must have passed `validate_tools`. For "required", a tool's `$defs` (or
    `definitions`) move to the root as `<tool name>.<def>` and its `$ref`s follow, so that
    pydantic-made schemas keep resolving once nested in the array.

    Raises:
        ValueError: `tool_choice` is not forced ("none" or "auto").
    """
    choice = resolve_tool_choice(tools, tool_choice)
    by_name = {tool["function"]["name"]: tool["function"] for tool in tools}
    if choice.mode == "function":
        return _parameters(by_name[choice.function])
    if choice.mode != "required":
        raise ValueError(f"tool_choice {choice.mode!r} does not force a call")
    defs: dict[str, Any] = {}
    alternatives = []
    for name, function in by_name.items():
        params = _parameters(function)
        if _has_ref(params):
            for key in _DEFS_KEYS:
                for def_name, sub in (params.get(key) or {}).items():
                    defs[f"{name}.{def_name}"] = _rewrite_refs(sub, name)
            defs[name] = _rewrite_refs(
                {k: v for k, v in params.items() if k not in _DEFS_KEYS}, name
            )
            params = {"$ref": f"#/$defs/{name}"}
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"anyOf": alternatives},
        "minItems": 1,
    }
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def calls_from_forced_output(
    text: str,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any],
) -> list[ToolCall]:
    """The calls an output decoded under `forced_call_schema` stands for (new ids).

    Returns [] when the text is not a complete valid output (it was cut off by `max_tokens`
    or a stop string); the caller then returns the text as content.

    Raises:
        ValueError: `tool_choice` is not forced ("none" or "auto").
    """
    choice = resolve_tool_choice(tools, tool_choice)
    names = frozenset(tool["function"]["name"] for tool in tools)
    if choice.mode == "function":
        items: Any = [{"name": choice.function, "arguments": loads_strict(text)}]
    elif choice.mode == "required":
        items = loads_strict(text)
    else:
        raise ValueError(f"tool_choice {choice.mode!r} does not force a call")
    if not isinstance(items, list) or not items:
        return []
    calls = []
    for item in items:
        parsed = call_from_json(item, names)
        if parsed is None or not isinstance(item.get("arguments"), dict):
            return []
        calls.append(ToolCall(new_tool_call_id(), *parsed))
    return calls


def _parameters(function: Mapping[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return dict(params) if params else {"type": "object"}


def _has_ref(node: Any) -> bool:
    if isinstance(node, Mapping):
        return "$ref" in node or any(_has_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_ref(v) for v in node)
    return False


def _rewrite_refs(node: Any, tool: str) -> Any:
    """A copy of `node` whose local `$ref`s point at the tool's definitions in the root."""
    if isinstance(node, Mapping):
        return {
            k: _moved_ref(v, tool) if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, tool)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v, tool) for v in node]
    return node


def _moved_ref(ref: str, tool: str) -> str:
    if ref == "#":
        return f"#/$defs/{tool}"
    for key in _DEFS_KEYS:
        prefix = f"#/{key}/"
        if ref.startswith(prefix):
            return f"#/$defs/{tool}.{ref[len(prefix) :]}"
    if ref.startswith("#/"):  # any other pointer into the tool's own schema
        return f"#/$defs/{tool}{ref[1:]}"
    return ref
