"""The wire schemas in `client.types`: ranges, prompt forms, serialization details."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.types import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FineTuningJobCreateRequest,
    FunctionCall,
    PromptLogprob,
    StructuredOutputs,
    TokenizeRequest,
    TopLogprob,
    accumulate_tool_calls,
)

CHAT = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_prompt_forms(prompt) -> None:
    assert CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [5, [1, "a"], [[1], "a"], [True, 1], None, {"a": 1}])
def test_bad_prompt_forms(prompt) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=prompt)


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": 2.01},
        {"top_p": 1.01},
        {"max_tokens": 0},
        {"n": 0},
        {"logprobs": 21},
        {"logprobs": -1},
        {"stop": ["x"] * 17},
        {"top_k": -2},
        {"n": 129},
    ],
)
def test_completion_ranges(field: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **field)


def test_chat_ranges() -> None:
    ok = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=ok, top_logprobs=21)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=ok, max_completion_tokens=0)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])


def test_unknown_request_fields_are_rejected_at_every_level() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        CompletionRequest(prompt="x", bogus=2)
    with pytest.raises(ValidationError, match="extra_forbidden"):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]}
        )
    with pytest.raises(ValidationError, match="extra_forbidden"):
        ChatCompletionRequest.model_validate(
            {
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {}, "schema_": {}},
                },
            }
        )


def test_unknown_response_fields_are_kept() -> None:
    """Responses stay lenient: a client must parse a newer server's answers."""
    message = ChatCompletionMessage.model_validate({"content": "x", "refusal": None, "new": 1})
    assert message.model_extra == {"refusal": None, "new": 1}


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"best_of": 2}, "unsupported_value"),
        ({"best_of": 3, "n": 2}, "unsupported_value"),
        ({"suffix": "tail"}, "unsupported_parameter"),
    ],
)
def test_unsupported_completion_fields(body: dict, kind: str) -> None:
    with pytest.raises(ValidationError, match=kind):
        CompletionRequest.model_validate({"prompt": "x", **body})


@pytest.mark.parametrize(
    "body", [{"best_of": 1}, {"best_of": 2, "n": 2}, {"suffix": ""}, {"suffix": None}]
)
def test_unsupported_completion_fields_that_ask_for_nothing(body: dict) -> None:
    request = CompletionRequest.model_validate({"prompt": "x", **body})
    assert "best_of" not in request.model_dump() and "suffix" not in request.model_dump()


def test_json_schema_travels_as_schema() -> None:
    body = {
        "messages": CHAT,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "Reply", "schema": {"type": "object"}, "strict": True},
        },
        "structured_outputs": None,
    }
    request = ChatCompletionRequest.model_validate(body)
    assert request.response_format is not None and request.response_format.json_schema
    assert request.response_format.json_schema.schema_ == {"type": "object"}
    dumped = request.model_dump(exclude_none=True)["response_format"]
    assert dumped["json_schema"]["schema"] == {"type": "object"}
    outputs = StructuredOutputs.model_validate({"json": {"type": "string"}})
    assert outputs.json_ == {"type": "string"}
    assert outputs.model_dump(exclude_none=True) == {"json": {"type": "string"}}


