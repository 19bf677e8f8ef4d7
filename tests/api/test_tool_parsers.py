"""Tool-call parsers on recorded model outputs, and streamed parsing in every chunking."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_server.api.tools import (
    TOOL_PARSERS,
    ContentDelta,
    ParsedToolCalls,
    ToolCallDelta,
    make_tool_parser,
)

TOOLS = ("get_weather", "get_time", "search_products")

WEATHER_PARIS = {"city": "Paris", "unit": "celsius"}
NESTED = {
    "query": {
        "filters": [{"field": "price", "op": "<", "value": 10.5}, {"field": "tag", "in": ["a"]}],
        "text": 'braces {inside} and [brackets] and a "quote" and </tool_call-ish',
    },
    "limit": 5,
    "exact": False,
    "cursor": None,
}
UNICODE = {"city": "São Paulo", "note": "東京 🌧 naïve"}

# (parser, model output, expected content, expected [(name, arguments object)])
CASES = [
    # --- hermes (Qwen2.5 / Hermes 2 Pro / Qwen3 after </think>) --------------------------
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>",
        None,
        [("get_weather", WEATHER_PARIS)],
    ),
    (
        "hermes",
        "I'll check both cities for you.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        "I'll check both cities for you.",
        [("get_weather", WEATHER_PARIS), ("get_weather", {"city": "Tokyo"})],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "S\\u00e3o Paulo", '
        '"note": "東京 🌧 naïve"}}\n</tool_call>',
        None,
        [("get_weather", UNICODE)],
    ),
    (
        "hermes",
        "<tool_call>\n"
        + json.dumps({"name": "search_products", "arguments": NESTED})
        + "\n</tool_call>",
        None,
        [("search_products", NESTED)],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>\n\n'
        "Let me know if you need anything else.",
        "Let me know if you need anything else.",
        [("get_time", {"tz": "Europe/Paris"})],
    ),
    # The model stopped right after the JSON, without </tool_call>.
    (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n',
        None,
        [("get_time", {"tz": "UTC"})],
    ),
    # Arguments given as a JSON string, and as "parameters"; absent arguments mean {}.
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
        '<tool_call>{"name": "get_time", "parameters": {"tz": "UTC"}}</tool_call>'
        '<tool_call>{"name": "get_time"}</tool_call>',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"}), ("get_time", {})],
    ),
    # A malformed call stays content verbatim; the valid one after it is still a call.
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        [("get_time", {})],
    ),
    (  # unknown tool
        "hermes",
        '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        [],
    ),
    (  # cut off by max_tokens
        "hermes",
        '<tool_call>\n{"name": "get_weather", "argu',
        '<tool_call>\n{"name": "get_weather", "argu',
        [],
    ),
    (  # NaN is not JSON; arguments must be an object
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"t": NaN}}</tool_call> '
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"t": NaN}}</tool_call> '
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        [],
    ),
    (  # no calls: content exactly as written, whitespace and tag look-alikes included
        "hermes",
        "  Use the <tools> tag, or <tool_calls>; not <tool_call\n",
        "  Use the <tools> tag, or <tool_calls>; not <tool_call\n",
        [],
    ),
    ("hermes", "", "", []),
    # --- llama3_json (Llama 3.1 / 3.2 / 3.3) ----------------------------------------------
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER_PARIS)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "search_products", "parameters": ' + json.dumps(NESTED) + "}",
        None,
        [("search_products", NESTED)],
    ),
    (
        "llama3_json",
        '\n\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}',
        None,
        [("get_weather", WEATHER_PARIS), ("get_time", {"tz": "Asia/Tokyo"})],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "S\\u00e3o Paulo", "note": "東京 🌧 naïve"}}'
        "\n\nI looked up the weather.",
        "I looked up the weather.",
        [("get_weather", UNICODE)],
    ),
    (  # a later object that is no call ends the calls: the rest is content
        "llama3_json",
        '{"name": "get_time", "parameters": {}}; {"answer": 42}',
        '; {"answer": 42}',
        [("get_time", {})],
    ),
    (  # JSON that is not a call: all content
        "llama3_json",
        '{"answer": 42, "name": "not a tool"}',
        '{"answer": 42, "name": "not a tool"}',
        [],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}',
        [],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "unknown_tool", "parameters": {}}',
        '<|python_tag|>{"name": "unknown_tool", "parameters": {}}',
        [],
    ),
    (  # calls only count at the start of the output
        "llama3_json",
        'Here you go: {"name": "get_time", "parameters": {}}',
        'Here you go: {"name": "get_time", "parameters": {}}',
        [],
    ),
    ("llama3_json", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("llama3_json", "<|python", "<|python", []),
    # --- mistral --------------------------------------------------------------------------
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        None,
        [("get_weather", WEATHER_PARIS)],
    ),
    (
        "mistral",
        'Let me look that up. [TOOL_CALLS] [{"name": "get_weather", "arguments": '
        '{"city": "S\\u00e3o Paulo", "note": "東京 🌧 naïve"}}, '
        '{"name": "search_products", "arguments": ' + json.dumps(NESTED) + "}]",
        "Let me look that up.",
        [("get_weather", UNICODE), ("search_products", NESTED)],
    ),
    (  # v11+ tokenizers: name[ARGS]{...}, one marker per call
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
        None,
        [("get_weather", WEATHER_PARIS), ("get_time", {"tz": "Europe/Paris"})],
    ),
    (  # one unknown name: the whole array stays content
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}, {"name": "rm", "arguments": {}}]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}, {"name": "rm", "arguments": {}}]',
        [],
    ),
    (  # brackets that never close (cut off, or mismatched)
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}]',
        [],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",}',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",}',
        [],
    ),
    (
        "mistral",
        "[TOOL_CALLS] is the marker Mistral uses; [ARGS] follows a name.",
        "[TOOL_CALLS] is the marker Mistral uses; [ARGS] follows a name.",
        [],
    ),
    ("mistral", "Bonjour ! Il fait 21 °C à Paris.", "Bonjour ! Il fait 21 °C à Paris.", []),
]

CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
ID_PATTERN = re.compile(r"call_[A-Za-z0-9]{24}")


def _summary(parsed: ParsedToolCalls) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


def _stream(parser_name: str, chunks: list[str], **kwargs) -> list[ContentDelta | ToolCallDelta]:
    stream = make_tool_parser(parser_name, TOOLS, **kwargs).stream()
    deltas = []
    for chunk in chunks:
        deltas += stream.feed(chunk)
    return deltas + stream.finish()


def _chunkings(text: str, seed: int) -> list[list[str]]:
    """Single characters, every split in two, and random chunk sizes."""
    out = [list(text)]
    out += [[text[:i], text[i:]] for i in range(len(text) + 1)]
    rng = random.Random(seed)
    for _ in range(20):
        chunks, pos = [], 0
        while pos < len(text):
            size = rng.randint(1, 12)
            chunks.append(text[pos : pos + size])
            pos += size
        out.append(chunks)
    return out


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=CASE_IDS)
def test_parse_recorded_outputs(parser, text, content, calls):
    parsed = make_tool_parser(parser, TOOLS).parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    # arguments are re-serialized as json.dumps does, unicode kept as characters
    assert [c.arguments for c in parsed.calls] == [
        json.dumps(args, ensure_ascii=False) for _, args in calls
    ]
    assert all(ID_PATTERN.fullmatch(c.id) for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=CASE_IDS)
def test_stream_equals_parse_in_every_chunking(parser, text, content, calls):
    expected = _summary(make_tool_parser(parser, TOOLS).parse(text))
    for chunks in _chunkings(text, seed=len(text)):
        deltas = _stream(parser, chunks)
        assert _summary(ParsedToolCalls.from_deltas(deltas)) == expected, chunks


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=CASE_IDS)
def test_stream_delta_shape(parser, text, content, calls):
    deltas = _stream(parser, list(text))
    seen: dict[int, str] = {}
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            assert delta.text
            continue
        if delta.index not in seen:
            # a call opens with its id and name, indices count up from 0
            assert delta.index == len(seen)
            assert ID_PATTERN.fullmatch(delta.id) and delta.name in TOOLS
            assert delta.arguments == ""
            assert delta.to_openai() == {
                "index": delta.index,
                "id": delta.id,
                "type": "function",
                "function": {"name": delta.name, "arguments": ""},
            }
            seen[delta.index] = delta.id
        else:
            assert delta.id is None and delta.name is None
            assert delta.to_openai() == {
                "index": delta.index,
                "function": {"arguments": delta.arguments},
            }
    assert len(seen) == len(calls)


def test_content_streams_before_the_output_ends():
    """Text that cannot start a marker goes out at once; a partial marker waits."""
    stream = make_tool_parser("hermes", TOOLS).stream()
    assert stream.feed("Checking the weather ") == [ContentDelta("Checking the weather")]
    assert stream.feed("now.\n<tool_") == [ContentDelta(" now.")]
    assert stream.feed('call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n') == []
    deltas = stream.feed("</tool_call>")
    assert [d.name for d in deltas if isinstance(d, ToolCallDelta) and d.id] == ["get_weather"]
    assert stream.finish() == []


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    second = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        + second
    )
    parsed = make_tool_parser("hermes", TOOLS, parallel_tool_calls=False).parse(text)
    assert [c.name for c in parsed.calls] == ["get_weather"]
    assert parsed.content == second
    for chunks in _chunkings(text, seed=1)[:40]:
        deltas = _stream("hermes", chunks, parallel_tool_calls=False)
        assert _summary(ParsedToolCalls.from_deltas(deltas)) == _summary(parsed)


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_tool_parser("pythonic", TOOLS)


_FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool", "_call>", "</tool_", "\n", " "],
    "llama3_json": ["<|python_tag|>", "<|py", ";", "; ", "\n", " "],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "[ARGS]", "get_weather", "[", "]", "\n", " "],
}
_COMMON = [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"name": "get_time", "parameters": {"tz": "UTC"}}',
    '{"name": "nope", "arguments": {}}',
    '{"city": "Lyon"}',
    "{",
    "}",
    '"',
    '\\"',
    "Hello, world.",
    "é🌧",
]


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_stream_equals_parse(parser, data):
    """Random mixes of markers, JSON and text: no exception, and chunking never matters."""
    pieces = data.draw(st.lists(st.sampled_from(_FRAGMENTS[parser] + _COMMON), max_size=12))
    text = "".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    expected = make_tool_parser(parser, TOOLS).parse(text)
    assert _summary(ParsedToolCalls.from_deltas(_stream(parser, chunks))) == _summary(expected)
    if not expected.calls:
        assert expected.content == text  # nothing the model wrote is lost


def test_the_serve_flag_offers_every_parser() -> None:
    from adapterhub_server.config import TOOL_CALL_PARSERS, ServerConfig

    assert set(TOOL_CALL_PARSERS) == {"auto", *TOOL_PARSERS}
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="xml")
