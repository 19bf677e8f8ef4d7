"""`POST /v1/chat/completions`: template, response shape, logprobs, streaming."""

from __future__ import annotations

import httpx
import pytest

from client.types import ChatCompletion, ChatCompletionChunk
from tests.api.conftest import sse_json
from tests.api.fake_engine import ADAPTER_REPLIES, BASE_REPLY, FakeEngine, fake_logprob

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
]


async def test_chat_shape_and_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "beta"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ADAPTER_REPLIES["beta"]},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    (call,) = engine.calls
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(call.prompt_token_ids)
    assert usage["completion_tokens"] == len(engine.tokenizer(ADAPTER_REPLIES["beta"]).input_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    ChatCompletion.model_validate(body)


async def test_prompt_is_the_chat_template_tokenized_once(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    await client.post("/v1/chat/completions", json={"messages": MESSAGES})
    tokenizer = engine.tokenizer
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    expected = tokenizer(rendered, add_special_tokens=False).input_ids
    assert engine.calls[0].prompt_token_ids == expected
    assert expected.count(tokenizer.bos_token_id) == 3  # one per message plus the reply's


async def test_content_parts_and_developer_role(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
        },
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 200, r.text
    decoded = engine.tokenizer.decode(engine.calls[0].prompt_token_ids)
    assert "<|im_start|>system\nbe brief<|im_end|>" in decoded
    assert "<|im_start|>user\nhello\nworld<|im_end|>" in decoded


async def test_max_tokens_fields(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
    await client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 5},
    )
    await client.post("/v1/chat/completions", json={"messages": MESSAGES})
    first, second, default = (call.params.max_tokens for call in engine.calls)
    assert (first, second) == (3, 5)
    # Without a limit, the reply may fill the rest of the context window.
    assert default == engine.max_model_len - len(engine.calls[2].prompt_token_ids)


async def test_length_finish(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_completion_tokens": 2}
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 2


async def test_chat_logprobs_shape(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 3}
    )
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.logprobs == 3
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for i, entry in enumerate(content):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == fake_logprob(i)
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])


async def test_logprobs_without_top(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True})
    assert engine.calls[0].params.logprobs == 0
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)


async def test_stream_chunks(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"].startswith("chatcmpl-")
        assert "usage" not in chunk
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == BASE_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert engine.aborted == []


async def test_stream_include_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = sse_json(r.text)
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == len(chunks) - 2  # minus the role and usage chunks
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stream_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "logprobs": True, "top_logprobs": 1},
    )
    chunks = sse_json(r.text)
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk carries no token
    for chunk in chunks[1:]:
        choice = chunk["choices"][0]
        (entry,) = choice["logprobs"]["content"]
        assert entry["token"] == choice["delta"]["content"]