@pytest.mark.parametrize(
    "body",
    [
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_object", "json_schema": {"name": "a"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 65}}},
        {"response_format": {"type": "xml"}},
        {"structured_outputs": {}},
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"json": "{}"}},
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}] * 2},
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
        {"tools": [{"type": "custom", "function": {"name": "f"}}]},
        {"tool_choice": "required"},
        {"tool_choice": "sometimes"},
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        {"metadata": {str(i): "v" for i in range(17)}},
        {"metadata": {"k": "v" * 513}},
        {"metadata": {"k": 1}},
        {"n": 129},
        {"store": True},
        {"service_tier": "flex"},
        {"stream_options": {"include_usage": True}},
        {"modalities": ["text", "audio"]},
        {"audio": {"voice": "alloy", "format": "wav"}},
        {"reasoning_effort": "low"},
        {"functions": [{"name": "f"}]},
    ],
)
def test_invalid_chat_fields(body: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": CHAT, **body})


@pytest.mark.parametrize(
    "body",
    [
        {"response_format": {"type": "text"}, "structured_outputs": {"choice": ["a", "b"]}},
        {"structured_outputs": {"regex": "[0-9]+"}},
        {"structured_outputs": {"grammar": 'root ::= "a"'}},
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
        },
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"metadata": {"team": "a"}, "user": "u", "store": False, "service_tier": "auto"},
        {"prompt_cache_key": "k", "safety_identifier": "s", "service_tier": "default"},
        {"modalities": ["text"], "audio": None, "prediction": None},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
    ],
)
def test_valid_chat_fields(body: dict) -> None:
    ChatCompletionRequest.model_validate({"messages": CHAT, **body})


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "42"},  # no tool_call_id
        {"role": "user", "content": "x", "tool_call_id": "c"},
        {"role": "user", "content": "x", "tool_calls": []},
        {"role": "system", "content": "x", "reasoning_content": "r"},
        {"role": "user"},
        {"role": "assistant", "content": "x", "refusal": "no"},
        {"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": ""}},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            ],
        },  # arguments are a JSON text
    ],
)
def test_invalid_messages(message: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [message]})


def test_tool_conversation() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "look it up",
            "refusal": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    request = ChatCompletionRequest.model_validate({"messages": messages})
    assert request.messages[1].tool_calls is not None
    assert request.messages[1].tool_calls[0].function.name == "f"
    assert request.messages[2].tool_call_id == "c1"


def test_message_tool_calls_serialize_only_when_set() -> None:
    plain = ChatCompletionMessage(content="hi")
    assert json.loads(plain.model_dump_json()) == {"role": "assistant", "content": "hi"}
    call = ChatCompletionMessageToolCall(
        id="call_1", function=FunctionCall(name="f", arguments='{"a": 1}')
    )
    message = ChatCompletionMessage(content=None, tool_calls=[call], reasoning_content="r")
    assert json.loads(message.model_dump_json()) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
        "reasoning_content": "r",
    }
    assert call.function.parsed_arguments() == {"a": 1}


def test_tool_call_deltas_serialize_only_what_they_carry() -> None:
    first = ChoiceDelta(
        tool_calls=[
            ChoiceDeltaToolCall(
                index=0,
                id="call_1",
                type="function",
                function=ChoiceDeltaToolCallFunction(name="f", arguments=""),
            )
        ]
    )
    more = ChoiceDelta(
        tool_calls=[
            ChoiceDeltaToolCall(index=0, function=ChoiceDeltaToolCallFunction(arguments='{"a"'))
        ]
    )
    assert json.loads(first.model_dump_json()) == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }
    assert json.loads(more.model_dump_json()) == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]
    }
    assert json.loads(ChoiceDelta(reasoning_content="hm").model_dump_json()) == {
        "reasoning_content": "hm"
    }
    tail = ChoiceDelta(
        tool_calls=[
            ChoiceDeltaToolCall(index=0, function=ChoiceDeltaToolCallFunction(arguments=": 1}"))
        ]
    )
    (call,) = accumulate_tool_calls([first, more, tail])
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "f", '{"a": 1}')


def test_accumulate_tool_calls_from_chunks_of_several_choices() -> None:
    def chunk(index: int, call: int, **fields: object) -> ChatCompletionChunk:
        delta = ChoiceDelta(
            tool_calls=[ChoiceDeltaToolCall.model_validate({"index": call, **fields})]
        )
        return ChatCompletionChunk(
            id="c",
            created=1,
            model="m",
            choices=[ChatCompletionChunkChoice(index=index, delta=delta)],
        )

    chunks = [
        chunk(0, 0, id="a", type="function", function={"name": "f", "arguments": "{"}),
        chunk(1, 0, id="z", type="function", function={"name": "h", "arguments": "[]"}),
        chunk(0, 1, id="b", type="function", function={"name": "g", "arguments": "{}"}),
        chunk(0, 0, function={"arguments": "}"}),
    ]
    calls = accumulate_tool_calls(chunks)
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("a", "f", "{}"),
        ("b", "g", "{}"),
    ]
    assert [c.id for c in accumulate_tool_calls(chunks, choice=1)] == ["z"]


