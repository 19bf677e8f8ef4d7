"""Tool-call parsers: turn model output text into content and function calls, whole or
streamed.

One parser per output convention:

- `hermes` (Hermes 2 Pro, Qwen2.5/Qwen3, and the block this server adds to templates that
  do not render tools): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number,
  anywhere; text around them is content. A block whose closing tag never came still counts
  when what follows the opening tag is exactly one valid call (models often stop right
  after the JSON).
- `llama3_json` (Llama 3.1/3.2/3.3 JSON tool calling): the output starts (after an optional
  `<|python_tag|>`) with `{"name": ..., "parameters": {...}}`; more calls may follow,
  separated by `;`. Text after the calls is content; an output that does not start with a
  call is all content.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
  `[TOOL_CALLS]name[ARGS]{...}` (v11+), anywhere; text before is content.

Rules shared by all of them:

- A call must be a JSON object with a `name` among the offered tools and an object (or a
  JSON string holding one) as `arguments` (or `parameters`; absent or null means `{}`).
  Anything else, including a call to a tool that was not offered, stays content, verbatim:
  the client sees what the model wrote instead of a call it cannot dispatch, and nothing the
  model wrote is dropped.
- `arguments` is re-serialized with `json.dumps(..., ensure_ascii=False)`; NaN and Infinity
  are not JSON and make a call malformed.
- Whitespace that touches a call is dropped from the content around it (the newlines
  between `</tool_call>` and the next `<tool_call>`); an output without calls is returned
  exactly as written. Content is None when there are calls and no other text.
- With `parallel_tool_calls=False` only the first call is a call; later ones stay content.

Streaming emits a call only when its text is complete, because only then can it be
validated, and a call once sent cannot be taken back as content. Content is emitted as soon
as it cannot be the start of a call marker. `parse(text)` runs the same stream over the
whole text at once, so a stream's accumulated deltas equal `parse` for any chunking.

The parsers read text, so markers must survive detokenization: Mistral's `[TOOL_CALLS]` and
`[ARGS]` are special tokens in its tokenizers and vanish with `skip_special_tokens=True`
(Qwen's `<tool_call>` is an ordinary added token; llama3_json works with or without
`<|python_tag|>`).
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from adapterhub_server.api.tools.types import (
    ContentDelta,
    ParsedToolCalls,
    ToolCallDelta,
    new_tool_call_id,
)

__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ToolCallParser",
    "ToolCallStream",
    "call_from_json",
    "loads_strict",
    "make_tool_parser",
]


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str


@dataclass(frozen=True)
class _Step:
    """What the next `length` characters of the buffer are."""

    length: int
    calls: tuple[_Call, ...] = ()
    """Empty: the characters are content."""
    rest_is_content: bool = False
    """Everything from here to the end of the output is content (llama3_json)."""


@dataclass(frozen=True)
class _ScanState:
    calls: int
    """Calls parsed so far (including ones turned into content by the call limit)."""


class ToolCallParser(ABC):
    """Parses one output convention, for one request's offered tools.

    `parse` handles a complete output; `stream()` starts an incremental parse.
    """

    name: ClassVar[str]

    def __init__(self, tool_names: Iterable[str], *, parallel_tool_calls: bool = True) -> None:
        """
        Args:
            tool_names: the names of the offered tools; calls to other names stay content.
            parallel_tool_calls: False: only the first call is a call (OpenAI's "at most one").
        """
        self.tool_names = frozenset(tool_names)
        self.max_calls: int | None = None if parallel_tool_calls else 1

    def parse(self, text: str) -> ParsedToolCalls:
        """Split a complete output into content and calls (new ids)."""
        stream = self.stream()
        return ParsedToolCalls.from_deltas(stream.feed(text) + stream.finish())

    def stream(self) -> ToolCallStream:
        """A fresh incremental parse of one output."""
        return ToolCallStream(self)

    @abstractmethod
    def _scan(self, buf: str, state: _ScanState, *, final: bool) -> _Step | None:
        """Classify a non-empty prefix of `buf`, or return None when that needs more text.

        The answer for a prefix must not change when more text arrives; with `final` there
        is no more text and the answer must not be None.
        """

    def _call(self, obj: Any) -> _Call | None:
        """The call a decoded JSON value stands for, or None when it is not a valid call."""
        parsed = call_from_json(obj, self.tool_names)
        return _Call(*parsed) if parsed is not None else None

    def _calls_in(self, text: str) -> tuple[_Call, ...]:
        """The calls a JSON object or array of objects stands for; () unless all are valid."""
        value = loads_strict(text)
        items = value if isinstance(value, list) else [value]
        calls = [self._call(item) for item in items]
        valid = tuple(c for c in calls if c is not None)
        return valid if calls and len(valid) == len(calls) else ()


class ToolCallStream:
    """An incremental parse of one output: `feed` each text delta, then `finish` once.

    Both return the deltas that became certain: `ContentDelta`s and, per call, a
    `ToolCallDelta` with `index`, `id` and `name` (and `arguments == ""`), then one with the
    whole `arguments`.
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self._buf = ""
        self._calls = 0
        self._emitted_calls = 0
        self._rest_is_content = False
        self._after_call = False
        """Drop whitespace until the next content character (it touches a call)."""
        self._pending_ws = ""
        """Trailing whitespace of the content so far, held back in case a call follows."""
        self._finished = False

    def feed(self, text: str) -> list[ContentDelta | ToolCallDelta]:
        if self._finished:
            raise RuntimeError("feed after finish")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[ContentDelta | ToolCallDelta]:
        """Classify what is left (an unfinished call becomes content)."""
        if self._finished:
            return []
        out = self._drain(final=True)
        self._finished = True
        if self._pending_ws:
            out.append(ContentDelta(self._pending_ws))
            self._pending_ws = ""
        return out

    def _drain(self, *, final: bool) -> list[ContentDelta | ToolCallDelta]:
        out: list[ContentDelta | ToolCallDelta] = []
        while self._buf:
            if self._rest_is_content:
                step: _Step | None = _Step(len(self._buf))
            else:
                step = self._parser._scan(self._buf, _ScanState(self._calls), final=final)
            if step is None:
                break
            assert 0 < step.length <= len(self._buf), step
            text, self._buf = self._buf[: step.length], self._buf[step.length :]
            self._rest_is_content = self._rest_is_content or step.rest_is_content
            calls = step.calls
            if calls:
                self._calls += len(calls)
                limit = self._parser.max_calls
                if limit is not None and self._emitted_calls + len(calls) > limit:
                    calls = ()
            if calls:
                self._pending_ws = ""
                self._after_call = True
                for call in calls:
                    index = self._emitted_calls
                    self._emitted_calls += 1
                    out.append(ToolCallDelta(index, id=new_tool_call_id(), name=call.name))
                    out.append(ToolCallDelta(index, arguments=call.arguments))
            else:
                self._content(text, out)
        return out

    def _content(self, text: str, out: list[ContentDelta | ToolCallDelta]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = text[len(body) :]
        if body:
            out.append(ContentDelta(body))


class HermesToolParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks."""

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"

    def _scan(self, buf: str, state: _ScanState, *, final: bool) -> _Step | None:
        start = buf.find(self.START)
        if start < 0:
            return _content_before_marker(buf, self.START, final=final)
        if start > 0:
            return _Step(start)
        end = buf.find(self.END, len(self.START))
        if end < 0:
            if not final:
                return None
            return _Step(len(buf), self._calls_in_block(buf[len(self.START) :]))
        length = end + len(self.END)
        return _Step(length, self._calls_in_block(buf[len(self.START) : end]))

    def _calls_in_block(self, block: str) -> tuple[_Call, ...]:
        call = self._call(loads_strict(block))
        return (call,) if call is not None else ()


class Llama3JsonToolParser(ToolCallParser):
    """Llama 3.x JSON calls: `[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]`."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    _SEPARATOR = re.compile(r"\s*(?:;\s*)?")

    def _scan(self, buf: str, state: _ScanState, *, final: bool) -> _Step | None:
        everything = _Step(len(buf), rest_is_content=True)
        if state.calls == 0:
            pos = _skip_ws(buf, 0)
            if buf.startswith(self.PYTHON_TAG, pos):
                pos = _skip_ws(buf, pos + len(self.PYTHON_TAG))
            elif self.PYTHON_TAG.startswith(buf[pos:]):  # empty or a partial tag
                return everything if final else None
        else:
            pos = self._SEPARATOR.match(buf).end()
        if pos == len(buf):
            return everything if final else None
        if buf[pos] != "{":
            return everything
        end = _json_end(buf, pos)
        if end is None:
            return everything if final else None
        call = self._call(loads_strict(buf[pos:end]))
        if call is None:
            return everything
        return _Step(end, (call,))


class MistralToolParser(ToolCallParser):
    """`[TOOL_CALLS][{...}, ...]` (v3) or `[TOOL_CALLS]name[ARGS]{...}` (v11+)."""

    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    _NAME = re.compile(r"[A-Za-z0-9_.-]*")

    def _scan(self, buf: str, state: _ScanState, *, final: bool) -> _Step | None:
        start = buf.find(self.MARKER)
        if start < 0:
            return _content_before_marker(buf, self.MARKER, final=final)
        if start > 0:
            return _Step(start)
        pos = _skip_ws(buf, len(self.MARKER))
        if pos == len(buf):
            return _Step(len(buf)) if final else None
        if buf[pos] in "[{":
            end = _json_end(buf, pos)
            if end is None:
                return _Step(len(buf)) if final else None
            return _Step(end, self._calls_in(buf[pos:end]))
        name_end = self._NAME.match(buf, pos).end()
        rest = buf[name_end:]
        if len(rest) < len(self.ARGS) and self.ARGS.startswith(rest):
            return _Step(len(buf)) if final else None
        if name_end == pos or not rest.startswith(self.ARGS):
            return _Step(len(self.MARKER))  # not a call: the marker is text, go on after it
        args_start = _skip_ws(buf, name_end + len(self.ARGS))
        if args_start == len(buf):
            return _Step(len(buf)) if final else None
        if buf[args_start] != "{":
            return _Step(args_start)
        end = _json_end(buf, args_start)
        if end is None:
            return _Step(len(buf)) if final else None
        args = loads_strict(buf[args_start:end])
        call = self._call({"name": buf[pos:name_end], "arguments": args})
        return _Step(end, (call,) if call is not None and isinstance(args, dict) else ())


TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
"""The `--tool-call-parser` choices besides `auto`."""


def make_tool_parser(
    name: str, tool_names: Iterable[str], *, parallel_tool_calls: bool = True
) -> ToolCallParser:
    """The parser called `name` (a key of `TOOL_PARSERS`) for one request's tools.

    Raises:
        ValueError: unknown parser name.
    """
    try:
        cls = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}"
        ) from None
    return cls(tool_names, parallel_tool_calls=parallel_tool_calls)


