"""Validation of tool fields, the schema that forces a call, and reading the forced output."""

from __future__ import annotations

import copy
import json

import pytest

from adapterhub_server.api.tools import (
    MAX_TOOLS,
    ToolChoice,
    calls_from_forced_output,
    forced_call_schema,
    validate_tools,
)
from adapterhub_server.errors import InvalidRequestError
from tests.api.fake_engine import shared_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
# The shape pydantic (and openai.pydantic_function_tool) gives nested models.
ORDER = {
    "type": "function",
    "function": {
        "name": "place_order",
        "parameters": {
            "type": "object",
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                }
            },
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "required": ["items"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME, ORDER]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


# --- validation --------------------------------------------------------------------------------


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([_tool("f")] * 0, None, "tools"),
        ([_tool(f"f{i}") for i in range(MAX_TOOLS + 1)], None, "tools"),
        ([_tool("ok"), _tool("ok"), _tool("has space")], None, "tools[1].function.name"),
        ([_tool("ok"), _tool("x" * 65)], None, "tools[1].function.name"),
        ([_tool("ok"), _tool("dots.not.allowed")], None, "tools[1].function.name"),
        ([_tool("ok"), {"type": "retrieval"}], None, "tools[1].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": 3}}],
            None,
            "tools[0].function.description",
        ),
        (
            [{"type": "function", "function": {"name": "f", "strict": "yes"}}],
            None,
            "tools[0].function.strict",
        ),
        ([_tool("f")], "sometimes", "tool_choice"),
        (
            [_tool("f")],
            {"type": "function", "function": {"name": "g"}},
            "tool_choice.function.name",
        ),
        ([_tool("f")], {"type": "function", "function": {}}, "tool_choice.function.name"),
        ([_tool("f")], {"type": "tool", "function": {"name": "f"}}, "tool_choice.type"),
        (None, "required", "tool_choice"),
        (None, "auto", "tool_choice"),
        (None, {"type": "function", "function": {"name": "f"}}, "tool_choice"),
    ],
)
def test_validation_errors_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as exc:
        validate_tools(tools, choice)
    assert exc.value.param == param


def test_parallel_tool_calls_must_be_boolean():
    with pytest.raises(InvalidRequestError) as exc:
        validate_tools([_tool("f")], None, "false")  # type: ignore[arg-type]
    assert exc.value.param == "parallel_tool_calls"


def test_tool_choice_defaults_and_values():
    assert validate_tools(None, None) == ToolChoice("none")
    assert validate_tools(None, "none") == ToolChoice("none")
    assert validate_tools(TOOLS, None) == ToolChoice("auto")
    assert validate_tools(TOOLS, "none") == ToolChoice("none")
    assert validate_tools(TOOLS, "required").forced
    assert validate_tools(TOOLS, NAMED) == ToolChoice("function", "get_weather")
    assert not validate_tools(TOOLS, "auto").forced
    assert validate_tools([_tool(f"f{i}") for i in range(MAX_TOOLS)], None).mode == "auto"


# --- the forcing schema ------------------------------------------------------------------------


def _validator(schema: dict):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _valid(schema: dict, value) -> bool:
    return _validator(schema).is_valid(value)


def test_named_function_schema_is_its_parameters():
    assert forced_call_schema(TOOLS, NAMED) == WEATHER["function"]["parameters"]
    named_time = {"type": "function", "function": {"name": "get_time"}}
    assert forced_call_schema(TOOLS, named_time) == {"type": "object"}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema(parallel):
    schema = forced_call_schema(TOOLS, "required", parallel)
    one = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    two = [*one, {"name": "get_time", "arguments": {}}]
    assert _valid(schema, one)
    assert _valid(schema, two) is parallel
    assert not _valid(schema, [])
    assert not _valid(schema, [{"name": "get_weather", "arguments": {"town": "Paris"}}])
    assert not _valid(schema, [{"name": "delete", "arguments": {}}])
    assert not _valid(schema, [{"name": "get_time", "arguments": {}, "extra": 1}])
    assert not _valid(schema, [{"name": "get_time", "arguments": "{}"}])


