"""`chat.completions.parse()`, tool calls in replies and streams, and tokenize/detokenize.

Replies with JSON content or tool calls come from a stub transport answering with recorded
server responses (the fake engine's replies are fixed texts); tokenize runs against the
fake-engine server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pydantic
import pytest

from client import (
    AdapterHubClient,
    APIResponseValidationError,
    AsyncAdapterHubClient,
    BadRequestError,
    JsonSchemaFormat,
    ParsedChatCompletion,
    ResponseFormat,
    StructuredOutputs,
    accumulate_tool_calls,
)
from tests.api.fake_engine import BASE_ID
from tests.client.conftest import Fake

CHAT = [{"role": "user", "content": "weather in Paris?"}]


class Weather(pydantic.BaseModel):
    city: str
    celsius: float


def completion(message: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    """A chat completion as the server serializes it."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": BASE_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def stub(answer: Callable[[dict[str, Any]], httpx.Response]) -> tuple[httpx.Client, list[dict]]:
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        sent.append(body)
        return answer(body)

    return httpx.Client(transport=httpx.MockTransport(handler)), sent


@pytest.fixture
def hub_answering() -> Iterator[Callable[..., tuple[AdapterHubClient, list[dict]]]]:
    clients: list[AdapterHubClient] = []

    def make(body: dict[str, Any] | str, *, sse: bool = False) -> tuple[AdapterHubClient, list]:
        def answer(_: dict[str, Any]) -> httpx.Response:
            if sse:
                return httpx.Response(
                    200, content=str(body).encode(), headers={"content-type": "text/event-stream"}
                )
            return httpx.Response(200, json=body)

        http, sent = stub(answer)
        hub = AdapterHubClient(base_url="http://hub", http_client=http, max_retries=0)
        clients.append(hub)
        return hub, sent

    yield make
    for hub in clients:
        hub.close()


# --- parse() ------------------------------------------------------------------------------------


def test_parse_sends_the_models_schema_and_parses_the_reply(hub_answering) -> None:
    hub, sent = hub_answering(completion({"content": '{"city": "Paris", "celsius": 21.5}'}))
    result = hub.chat.completions.parse(model=BASE_ID, messages=CHAT, response_format=Weather)
    assert sent[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Weather", "schema": Weather.model_json_schema(), "strict": True},
    }
    assert isinstance(result, ParsedChatCompletion)
    parsed = result.choices[0].message.parsed
    assert parsed == Weather(city="Paris", celsius=21.5)
    assert result.choices[0].message.content == '{"city": "Paris", "celsius": 21.5}'
    assert result.usage.total_tokens == 12


