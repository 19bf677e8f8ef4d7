"""Reasoning split (`<think>...</think>`), whole and streamed, alone and with tool calls, and
its detection from chat templates."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest

from adapterhub_server.api.reasoning import (
    ReasoningParser,
    ReasoningSplit,
    prompt_opens_reasoning,
    template_marks_reasoning,
)
from adapterhub_server.api.tools import (
    ChatOutput,
    ChatOutputParser,
    make_tool_parser,
    render_conversation,
)
from tests.api.fake_engine import shared_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"

# (prompt opened a think block, output, expected reasoning, expected content)
CASES = [
    (  # Qwen3: the model opens the block itself
        False,
        "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.",
        "\nThe user wants 2+2. That is 4.\n",
        "The answer is 4.",
    ),
    (False, "The answer is 4.", "", "The answer is 4."),
    (False, "  \n<think>short</think>ok", "short", "ok"),
    (False, "<think>cut off by max_tokens", "cut off by max_tokens", ""),
    (False, "<thinking> is not the tag", "", "<thinking> is not the tag"),
    (False, "Use <think> tags later", "", "Use <think> tags later"),
    (False, "\n\n", "", "\n\n"),
    (False, "", "", ""),
    (False, "<thi", "", "<thi"),
    # DeepSeek-R1: the template's generation prompt ends with <think>
    (True, "Okay, 3 * 7 = 21.\n</think>\n\n**21**", "Okay, 3 * 7 = 21.\n", "**21**"),
    (True, "<think>\nrepeated opening tag</think>answer", "\nrepeated opening tag", "answer"),
    (True, "still thinking when cut off", "still thinking when cut off", ""),
    (True, "a </thin b </think> c </think> d", "a </thin b ", "c </think> d"),
    (True, "思考：东京 🌧</think>答案：是", "思考：东京 🌧", "答案：是"),
    (True, "</think>", "", ""),
    (True, "ends in a partial </thi", "ends in a partial </thi", ""),
]


def _chunkings(text: str, seed: int) -> list[list[str]]:
    out = [list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    rng = random.Random(seed)
    for _ in range(20):
        chunks, pos = [], 0
        while pos < len(text):
            size = rng.randint(1, 6)
            chunks.append(text[pos : pos + size])
            pos += size
        out.append(chunks)
    return out


@pytest.mark.parametrize(("opened", "text", "reasoning", "content"), CASES)
def test_split_recorded_outputs(opened, text, reasoning, content):
    assert ReasoningParser(starts_in_reasoning=opened).parse(text) == ReasoningSplit(
        reasoning, content
    )


@pytest.mark.parametrize(("opened", "text", "reasoning", "content"), CASES)
def test_stream_equals_parse_in_every_chunking(opened, text, reasoning, content):
    for chunks in _chunkings(text, seed=len(text)):
        stream = ReasoningParser(starts_in_reasoning=opened).stream()
        parts = [stream.feed(c) for c in chunks] + [stream.finish()]
        assert "".join(p.reasoning for p in parts) == reasoning, chunks
        assert "".join(p.content for p in parts) == content, chunks


def test_reasoning_streams_before_the_block_closes():
    stream = ReasoningParser(starts_in_reasoning=False).stream()
    assert stream.feed("<thi") == ReasoningSplit()
    assert stream.feed("nk>Let me") == ReasoningSplit(reasoning="Let me")
    assert stream.feed(" see.</") == ReasoningSplit(reasoning=" see.")
    assert stream.feed("think>\n") == ReasoningSplit()
    assert stream.feed("Yes.") == ReasoningSplit(content="Yes.")
    assert stream.finish() == ReasoningSplit()


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_template_marks_reasoning():
    assert template_marks_reasoning((TEMPLATES / "qwen3.jinja").read_text())
    assert template_marks_reasoning((TEMPLATES / "deepseek_r1.jinja").read_text())
    assert not template_marks_reasoning((TEMPLATES / "qwen2_5.jinja").read_text())
    assert not template_marks_reasoning(shared_tokenizer().chat_template)
    assert not template_marks_reasoning(None)


# --- reasoning and tool calls together ----------------------------------------------------

QWEN3_OUTPUT = (
    "<think>\nThe user asks for Paris weather. I could write "
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> but weather fits.\n</think>\n\n'
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call>"
)


def _output_parser(opened: bool) -> ChatOutputParser:
    return ChatOutputParser(
        tool_parser=make_tool_parser("hermes", ["get_weather", "get_time"]),
        reasoning=ReasoningParser(starts_in_reasoning=opened),
    )


def test_calls_are_parsed_only_after_reasoning():
    output = _output_parser(False).parse(QWEN3_OUTPUT)
    assert output.reasoning.startswith("\nThe user asks") and "get_time" in output.reasoning
    assert output.content == "Checking."
    assert [(c.name, c.arguments) for c in output.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]


@pytest.mark.parametrize("opened", [False, True])
def test_output_stream_equals_parse_in_every_chunking(opened):
    text = QWEN3_OUTPUT if not opened else QWEN3_OUTPUT.removeprefix("<think>")
    expected = _output_parser(opened).parse(text)

    def summary(out: ChatOutput):
        return out.reasoning, out.content, [(c.name, c.arguments) for c in out.tool_calls]

    for chunks in _chunkings(text, seed=3)[:: 7 if len(text) > 100 else 1]:
        stream = _output_parser(opened).stream()
        deltas = [d for c in chunks for d in stream.feed(c)] + stream.finish()
        assert summary(ChatOutput.from_deltas(deltas)) == summary(expected), chunks


def test_output_parser_without_parts_is_plain_content():
    parser = ChatOutputParser()
    assert parser.parse("<think>x</think><tool_call>{}</tool_call>") == ChatOutput(
        reasoning=None, content="<think>x</think><tool_call>{}</tool_call>"
    )


# --- detection through rendering ------------------------------------------------------------


def _with_template(name: str):
    tokenizer = copy.copy(shared_tokenizer())
    tokenizer.chat_template = (TEMPLATES / name).read_text()
    return tokenizer


USER = [{"role": "user", "content": "What is 2+2?"}]


def test_qwen3_model_opens_the_block_itself():
    rendered = render_conversation(_with_template("qwen3.jinja"), USER)
    assert rendered.reasoning and not rendered.starts_in_reasoning
    assert rendered.prompt.endswith("<|im_start|>assistant\n")


def test_qwen3_enable_thinking_false_closes_the_block_in_the_prompt():
    rendered = render_conversation(
        _with_template("qwen3.jinja"), USER, chat_template_kwargs={"enable_thinking": False}
    )
    assert rendered.prompt.endswith("<think>\n\n</think>\n\n")
    assert rendered.reasoning and not rendered.starts_in_reasoning


def test_deepseek_r1_prompt_opens_the_block():
    rendered = render_conversation(_with_template("deepseek_r1.jinja"), USER)
    assert rendered.prompt.endswith("<think>\n")
    assert rendered.reasoning and rendered.starts_in_reasoning


def test_a_think_tag_in_a_message_does_not_open_the_block():
    """Only the generation prompt counts, not `<think>` written by the user."""
    messages = [{"role": "user", "content": "What does <think> mean in your output?"}]
    rendered = render_conversation(_with_template("qwen3.jinja"), messages)
    assert rendered.prompt.rfind("<think>") > rendered.prompt.rfind("</think>")
    assert not rendered.starts_in_reasoning


def test_no_reasoning_for_plain_templates():
    rendered = render_conversation(shared_tokenizer(), USER)
    assert not rendered.reasoning and not rendered.starts_in_reasoning
