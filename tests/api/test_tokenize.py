"""`POST /tokenize` and `POST /detokenize`: vLLM's shapes, the inference routes' tokenization."""

from __future__ import annotations

import httpx
import pytest

from adapterhub_server.api import create_app
from adapterhub_server.api.auth import ApiKeys
from tests.api.fake_engine import BASE_ID, FakeEngine

pytestmark = pytest.mark.anyio

CHAT = [
    {"role": "system", "content": "be brief"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}],
    },
]


async def test_prompt_tokens_are_the_completion_prompt(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post("/tokenize", json={"model": BASE_ID, "prompt": "hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] is None
    assert body["count"] == len(body["tokens"]) > 0
    await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 1})
    assert engine.calls[-1].prompt_token_ids == body["tokens"]


async def test_message_tokens_are_the_chat_prompt(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post("/tokenize", json={"messages": CHAT})
    assert r.status_code == 200, r.text
    await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert engine.calls[-1].prompt_token_ids == r.json()["tokens"]
    without = await client.post(
        "/tokenize", json={"messages": CHAT, "add_generation_prompt": False}
    )
    assert without.json()["count"] < r.json()["count"]
    assert r.json()["tokens"][: without.json()["count"]] == without.json()["tokens"]


async def test_tool_messages_render(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = await client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["count"] > 0


async def test_special_tokens_and_token_strings(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    tokenizer = engine.tokenizer
    r = await client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    body = r.json()
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = await client.post(
        "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}
    )
    assert plain.json()["tokens"] == tokenizer("hello world", add_special_tokens=False).input_ids


async def test_adapters_share_the_base_tokenizer(client: httpx.AsyncClient) -> None:
    base = await client.post("/tokenize", json={"prompt": "hi"})
    adapter = await client.post("/tokenize", json={"model": "alpha", "prompt": "hi"})
    assert adapter.status_code == 200
    assert adapter.json() == base.json()


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_unknown_model_is_404(client: httpx.AsyncClient, path: str) -> None:
    body = {"model": "nope", "prompt": "hi", "tokens": [1]}
    body.pop("tokens" if path == "/tokenize" else "prompt")
    r = await client.post(path, json=body)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")


async def test_detokenize_round_trip(client: httpx.AsyncClient) -> None:
    tokens = (
        await client.post(
            "/tokenize", json={"prompt": "the quick brown fox", "add_special_tokens": False}
        )
    ).json()["tokens"]
    r = await client.post("/detokenize", json={"model": BASE_ID, "tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": "the quick brown fox"}
    empty = await client.post("/detokenize", json={"tokens": []})
    assert empty.json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/detokenize", {"tokens": [10**7]}, "tokens", "invalid_request"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]", "invalid_value"),
        ("/detokenize", {"tokens": ["a"]}, "tokens[0]", "invalid_value"),
        ("/detokenize", {}, "tokens", "missing_required_parameter"),
        ("/tokenize", {}, "prompt", "missing_required_parameter"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt", "missing_required_parameter"),
        ("/tokenize", {"prompt": "hi " * 5000}, "prompt", "context_length_exceeded"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "hi " * 5000}]},
            "messages",
            "context_length_exceeded",
        ),
        ("/tokenize", {"prompt": "a", "tools": []}, "tools", "invalid_value"),
        ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, "add_special_tokens", None),
        ("/tokenize", {"messages": [{"role": "user"}]}, "messages[0].content", None),
        ("/tokenize", {"prompt": "a", "foo": 1}, "foo", "unrecognized_argument"),
    ],
)
async def test_bad_requests(
    client: httpx.AsyncClient, path: str, body: dict, param: str, code: str | None
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


async def test_a_reserved_template_argument_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/tokenize",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"tokenize": False},
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template_kwargs.tokenize"


async def test_needs_an_inference_key() -> None:
    app = create_app(FakeEngine(), api_keys=ApiKeys(inference=("k",)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert (await c.post(path, json=body)).status_code == 401
            ok = await c.post(path, json=body, headers={"Authorization": "Bearer k"})
            assert ok.status_code == 200, ok.text
