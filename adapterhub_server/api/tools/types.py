"""The values the tool-call, reasoning and chat-output parsers produce.

Plain frozen dataclasses, independent of the HTTP schemas; `to_openai()` gives the OpenAI
wire dict where the API needs one.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChatOutput",
    "ContentDelta",
    "OutputDelta",
    "ParsedToolCalls",
    "ReasoningDelta",
    "ToolCall",
    "ToolCallDelta",
    "new_tool_call_id",
]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """`call_` + 24 random alphanumerics, the shape OpenAI's ids have."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One complete function call the model made."""

    id: str
    name: str
    arguments: str
    """The arguments object as a JSON string (`json.dumps(..., ensure_ascii=False)`)."""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `message.tool_calls[i]` dict."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ContentDelta:
    """Plain assistant text (never empty)."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the model's reasoning (`reasoning_content`; never empty)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the tool call number `index` in a stream.

    The first delta of a call carries `id` and `name` (and `arguments == ""`); later deltas
    carry only `arguments` fragments, whose concatenation is the call's arguments JSON.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `delta.tool_calls[i]` dict of a chat completion chunk."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


OutputDelta = ContentDelta | ReasoningDelta | ToolCallDelta


@dataclass(frozen=True)
class ParsedToolCalls:
    """A complete output split into content and calls."""

    content: str | None
    """The text that is not a call; None when there are calls and no other text."""
    calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_deltas(cls, deltas: Iterable[ContentDelta | ToolCallDelta]) -> ParsedToolCalls:
        """Accumulate a stream's deltas, as a client does."""
        output = ChatOutput.from_deltas(deltas)
        return cls(content=output.content, calls=output.tool_calls)


@dataclass(frozen=True)
class ChatOutput:
    """A complete chat output split into reasoning, content and calls."""

    reasoning: str | None
    """`reasoning_content`; None when the model did not reason (or reasoned nothing)."""
    content: str | None
    """None when there are calls and no other text."""
    tool_calls: tuple[ToolCall, ...] = field(default=())

    @classmethod
    def from_deltas(cls, deltas: Iterable[OutputDelta]) -> ChatOutput:
        """Accumulate a stream's deltas, as a client does."""
        reasoning: list[str] = []
        content: list[str] = []
        calls: dict[int, list[str]] = {}
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                content.append(delta.text)
            elif isinstance(delta, ReasoningDelta):
                reasoning.append(delta.text)
            elif delta.id is not None:
                calls[delta.index] = [delta.id, delta.name or "", delta.arguments]
            else:
                calls[delta.index][2] += delta.arguments
        tool_calls = tuple(ToolCall(*calls[i]) for i in sorted(calls))
        text = "".join(content)
        return cls(
            reasoning="".join(reasoning) or None,
            content=None if tool_calls and not text else text,
            tool_calls=tool_calls,
        )