def call_from_json(obj: Any, tool_names: frozenset[str]) -> tuple[str, str] | None:
    """`(name, arguments JSON)` of a decoded call object, or None when it is not a valid call.

    A valid call is an object whose `name` is in `tool_names` and whose `arguments` (or
    `parameters`) is an object or a JSON string holding one; absent or null means `{}`.
    """
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in tool_names:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        args = {}
    if isinstance(args, str):
        args = loads_strict(args)
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _content_before_marker(buf: str, marker: str, *, final: bool) -> _Step | None:
    """`buf` has no whole `marker`: all of it is content except an end that may begin one."""
    if final:
        return _Step(len(buf))
    keep = _partial_suffix(buf, marker)
    return _Step(len(buf) - keep) if keep < len(buf) else None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# A JSON string (group 1 is its closing quote, absent while unterminated) or a bracket.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(")?|[{}\[\]]', re.DOTALL)


def _json_end(text: str, start: int) -> int | None:
    """The end of the bracketed JSON value that starts at `text[start]` (`{` or `[`), or None
    while it is not closed yet. Brackets inside strings do not count; whether the value is
    valid JSON is for the decoder to say."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, start):
        token = match.group(0)
        if token[0] == '"':
            if match.group(1) is None:
                return None
            continue
        depth += 1 if token in "{[" else -1
        if depth == 0:
            return match.end()
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: json.dumps would write Infinity
        raise ValueError(f"{text} does not fit a double")
    return value


def loads_strict(text: str) -> Any:
    """The decoded JSON value, or None when `text` is not strict JSON (NaN, Infinity and
    numbers beyond a double are not: they would come out as invalid JSON again)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
