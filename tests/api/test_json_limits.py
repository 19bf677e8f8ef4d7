"""`json_limits.parse_json`: every limit exactly at and just past its bound."""

from __future__ import annotations

import json

import pytest

from adapterhub_server.json_limits import (
    MAX_DEPTH,
    MAX_INT,
    MAX_NUMBER_CHARS,
    MAX_VALUES,
    MIN_INT,
    JsonLimitError,
    check_text,
    parse_json,
)


@pytest.mark.parametrize(
    "text",
    [
        "[" * MAX_DEPTH + "]" * MAX_DEPTH,
        str(MAX_INT),
        str(MIN_INT),
        "0." + "1" * (MAX_NUMBER_CHARS - 2),
        '"\\ud83d\\ude00"',  # a surrogate pair is one valid character
        '"\\\\ud800"',  # an escaped backslash, then plain text
        '"a\\u2028b"',
        json.dumps([0] * MAX_VALUES),
        '{"k": [1, {"x": "é"}]}',
    ],
)
def test_accepted_at_the_bounds(text: str) -> None:
    assert parse_json(text) == json.loads(text)
    assert parse_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper"),
        ('{"a":' * MAX_DEPTH + "[]" + "}" * MAX_DEPTH, "nested deeper"),
        ("[" * 200_000, "nested deeper"),
        (str(MAX_INT + 1), "64 bits"),
        (f'[1, {{"k": {MIN_INT - 1}}}]', "64 bits"),
        ("1" * (MAX_NUMBER_CHARS + 1), "64 bits"),
        ("9" * 10_000, "digits"),
        ("0." + "1" * MAX_NUMBER_CHARS, "digits"),
        ("1e999", "out of range"),
        ("[NaN]", "not valid JSON"),
        ('{"a": -Infinity}', "not valid JSON"),
        ('"\\ud800"', "lone surrogate"),
        ('{"\\udc00": 1}', "lone surrogate"),
        ('["ok", ["x\\uDBFFy"]]', "lone surrogate"),
        (json.dumps([[0] * (MAX_VALUES // 2), [0] * (MAX_VALUES // 2)]), "values"),
        ('{"a": 1', "Expecting"),
    ],
)
def test_refused(text: str, reason: str) -> None:
    with pytest.raises(JsonLimitError, match=reason):
        parse_json(text)


def test_bytes_must_be_utf8_and_text_must_be_unicode() -> None:
    with pytest.raises(JsonLimitError, match="UTF-8"):
        parse_json(b'"\xed\xa0\x80"')  # an encoded surrogate
    with pytest.raises(JsonLimitError, match="lone surrogate"):
        parse_json('"\ud800"')  # a raw surrogate in text input (a decoded form field)
    with pytest.raises(JsonLimitError):
        check_text("x\udfff")
    check_text("plain ascii")
    check_text("ünïcödé \U0001f600")