def test_required_schema_keeps_refs_resolving():
    schema = forced_call_schema(TOOLS, "required")
    order = {"name": "place_order", "arguments": {"items": [{"sku": "A1", "qty": 2}]}}
    bad_item = {"name": "place_order", "arguments": {"items": [{"sku": "A1", "qty": "two"}]}}
    assert _valid(schema, [order])
    assert not _valid(schema, [bad_item])
    assert "place_order.Item" in schema["$defs"]


def test_required_schema_rewrites_root_refs():
    tree = {
        "type": "function",
        "function": {
            "name": "tree",
            "parameters": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
                "additionalProperties": False,
            },
        },
    }
    schema = forced_call_schema([tree], "required")
    nested = {"children": [{"children": []}]}
    assert _valid(schema, [{"name": "tree", "arguments": nested}])
    assert not _valid(schema, [{"name": "tree", "arguments": {"children": [{"x": 1}]}}])


def test_schema_does_not_change_the_tools():
    tools = copy.deepcopy(TOOLS)
    forced_call_schema(tools, "required")
    assert tools == TOOLS


def test_auto_is_not_forced():
    with pytest.raises(ValueError):
        forced_call_schema(TOOLS, "auto")
    with pytest.raises(ValueError):
        calls_from_forced_output("{}", TOOLS, "none")


def _llguidance_accepts(schema: dict, text: str) -> bool:
    """Whether llguidance (the engine's grammar library) lets a model write `text`."""
    llguidance = pytest.importorskip("llguidance")
    hf = pytest.importorskip("llguidance.hf")

    tokenizer = shared_tokenizer()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    assert not llguidance.LLMatcher.validate_grammar(grammar)
    matcher = llguidance.LLMatcher(hf.from_tokenizer(tokenizer), grammar, log_level=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


ORDER_CALL = '{"name": "place_order", "arguments": {"items": [{"sku": "A", "qty": 1}]}}'
TIME_CALL = '{"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_engine_constrains_required_calls(parallel):
    schema = forced_call_schema(TOOLS, "required", parallel)
    assert _llguidance_accepts(schema, f"[{ORDER_CALL}]")
    assert _llguidance_accepts(schema, f"[{ORDER_CALL}, {TIME_CALL}]") is parallel
    assert not _llguidance_accepts(schema, '[{"name": "nope", "arguments": {}}]')
    assert not _llguidance_accepts(schema, "[]")


def test_grammar_engine_constrains_named_calls():
    schema = forced_call_schema(TOOLS, NAMED)
    assert _llguidance_accepts(schema, '{"city": "Paris"}')
    assert not _llguidance_accepts(schema, '{"town": "Paris"}')


# --- reading the forced output -----------------------------------------------------------------


def test_calls_from_named_output():
    (call,) = calls_from_forced_output('{"city": "São Paulo"}', TOOLS, NAMED)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "São Paulo"}')
    assert call.id.startswith("call_") and len(call.id) == 29


def test_calls_from_required_output():
    text = json.dumps(
        [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_time", "arguments": {}},
        ]
    )
    calls = calls_from_forced_output(text, TOOLS, "required")
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),
    ]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ('{"city": "Par', NAMED),  # cut off by max_tokens
        ("[1]", NAMED),
        ('[{"name": "get_weather", "arguments": {"city": "Pa', "required"),
        ("[]", "required"),
        ('[{"name": "unknown", "arguments": {}}]', "required"),
        ('[{"name": "get_time", "arguments": "{}"}]', "required"),
        ('{"name": "get_time", "arguments": {}}', "required"),
    ],
)
def test_incomplete_or_invalid_forced_output_gives_no_calls(text, choice):
    assert calls_from_forced_output(text, TOOLS, choice) == []
