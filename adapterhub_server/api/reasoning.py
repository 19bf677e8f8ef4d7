"""Reasoning output: split `<think>...</think>` (Qwen3, DeepSeek-R1 style) from the answer.

Whether a model reasons this way is read from its chat template (`template_marks_reasoning`).
The opening `<think>` may come from the prompt (DeepSeek-R1's template ends its generation
prompt with it) or from the model (Qwen3); `prompt_opens_reasoning` tells which from the text
the generation prompt added.

Rules, the same for a complete output and for a stream in any chunking:

- The prompt opened a think block: everything up to `</think>` is reasoning (a `<think>`
  the model repeats at the very start is dropped); with no `</think>` (yet, or ever: the
  output was cut off) everything is reasoning.
- Otherwise the output is reasoning only when it starts (after whitespace) with `<think>`;
  then the same as above. An output that does not start with `<think>` is all content,
  verbatim.
- Whitespace between `</think>` and the answer is dropped; reasoning text is kept verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "THINK_END",
    "THINK_START",
    "ReasoningParser",
    "ReasoningSplit",
    "ReasoningStream",
    "prompt_opens_reasoning",
    "template_marks_reasoning",
]

THINK_START = "<think>"
THINK_END = "</think>"


def template_marks_reasoning(template_source: str | None) -> bool:
    """Whether a chat template uses `<think>...</think>` reasoning blocks."""
    if not template_source:
        return False
    return THINK_START in template_source and THINK_END in template_source


def prompt_opens_reasoning(generation_prompt: str) -> bool:
    """Whether the text a template's generation prompt added leaves a think block open.

    Pass only the generation prompt (the rendering with `add_generation_prompt=True` minus
    the one without), so that `<think>` written in a message does not count.
    """
    return generation_prompt.rfind(THINK_START) > generation_prompt.rfind(THINK_END)


@dataclass(frozen=True)
class ReasoningSplit:
    """Reasoning text and content text (of a whole output, or of one stream step)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Splits one request's output; `starts_in_reasoning` is `prompt_opens_reasoning(...)`."""

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    def parse(self, text: str) -> ReasoningSplit:
        """Split a complete output."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        return ReasoningSplit(first.reasoning + last.reasoning, first.content + last.content)

    def stream(self) -> ReasoningStream:
        """A fresh incremental split of one output."""
        return ReasoningStream(starts_in_reasoning=self.starts_in_reasoning)


_OPENING, _REASONING, _AFTER_END, _CONTENT = range(4)


class ReasoningStream:
    """An incremental split: `feed` each text delta, then `finish` once; each returns the
    reasoning and content text that became certain."""

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        self._in_prompt_block = starts_in_reasoning
        self._state = _OPENING
        self._buf = ""

    def feed(self, text: str) -> ReasoningSplit:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> ReasoningSplit:
        """Classify what is held back (a partial tag is text of the part it stands in)."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> ReasoningSplit:
        reasoning, content = "", ""
        while self._buf:
            buf = self._buf
            if self._state == _OPENING:
                stripped = buf.lstrip()
                if stripped.startswith(THINK_START):
                    self._buf = stripped[len(THINK_START) :]
                    self._state = _REASONING
                elif THINK_START.startswith(stripped) and not final:
                    break  # whitespace or a partial tag: wait
                else:
                    self._state = _REASONING if self._in_prompt_block else _CONTENT
            elif self._state == _REASONING:
                end = buf.find(THINK_END)
                if end >= 0:
                    reasoning += buf[:end]
                    self._buf = buf[end + len(THINK_END) :]
                    self._state = _AFTER_END
                    continue
                keep = 0 if final else _partial_suffix(buf, THINK_END)
                reasoning += buf[: len(buf) - keep]
                self._buf = buf[len(buf) - keep :]
                break
            elif self._state == _AFTER_END:
                self._buf = buf.lstrip()
                if self._buf:
                    self._state = _CONTENT
            else:
                content += buf
                self._buf = ""
        return ReasoningSplit(reasoning, content)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