def test_finish_reason_tool_calls() -> None:
    choice = ChatCompletionChunkChoice(index=0, delta=ChoiceDelta(), finish_reason="tool_calls")
    assert choice.finish_reason == "tool_calls"


def test_prompt_logprobs_omitted_unless_set() -> None:
    plain = CompletionChoice(index=0, text="x", finish_reason="stop")
    assert "prompt_logprobs" not in json.loads(plain.model_dump_json())
    with_prompt = CompletionChoice(
        index=0,
        text="x",
        prompt_logprobs=[
            None,
            {"5": PromptLogprob(logprob=float("-inf"), rank=1, decoded_token="a")},
        ],
    )
    assert json.loads(with_prompt.model_dump_json())["prompt_logprobs"] == [
        None,
        {"5": {"logprob": -9999.0, "rank": 1, "decoded_token": "a"}},
    ]


@pytest.mark.parametrize("value", [-1, 21, True])
def test_prompt_logprobs_range(value: object) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "prompt_logprobs": value})


def test_echo_is_a_plain_field() -> None:
    assert CompletionRequest(prompt="x", echo=True).echo is True


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "messages": CHAT},
        {},
        {"messages": CHAT, "add_special_tokens": True},
        {"prompt": "x", "tools": []},
        {"prompt": "x", "add_generation_prompt": False},
        {"prompt": "x", "chat_template": "{{ x }}"},
    ],
)
def test_invalid_tokenize_requests(body: dict) -> None:
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate(body)


def test_fine_tuning_unsupported_fields() -> None:
    base = {"model": "m", "training_file": "file-1"}
    FineTuningJobCreateRequest.model_validate({**base, "integrations": [], "metadata": None})
    with pytest.raises(ValidationError, match="unsupported_parameter"):
        FineTuningJobCreateRequest.model_validate({**base, "integrations": [{"type": "wandb"}]})
    with pytest.raises(ValidationError, match="unsupported_parameter"):
        FineTuningJobCreateRequest.model_validate({**base, "method": {"dpo": {}}})
    with pytest.raises(ValidationError, match="extra_forbidden"):
        FineTuningJobCreateRequest.model_validate({**base, "epochs": 3})


def test_usage_omitted_until_set() -> None:
    chunk = Completion(id="cmpl-1", created=1, model="m", choices=[])
    assert "usage" not in json.loads(chunk.model_dump_json())


def test_empty_delta_serializes_as_empty_object() -> None:
    chunk = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatCompletionChunkChoice(index=0, delta=ChoiceDelta(), finish_reason="stop")],
    )
    choice = json.loads(chunk.model_dump_json())["choices"][0]
    assert choice == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_infinite_logprobs_become_openai_floor() -> None:
    """JSON has no -inf; OpenAI reports -9999.0 for impossible tokens."""
    top = TopLogprob(token="a", logprob=float("-inf"))
    assert json.loads(top.model_dump_json())["logprob"] == -9999.0
    legacy = CompletionLogprobs(
        tokens=["a"],
        token_logprobs=[float("-inf")],
        top_logprobs=[{"a": float("nan")}],
        text_offset=[0],
    )
    dumped = json.loads(legacy.model_dump_json())
    assert dumped["token_logprobs"] == [-9999.0]
    assert dumped["top_logprobs"] == [{"a": -9999.0}]


def test_client_package_has_no_server_dependencies() -> None:
    import subprocess
    import sys

    code = (
        "import sys, client, client.types; "
        "bad = [m for m in ('torch', 'fastapi', 'starlette', 'adapterhub_server') if m in sys.modules]; "
        "assert not bad, bad"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
