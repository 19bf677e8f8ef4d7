"""JSON parsing with the limits every untrusted document gets: request bodies, form fields,
JSONL lines, uploaded configs.

Python's `json` accepts what breaks code downstream: lone surrogates (`"\\ud800"`) that
cannot be encoded again (a stored record that then fails every listing), nesting deep enough
to raise `RecursionError`, integers of thousands of digits (slow to convert, and overflowing
every int64 they reach), `1e999` (infinity) and the `NaN` / `Infinity` constants. Here each
of those is a `JsonLimitError` naming the problem, which callers turn into a 400.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted (the top-level value is depth 1)."""
MAX_NUMBER_CHARS = 1000
"""Longest number literal accepted, in characters."""
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
"""Integers must fit in 64 bits (signed, or unsigned for the positive half)."""
MAX_VALUES = 1 << 20
"""Most values (array items and object members, all levels together) in one document.
Validating a document holds the GIL for its whole length (pydantic's validators never let
go of it), so this bounds how long one request can keep every other thread, the event loop
included, waiting: about 0.2 s. 64 prompts of 2048 token ids each are 131,072 values."""

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonLimitError(ValueError):
    """The document is not valid JSON, or breaks one of this module's limits."""


def parse_json(data: bytes | str) -> Any:
    """Parse `data` (UTF-8 bytes or text) within the limits above.

    Raises `JsonLimitError` for invalid UTF-8, invalid JSON, nesting deeper than
    `MAX_DEPTH`, more than `MAX_VALUES` values, number literals longer than
    `MAX_NUMBER_CHARS`, integers outside 64 bits, floats that overflow to infinity, `NaN` /
    `Infinity`, and strings (keys included) that hold lone surrogates.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"not valid UTF-8 at byte {exc.start}") from None
    else:
        text = data
        check_text(text)
    try:
        # Integers are range-checked by the walk below (a per-integer hook would double the
        # parse time of a body of token ids); past Python's own digit limit int() raises.
        value = json.loads(text, parse_float=_parse_float, parse_constant=_no_constant)
    except RecursionError:
        raise JsonLimitError(f"nested deeper than {MAX_DEPTH} levels") from None
    except JsonLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonLimitError(str(exc)) from None
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        raise JsonLimitError(f"a number has more than {MAX_NUMBER_CHARS} digits") from None
    # The raw text holds no surrogate (strict UTF-8 decoding cannot produce one; text input
    # was checked): only a \uD800-\uDFFF escape can, so documents without one skip the
    # per-string check.
    check_value(value, texts=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def check_value(value: Any, *, texts: bool = True) -> None:
    """Check an already parsed value: nesting depth, the number of values, integers within
    64 bits, and (with `texts`) that every string is encodable.

    Iterative, so no depth of input can exhaust the stack here.
    """
    if not isinstance(value, dict | list):
        _check_leaf(value, texts)
        return
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JsonLimitError(f"nested deeper than {MAX_DEPTH} levels")
        count += len(item)
        if count > MAX_VALUES:
            raise JsonLimitError(f"more than {MAX_VALUES} values")
        if isinstance(item, dict):
            if texts:
                for key in item:
                    check_text(key)
            children: Any = item.values()
        else:
            children = item
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif type(child) is int:
                if not MIN_INT <= child <= MAX_INT:
                    raise JsonLimitError(f"integer {_short(child)} does not fit in 64 bits")
            elif texts and isinstance(child, str):
                check_text(child)


def _check_leaf(value: Any, texts: bool) -> None:
    if type(value) is int and not MIN_INT <= value <= MAX_INT:
        raise JsonLimitError(f"integer {_short(value)} does not fit in 64 bits")
    if texts and isinstance(value, str):
        check_text(value)


def _short(number: int) -> str:
    text = str(number)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def check_text(text: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonLimitError(
            f"text is not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X})"
        ) from None


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonLimitError(f"a number has more than {MAX_NUMBER_CHARS} digits")
    value = float(literal)
    if not math.isfinite(value):
        raise JsonLimitError(f"number {literal} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not valid JSON")
