"""One chat output parsed into reasoning, content and tool calls, whole or streamed.

Reasoning is split first; only the content after it goes to the tool-call parser, so a call
the model only thought about is never made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterhub_server.api.reasoning import ReasoningParser, ReasoningSplit, ReasoningStream
from adapterhub_server.api.tools.forcing import calls_from_forced_output
from adapterhub_server.api.tools.parsers import ToolCallParser, ToolCallStream
from adapterhub_server.api.tools.types import (
    ChatOutput,
    ContentDelta,
    OutputDelta,
    ReasoningDelta,
    ToolCallDelta,
)

__all__ = ["ChatOutputParser", "ChatOutputStream", "ForcedCallParser", "ForcedCallStream"]


class ChatOutputParser:
    """Parses one request's chat output; either part may be absent."""

    def __init__(
        self,
        *,
        tool_parser: ToolCallParser | None = None,
        reasoning: ReasoningParser | None = None,
    ) -> None:
        """
        Args:
            tool_parser: from `make_tool_parser` when the request lets the model call tools
                (`RenderedChat.tool_parser` is set); None: no calls are parsed.
            reasoning: when the template marks reasoning (`RenderedChat.reasoning`), built with
                `RenderedChat.starts_in_reasoning`; None: no reasoning is split off.
        """
        self.tool_parser = tool_parser
        self.reasoning = reasoning

    def parse(self, text: str) -> ChatOutput:
        """Split a complete output (tool calls get new ids)."""
        stream = self.stream()
        return ChatOutput.from_deltas(stream.feed(text) + stream.finish())

    def stream(self) -> ChatOutputStream:
        """A fresh incremental parse of one output."""
        return ChatOutputStream(
            tools=self.tool_parser.stream() if self.tool_parser else None,
            reasoning=self.reasoning.stream() if self.reasoning else None,
        )


class ChatOutputStream:
    """`feed` each text delta, then `finish` once; both return the deltas that became
    certain, in order: `ReasoningDelta`, `ContentDelta`, `ToolCallDelta` (see
    `ToolCallStream` for the shape of a call's deltas)."""

    def __init__(self, *, tools: ToolCallStream | None, reasoning: ReasoningStream | None):
        self._tools = tools
        self._reasoning = reasoning

    def feed(self, text: str) -> list[OutputDelta]:
        if self._reasoning is None:
            return self._content(text, final=False)
        return self._split(self._reasoning.feed(text), final=False)

    def finish(self) -> list[OutputDelta]:
        if self._reasoning is None:
            return self._content("", final=True)
        return self._split(self._reasoning.finish(), final=True)

    def _split(self, split: ReasoningSplit, *, final: bool) -> list[OutputDelta]:
        out: list[OutputDelta] = [ReasoningDelta(split.reasoning)] if split.reasoning else []
        return out + self._content(split.content, final=final)

    def _content(self, text: str, *, final: bool) -> list[OutputDelta]:
        if self._tools is None:
            return [ContentDelta(text)] if text else []
        out: list[OutputDelta] = list(self._tools.feed(text)) if text else []
        if final:
            out += self._tools.finish()
        return out


class ForcedCallParser:
    """Reads an output decoded under `forcing.forced_call_schema` (tool_choice "required" or
    a named function): its calls, or the text as content when it is not a complete call
    (cut off by `max_tokens`)."""

    def __init__(
        self, tools: Sequence[Mapping[str, Any]], tool_choice: str | Mapping[str, Any]
    ) -> None:
        self._tools = tools
        self._tool_choice = tool_choice

    def parse(self, text: str) -> ChatOutput:
        calls = calls_from_forced_output(text, self._tools, self._tool_choice)
        if calls:
            return ChatOutput(reasoning=None, content=None, tool_calls=tuple(calls))
        return ChatOutput(reasoning=None, content=text or None)

    def stream(self) -> ForcedCallStream:
        return ForcedCallStream(self)


class ForcedCallStream:
    """Holds a forced output back until it ends: only a complete output is known to be a
    valid call, and a call already sent cannot be taken back as content. The calls then go
    out as `ToolCallStream` sends them (id and name first, then the arguments)."""

    def __init__(self, parser: ForcedCallParser) -> None:
        self._parser = parser
        self._text: list[str] = []

    def feed(self, text: str) -> list[OutputDelta]:
        self._text.append(text)
        return []

    def finish(self) -> list[OutputDelta]:
        output = self._parser.parse("".join(self._text))
        if not output.tool_calls:
            return [ContentDelta(output.content)] if output.content else []
        deltas: list[OutputDelta] = []
        for index, call in enumerate(output.tool_calls):
            deltas.append(ToolCallDelta(index, call.id, call.name, ""))
            deltas.append(ToolCallDelta(index, arguments=call.arguments))
        return deltas