@pytest.mark.parametrize(
    ("message", "finish_reason"),
    [
        ({"content": '{"city": "Pa'}, "length"),
        ({"content": None}, "stop"),
        ({"content": None, "refusal": "I can't"}, "stop"),
        (
            {
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_calls",
        ),
    ],
)
def test_parsed_is_none_unless_the_reply_finished(
    hub_answering, message: dict, finish_reason: str
) -> None:
    hub, _ = hub_answering(completion(message, finish_reason))
    result = hub.chat.completions.parse(model=BASE_ID, messages=CHAT, response_format=Weather)
    assert result.choices[0].message.parsed is None


@pytest.mark.parametrize("content", ['{"city": "Paris"}', "not json"])
def test_a_finished_reply_that_does_not_validate_raises(hub_answering, content: str) -> None:
    hub, _ = hub_answering(completion({"content": content}))
    with pytest.raises(APIResponseValidationError):
        hub.chat.completions.parse(model=BASE_ID, messages=CHAT, response_format=Weather)


@pytest.mark.anyio
async def test_async_parse(anyio_backend: str) -> None:
    body = completion({"content": '{"city": "Oslo", "celsius": -3}'})
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    async with AsyncAdapterHubClient(
        base_url="http://hub", http_client=httpx.AsyncClient(transport=transport)
    ) as hub:
        result = await hub.chat.completions.parse(
            model=BASE_ID, messages=CHAT, response_format=Weather
        )
    assert result.choices[0].message.parsed == Weather(city="Oslo", celsius=-3)


# --- tool calls ---------------------------------------------------------------------------------


def test_tool_calls_in_a_reply(hub_answering) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    hub, sent = hub_answering(
        completion(
            {"content": None, "tool_calls": [call], "reasoning_content": "look it up"}, "tool_calls"
        )
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    reply = hub.chat.completions.create(
        model=BASE_ID, messages=CHAT, tools=tools, tool_choice="required"
    )
    assert sent[0]["tools"] == tools and sent[0]["tool_choice"] == "required"
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "look it up"
    (parsed_call,) = choice.message.tool_calls or []
    assert parsed_call.id == "call_1"
    assert parsed_call.function.name == "get_weather"
    assert parsed_call.function.parsed_arguments() == {"city": "Paris"}


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": BASE_ID,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body)}\n\n"


def test_tool_calls_in_a_stream(hub_answering) -> None:
    events = "".join(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"reasoning_content": "need the weather"}),
            _chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            _chunk({}, "tool_calls"),
            "data: [DONE]\n\n",
        ]
    )
    hub, _ = hub_answering(events, sse=True)
    with hub.chat.completions.create(model=BASE_ID, messages=CHAT, stream=True) as stream:
        chunks = list(stream)
    assert chunks[1].choices[0].delta.reasoning_content == "need the weather"
    first = (chunks[2].choices[0].delta.tool_calls or [])[0]
    assert (first.id, first.type, first.function and first.function.name) == (
        "call_1",
        "function",
        "get_weather",
    )
    (call,) = accumulate_tool_calls(chunks)
    assert call.id == "call_1"
    assert call.function.parsed_arguments() == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_new_request_fields_are_sent_under_their_wire_names(hub_answering) -> None:
    hub, sent = hub_answering(completion({"content": "x"}))
    hub.chat.completions.create(
        model=BASE_ID,
        messages=CHAT,
        response_format=ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name="w", schema={"type": "object"})
        ),
        metadata={"a": "b"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        chat_template_kwargs={"enable_thinking": False},
    )
    body = sent[0]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}},
    }
    assert body["store"] is False and body["parallel_tool_calls"] is False
    assert body["metadata"] == {"a": "b"} and body["service_tier"] == "auto"
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    hub.chat.completions.create(
        model=BASE_ID, messages=CHAT, structured_outputs=StructuredOutputs(json={"type": "string"})
    )
    assert sent[1]["structured_outputs"] == {"json": {"type": "string"}}


# --- against the fake-engine server -------------------------------------------------------------


@pytest.fixture
def hub(fake: Fake) -> Iterator[AdapterHubClient]:
    with AdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as client:
        yield client


def test_tokenize_and_detokenize(hub: AdapterHubClient, fake: Fake) -> None:
    result = hub.tokenize(prompt="hello world", add_special_tokens=False, return_token_strs=True)
    assert result.count == len(result.tokens) > 0
    assert result.max_model_len == fake.engine.max_model_len
    assert result.token_strs is not None and len(result.token_strs) == result.count
    assert hub.detokenize(tokens=result.tokens).prompt == "hello world"
    chat = hub.tokenize(model="alpha", messages=[{"role": "user", "content": "hi"}])
    hub.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert fake.engine.calls[-1].prompt_token_ids == chat.tokens


@pytest.mark.anyio
async def test_async_tokenize(fake: Fake, anyio_backend: str) -> None:
    async with AsyncAdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as hub:
        result = await hub.tokenize(prompt="hello", add_special_tokens=False)
        assert (await hub.detokenize(tokens=result.tokens)).prompt == "hello"


def test_unknown_fields_raise_bad_request(hub: AdapterHubClient) -> None:
    with pytest.raises(BadRequestError) as info:
        hub.chat.completions.create(model=BASE_ID, messages=CHAT, extra_body={"best_of": 2})
    assert (info.value.code, info.value.param) == ("unrecognized_argument", "best_of")
    with pytest.raises(BadRequestError) as info:
        hub.completions.create(model=BASE_ID, prompt="hi", extra_body={"suffix": "x"})
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "suffix")
