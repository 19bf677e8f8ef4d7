"""No silent ignoring: a request field the server does not know, or knows but does not
implement, is a 400 naming it, at every level of every JSON request body."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from adapterhub_server.api import create_app
from tests.api.conftest import LiveServer, sse_json
from tests.api.fake_engine import BASE_ID, FakeEngine
from tests.live_server import serve

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "hello"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
ASSISTANT_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ],
}
TOOL_REPLY = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "Reply", "schema": {"type": "object"}, "strict": True},
}


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


# --- unknown fields -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "bogus": 1}, "bogus"),
        ("/v1/completions", {"prompt": "hi", "guided_json": {}}, "guided_json"),
        ("/v1/completions", {"prompt": "hi", "max_completion_tokens": 4}, "max_completion_tokens"),
        (
            "/v1/completions",
            {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
            "stream_options.x",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "structured_outputs": {"regex": "a", "backend": "x"}},
            "structured_outputs.backend",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "bogus": None}, "bogus"),
        ("/v1/chat/completions", {"messages": CHAT, "echo": True}, "echo"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi", "foo": 1}]},
            "messages[0].foo",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
            "messages[0].content[0].x",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json_object", "schema": {}}},
            "response_format.schema",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {}, "bar": 1},
                },
            },
            "response_format.json_schema.bar",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "tools": [{**TOOL, "extra": 1}]},
            "tools[0].extra",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "tools": [{"type": "function", "function": {"name": "f", "returns": {}}}],
            },
            "tools[0].function.returns",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather", "x": 1}},
            },
            "tool_choice.function.x",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    *CHAT,
                    {
                        "role": "assistant",
                        "tool_calls": [{**ASSISTANT_CALL["tool_calls"][0], "index": 0}],
                    },
                ]
            },
            "messages[1].tool_calls[0].index",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "merged_adapters": {"ids": ["alpha"], "weight": [1]}},
            "merged_adapters.weight",
        ),
    ],
)
async def test_unknown_fields_are_400_with_their_path(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, body: dict, param: str
) -> None:
    error = error_of(await client.post(path, json=body))
    assert error == {
        "message": f"Unrecognized request argument supplied: {param}",
        "type": "invalid_request_error",
        "param": param,
        "code": "unrecognized_argument",
    }
    assert engine.calls == []


async def test_an_unknown_field_is_reported_before_other_errors(client: httpx.AsyncClient) -> None:
    """A misspelt field is what the caller needs to hear about, not the error its absence
    causes (here: no prompt at all)."""
    error = error_of(await client.post("/v1/completions", json={"promt": "hi"}))
    assert (error["code"], error["param"]) == ("unrecognized_argument", "promt")


# --- defined by OpenAI, not implemented --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/completions", {"best_of": 3}, "best_of", "unsupported_value"),
        ("/v1/completions", {"suffix": "end"}, "suffix", "unsupported_parameter"),
        (
            "/v1/completions",
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
            "unsupported_value",
        ),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio", "unsupported_parameter"),
        ("/v1/chat/completions", {"modalities": ["audio"]}, "modalities", "unsupported_value"),
        ("/v1/chat/completions", {"prediction": {}}, "prediction", "unsupported_parameter"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options", None),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", None),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call", None),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort", None),
        ("/v1/chat/completions", {"verbosity": "low"}, "verbosity", None),
        ("/v1/chat/completions", {"moderation": {"model": "m"}}, "moderation", None),
        ("/v1/chat/completions", {"prompt_cache_retention": "24h"}, "prompt_cache_retention", None),
        ("/v1/chat/completions", {"store": True}, "store", "unsupported_value"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier", "unsupported_value"),
        ("/v1/chat/completions", {"service_tier": "priority"}, "service_tier", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
            "messages[0].refusal",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]},
            "messages[0].audio",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "http://x"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1].type",
            "unsupported_value",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "text",
                                "text": "a",
                                "prompt_cache_breakpoint": {"mode": "explicit"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].prompt_cache_breakpoint",
            "unsupported_parameter",
        ),
    ],
)
async def test_defined_but_unsupported_fields_are_400_naming_them(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    path: str,
    body: dict,
    param: str,
    code: str | None,
) -> None:
    base = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    error = error_of(await client.post(path, json={**base, **body}))
    assert error["param"] == param
    assert error["code"] == (code or error["code"])
    assert error["code"] in ("unsupported_parameter", "unsupported_value")
    assert param.rsplit(".", 1)[-1].split("[")[0] in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    "extra",
    [
        {"user": "user-1"},
        {"metadata": {"team": "search", "ticket": "42"}},
        {"store": False},
        {"store": None},
        {"service_tier": "auto"},
        {"service_tier": "default"},
        {"prompt_cache_key": "tenant-7"},
        {"safety_identifier": "7f3a"},
        {"modalities": ["text"]},
        {"audio": None, "prediction": None, "functions": None, "reasoning_effort": None},
        {"prompt_cache_retention": "in_memory", "prompt_cache_options": {}},
        {"parallel_tool_calls": True},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"tools": [TOOL], "tool_choice": "none"},
        {"response_format": {"type": "text"}},
    ],
    ids=str,
)
async def test_accepted_chat_fields(client: httpx.AsyncClient, extra: dict) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, **extra})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "extra",
    [{"best_of": 1}, {"best_of": None}, {"suffix": None}, {"suffix": ""}, {"user": "u"}],
    ids=str,
)
async def test_accepted_completion_fields(client: httpx.AsyncClient, extra: dict) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


async def test_tool_conversations_are_accepted(client: httpx.AsyncClient) -> None:
    body = {"messages": [*CHAT, ASSISTANT_CALL, TOOL_REPLY], "tools": [TOOL]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
            "messages[0].tool_call_id",
            "invalid_value",
        ),
        ({"messages": CHAT, "tool_choice": "required"}, "tool_choice", "invalid_value"),
        (
            {
                "messages": CHAT,
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "other"}},
            },
            "tool_choice.function.name",
            "invalid_value",
        ),
        ({"messages": CHAT, "tools": [TOOL, TOOL]}, "tools[1].function.name", "invalid_value"),
        (
            {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        ({"messages": CHAT, "response_format": {"type": "json_schema"}}, None, None),
        (
            {"messages": CHAT, "structured_outputs": {"choice": ["a"], "regex": "a"}},
            "structured_outputs",
            "invalid_value",
        ),
        (
            {
                "messages": CHAT,
                "structured_outputs": {"choice": ["a"]},
                "response_format": JSON_SCHEMA,
            },
            "structured_outputs",
            "invalid_value",
        ),
        ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"messages": CHAT, "metadata": {"k": 1}}, "metadata.k", "invalid_value"),
        (
            {"messages": CHAT, "metadata": {str(i): "v" for i in range(17)}},
            "metadata",
            "invalid_value",
        ),
        ({"messages": CHAT, "n": 129}, "n", "invalid_value"),
    ],
)
async def test_shape_errors_name_their_field(
    client: httpx.AsyncClient, body: dict, param: str | None, code: str | None
) -> None:
    error = error_of(await client.post("/v1/chat/completions", json=body))
    if param is None:
        param = "response_format.json_schema" if "response_format" in body else error["param"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"].startswith(f"{param}: ")


async def test_missing_tool_call_id_is_a_missing_parameter(client: httpx.AsyncClient) -> None:
    body = {"messages": [*CHAT, ASSISTANT_CALL, {"role": "tool", "content": "sunny"}]}
    error = error_of(await client.post("/v1/chat/completions", json=body))
    assert (error["param"], error["code"]) == (
        "messages[2].tool_call_id",
        "missing_required_parameter",
    )


# --- the other JSON bodies ----------------------------------------------------------------------


@pytest.fixture
def engine() -> FakeEngine:
    # Tools put a Hermes tools block into the tiny template's prompt: room for it.
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    engine = FakeEngine(max_model_len=4096)
    with serve(create_app(engine)) as base_url:
        yield LiveServer(engine=engine, base_url=base_url)


@pytest.fixture
async def admin_client(anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    """Bodies are validated before any service runs: placeholders stand in for them."""
    app = create_app(FakeEngine(), adapters=object(), fine_tuning=object())  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path", "body", "param", "code"),
    [
        (
            "POST",
            "/v1/adapters/a/merges",
            {"ids": ["x", "y"], "strategy": "ties"},
            "strategy",
            "unrecognized_argument",
        ),
        (
            "PUT",
            "/v1/adapters/a/aliases/prod",
            {"version": 1, "v": 2},
            "v",
            "unrecognized_argument",
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"model": BASE_ID, "training_file": "file-1", "epochs": 3},
            "epochs",
            "unrecognized_argument",
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"model": BASE_ID, "training_file": "file-1", "method": {"supervised": {"x": 1}}},
            "method.supervised.x",
            "unrecognized_argument",
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"model": BASE_ID, "training_file": "file-1", "integrations": [{"type": "wandb"}]},
            "integrations",
            "unsupported_parameter",
        ),
        (
            "POST",
            "/v1/fine_tuning/jobs",
            {"model": BASE_ID, "training_file": "file-1", "method": {"dpo": {"beta": 0.1}}},
            "method.dpo",
            "unsupported_parameter",
        ),
        ("POST", "/tokenize", {"prompt": "hi", "chat_template": "x"}, "chat_template", None),
        ("POST", "/detokenize", {"tokens": [1], "skip_special_tokens": True}, None, None),
    ],
)
async def test_other_bodies_are_strict_too(
    admin_client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict,
    param: str | None,
    code: str | None,
) -> None:
    error = error_of(await admin_client.request(method, path, json=body))
    assert error["param"] == (param or "skip_special_tokens")
    assert error["code"] == (code or "unrecognized_argument")


# --- the official openai client -----------------------------------------------------------------


def test_openai_client_requests_with_the_new_fields(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=BASE_ID,
        messages=[*CHAT, ASSISTANT_CALL, TOOL_REPLY],  # type: ignore[list-item]
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice="auto",
        parallel_tool_calls=False,
        response_format=JSON_SCHEMA,  # type: ignore[arg-type]
        user="u",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        prompt_cache_key="p",
        safety_identifier="s",
        modalities=["text"],
        seed=1,
        extra_body={"top_k": 5, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert chat.choices[0].message.content
    completion = oai.completions.create(
        model=BASE_ID,
        prompt="hi",
        max_tokens=2,
        best_of=1,
        user="u",
        extra_body={"structured_outputs": {"choice": ["a", "b"]}},
    )
    assert completion.choices


def test_openai_client_stream_options(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=BASE_ID,
        messages=CHAT,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None


def test_openai_client_parse_request_is_accepted(oai: openai.OpenAI) -> None:
    """`parse()` sends OpenAI's strict schema form; the fake engine's reply is no JSON, so
    only the raw response is read."""
    import pydantic

    class Reply(pydantic.BaseModel):
        answer: str

    raw = oai.chat.completions.with_raw_response.parse(
        model=BASE_ID,
        messages=CHAT,  # type: ignore[arg-type]
        response_format=Reply,
    )
    assert raw.http_response.status_code == 200
    sent = raw.http_request.read()
    assert b'"json_schema"' in sent and b'"strict":true' in sent.replace(b" ", b"")


def test_openai_client_sees_unsupported_fields_as_bad_requests(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=BASE_ID,
            messages=CHAT,  # type: ignore[arg-type]
            reasoning_effort="low",
        )
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "reasoning_effort")
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_ID, prompt="hi", extra_body={"guided_regex": "a"})
    assert (info.value.code, info.value.param) == ("unrecognized_argument", "guided_regex")
    assert info.value.message.endswith("Unrecognized request argument supplied: guided_regex")


async def test_stream_request_errors_are_plain_400s(client: httpx.AsyncClient) -> None:
    """Refused before anything streams: a 400 response, not an error event."""
    r = await client.post(
        "/v1/chat/completions", json={"messages": CHAT, "stream": True, "bogus": 1}
    )
    error_of(r)
    ok = await client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    assert sse_json(ok.text)[-1]["choices"][0]["finish_reason"] == "stop"
