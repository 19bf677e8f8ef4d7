"""Issue 17's request surface on the real engine behind the real HTTP server, driven by
the official `openai` client: structured outputs, forced tool calls, n, penalties, echo,
strict fields. The tiny random model wanders, so every check is on what the constraint or
the option guarantees, never on what a trained model would say."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from adapterhub_server.base_model import ResolvedBaseModel
from client import AdapterHubClient
from tests.e2e.test_server_e2e import _start
from tests.tiny_models import make_peft_adapter, make_tiny_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {
            "type": "object",
            "properties": {"unit": {"enum": ["cm", "in"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "ok", "size", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "metric": {"type": "boolean"}},
            "required": ["city", "metric"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A tiny random model with room for a tools block (the tiny tokenizer spends a token
    on every character or two), three adapters of different ranks, and the base."""
    root = tmp_path_factory.mktemp("surface")
    base = make_tiny_llama(root / "base", max_position_embeddings=2048)
    adapters = {
        name: make_peft_adapter(base, root / name, seed=i + 1, r=r)
        for i, (name, r) in enumerate((("r4", 4), ("r8", 8), ("r16", 16)))
    }
    resolved = ResolvedBaseModel(base, "tiny-base", "local")
    with _start(resolved, adapters, max_model_len=2048, max_num_batched_tokens=2048) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _schema_request(client: openai.OpenAI, model: str):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "describe it"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True},
        },
        # Random weights pad JSON with whitespace (up to 64 characters per gap): room for it.
        max_tokens=1200,
        temperature=0.7,
        seed=3,
    )


def test_json_schema_outputs_validate_in_a_mixed_batch(server: openai.OpenAI) -> None:
    """Constrained rows of three adapters and the base, next to free rows, in one batch."""
    models = ["tiny-base", "r8", "r4", "r16"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(_schema_request, server, m) for m in models]
        free = [
            pool.submit(
                server.chat.completions.create,
                model=m,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=16,
                temperature=0,
            )
            for m in models
        ]
        answers = [f.result() for f in constrained]
        for f in free:
            assert f.result().choices[0].finish_reason in ("stop", "length")
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_and_choice_and_regex(server: openai.OpenAI) -> None:
    obj = server.chat.completions.create(
        model="r8",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
        logit_bias={"125": 5},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = server.completions.create(
        model="r4",
        prompt="pick",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    )
    assert choice.choices[0].text in ("yes", "no", "maybe")
    assert choice.choices[0].finish_reason == "stop"
    regex = server.completions.create(
        model="tiny-base",
        prompt="date",
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])"}},
    )
    import re

    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", regex.choices[0].text)


def test_a_schema_the_engine_cannot_compile_is_400(server: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        server.chat.completions.create(
            model="r8",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}},
            },
            max_tokens=5,
        )


def test_forced_tool_calls_parse(server: openai.OpenAI) -> None:
    named = server.chat.completions.create(
        model="r8",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=600,
        temperature=0,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    required = server.chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "time or weather"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=1000,
        temperature=0,
    )
    (call,) = required.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

    # The call goes back into the history with the tool's answer, and the model replies.
    follow_up = server.chat.completions.create(
        model="r8",
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [c.model_dump() for c in named.choices[0].message.tool_calls],
            },
            {
                "role": "tool",
                "tool_call_id": named.choices[0].message.tool_calls[0].id,
                "content": "sunny",
            },
        ],
        tools=[WEATHER],
        max_tokens=5,
        temperature=0,
    )
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_forced_tool_call_equals_the_unstreamed_one(server: openai.OpenAI) -> None:
    kwargs = {
        "model": "r4",
        "messages": [{"role": "user", "content": "time?"}],
        "tools": [TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 400,
        "temperature": 0,
    }
    whole = server.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(server.chat.completions.create(**kwargs, stream=True))
    names = [
        tc.function.name
        for c in chunks
        if c.choices
        for tc in (c.choices[0].delta.tool_calls or [])
        if tc.function and tc.function.name
    ]
    arguments = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in (c.choices[0].delta.tool_calls or [])
        if tc.function
    )
    assert names == ["get_time"]
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_n_choices_are_seeded_and_distinct(server: openai.OpenAI) -> None:
    kwargs = {
        "model": "r8",
        "prompt": "once upon",
        "max_tokens": 12,
        "n": 3,
        "seed": 11,
        "temperature": 1.0,
    }
    first = server.completions.create(**kwargs)
    again = server.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) == 3
    chat = server.chat.completions.create(
        model="r4", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=6, seed=1
    )
    assert [c.index for c in chat.choices] == [0, 1]
    # Usage counts the tokens of both choices.
    assert 2 <= chat.usage.completion_tokens <= 12


def test_echo_and_prompt_logprobs(server: openai.OpenAI) -> None:
    out = server.completions.create(
        model="r8", prompt="hello there", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = out.choices[0]
    assert choice.text.startswith("hello there")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no context
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text


def test_unknown_fields_are_refused(server: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(
            model="r8",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            extra_body={"temprature": 0.5},
        )
    assert info.value.body["code"] == "unrecognized_argument"  # type: ignore[index]
    assert info.value.body["param"] == "temprature"  # type: ignore[index]


HERMES_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def test_calls_the_model_writes_itself_parse_whole_and_streamed(server: openai.OpenAI) -> None:
    """tool_choice auto: the default template renders no tools, so the model gets the
    Hermes block and its `<tool_call>` output is parsed (here a regex makes the tiny model
    write exactly such a call)."""
    regex = HERMES_CALL.replace("{", r"\{").replace("}", r"\}")
    kwargs = {
        "model": "r16",
        "messages": [{"role": "user", "content": "time?"}],
        "tools": [WEATHER, TIME],
        "max_tokens": 200,
        "extra_body": {"structured_outputs": {"regex": regex}},
    }
    whole = server.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content is None
    (call,) = whole.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_time",
        {"zone": "UTC"},
    )
    chunks = [c for c in server.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"zone": "UTC"}
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class Thing(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool


def test_parse_with_the_official_and_the_typed_client(server: openai.OpenAI) -> None:
    """`chat.completions.parse(response_format=Model)` returns the reply as a `Model`,
    from openai-python and from AdapterHub's own client alike."""
    messages = [{"role": "user", "content": "a thing"}]
    official = server.chat.completions.parse(
        model="r8", messages=messages, response_format=Thing, max_tokens=400, temperature=0
    )
    assert isinstance(official.choices[0].message.parsed, Thing)
    with AdapterHubClient(base_url=str(server.base_url).removesuffix("/v1/")) as hub:
        typed = hub.chat.completions.parse(
            model="r8", messages=messages, response_format=Thing, max_tokens=400, temperature=0
        )
    assert typed.choices[0].message.parsed == official.choices[0].message.parsed
