"""What a request asks its output to match, and its translation into llguidance's grammar.

The API turns OpenAI's ``response_format`` and vLLM's ``structured_outputs`` into a
`GrammarSpec`; `grammar_text` turns that into the grammar llguidance compiles. Anything
llguidance cannot honour exactly is refused here or at compile time with a `GrammarError`
naming the construct: a keyword that were silently ignored would let through output that
does not match what the client asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

import llguidance

from adapterhub_server.errors import InvalidRequestError

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,64}"
"""Whitespace allowed between JSON tokens: any JSON whitespace, at most 64 characters per
gap (pretty-printing to 30 levels at 2 spaces). Unbounded, a model that favours newlines
could fill max_tokens with them inside an object that never closes."""
MAX_ERROR_CHARS = 1000
"""Longest compiler message passed on to the client (a regex error quotes the pattern)."""

_LABELS = {
    "json_object": "JSON object format",
    "json_schema": "JSON schema",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


class GrammarError(InvalidRequestError):
    """A structured-output request the engine cannot honour: invalid, unsupported (the
    message names the keyword or construct) or too slow to compile. HTTP 400; the caller
    sets `param` (e.g. "response_format") since only it knows which field held the spec."""

    code = "invalid_grammar"


@dataclass(frozen=True)
class GrammarSpec:
    """One request's output constraint, in the form the API received it (the cache key).

    `value` by kind:
      * ``json_object``: "" (any JSON object);
      * ``json_schema``: the schema as JSON text (draft 2020-12 keywords as llguidance
        implements them; unimplemented ones are refused, never ignored);
      * ``regex``: the pattern, Rust ``regex`` syntax (https://docs.rs/regex), matched
        against the whole output;
      * ``choice``: a JSON list of strings; the output is exactly one of them;
      * ``grammar``: a context-free grammar in llguidance's Lark dialect
        (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md), or GBNF
        as llama.cpp and vLLM users write it (converted to Lark by llguidance).
    """

    kind: GrammarKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(
                f"unknown structured output kind {self.kind!r}; expected one of "
                + ", ".join(GRAMMAR_KINDS)
            )
        if not isinstance(self.value, str):
            raise GrammarError(f"the {_LABELS[self.kind]} must be given as text")

    @property
    def label(self) -> str:
        """How messages name this kind of constraint."""
        return _LABELS[self.kind]


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON form) for `spec`; raises `GrammarError` on input
    that is malformed before compiling (bad JSON, an empty choice list or pattern).

    Whether the grammar is supported is decided when a matcher is built from it
    (`GrammarCompiler`), since only that knows the unimplemented keywords."""
    json_options = {"whitespace_pattern": JSON_WHITESPACE}
    matcher = llguidance.LLMatcher
    if spec.kind == "json_object":
        return matcher.grammar_from_json_schema('{"type": "object"}', defaults=json_options)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be a JSON object")
        try:
            return matcher.grammar_from_json_schema(spec.value, defaults=json_options)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
    if spec.kind == "regex":
        if not spec.value:
            raise GrammarError("the regex is empty")
        return matcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return matcher.grammar_from_lark(_choice_lark(spec.value))
    if not spec.value.strip():
        raise GrammarError("the grammar is empty")
    try:
        return llguidance.grammar_from("grammar", spec.value)
    except ValueError as exc:  # GBNF that does not convert: an unknown rule, bad syntax
        raise GrammarError(f"invalid grammar: {exc}") from None


def _choice_lark(value: str) -> str:
    """A Lark grammar whose only sentences are the listed strings."""
    try:
        choices = json.loads(value)
    except ValueError as exc:
        raise GrammarError(f"the choice list is not valid JSON: {exc}") from None
    if not isinstance(choices, list) or not choices:
        raise GrammarError("the choice list must be a non-empty JSON list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("every choice must be a non-empty string")
    # JSON string literals are valid Lark string literals (same escapes).
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
