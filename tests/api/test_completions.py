"""`POST /v1/completions`: response shape, prompts, sampling mapping, logprobs, streaming."""

from __future__ import annotations

import httpx
import pytest

from client.types import Completion
from tests.api.conftest import sse_json
from tests.api.fake_engine import ADAPTER_REPLIES, BASE_ID, BASE_REPLY, FakeEngine, fake_logprob

pytestmark = pytest.mark.anyio


async def test_completion_shape_and_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"model": BASE_ID, "prompt": "hello"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int)
    assert body["model"] == BASE_ID
    assert body["choices"] == [
        {"index": 0, "text": BASE_REPLY, "logprobs": None, "finish_reason": "stop"}
    ]
    prompt_tokens = len(engine.tokenizer("hello").input_ids)
    completion_tokens = len(engine.tokenizer(BASE_REPLY).input_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    Completion.model_validate(body)
    (call,) = engine.calls
    assert call.adapter is None
    assert call.request_id == body["id"]
    assert engine.finished == [call.request_id]


async def test_adapter_is_resolved_and_model_echoed(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post("/v1/completions", json={"model": "alpha", "prompt": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "alpha"
    assert r.json()["choices"][0]["text"] == ADAPTER_REPLIES["alpha"]
    assert engine.calls[0].adapter == "alpha"


async def test_missing_model_means_base(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == BASE_ID
    assert engine.calls[0].adapter is None


async def test_served_model_name_addresses_the_base(engine: FakeEngine) -> None:
    from adapterhub_server.api import create_app

    app = create_app(engine, served_model_name="my-base")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.post("/v1/completions", json={"model": "my-base", "prompt": "hi"})
        models = (await c.get("/v1/models")).json()["data"]
    assert r.status_code == 200, r.text
    assert engine.calls[0].adapter is None
    assert models[0]["id"] == "my-base"
    assert models[0]["root"] == BASE_ID
    assert {m["parent"] for m in models[1:]} == {"my-base"}


async def test_max_tokens_length_and_default(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    await client.post("/v1/completions", json={"prompt": "hi"})
    assert engine.calls[0].params.max_tokens == 3
    assert engine.calls[1].params.max_tokens == 16  # OpenAI's default for completions


async def test_stop_string(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "stop": " w"})
    choice = r.json()["choices"][0]
    assert choice == {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "stop"}


async def test_sampling_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "hi",
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "seed": 42,
            "stop": ["x", "y"],
            "stop_token_ids": [5, 6],
            "ignore_eos": True,
            "skip_special_tokens": False,
            "user": "u1",
            "frequency_penalty": 0.5,
            "presence_penalty": -1,
            "logit_bias": {"5": -100, "17": 2.5},
            "repetition_penalty": 1.2,
            "min_p": 0.05,
            "min_tokens": 3,
        },
    )
    assert r.status_code == 200, r.text
    params = engine.calls[0].params
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((5, -100.0), (17, 2.5))
    assert (params.repetition_penalty, params.min_p, params.min_tokens) == (1.2, 0.05, 3)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 7, 42)
    assert params.stop == ("x", "y")
    assert params.stop_token_ids == (5, 6)
    assert params.ignore_eos is True
    assert params.skip_special_tokens is False
    assert params.logprobs is None
    assert params.extra == {"user": "u1"}


async def test_defaults_reach_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/completions", json={"prompt": "hi"})
    params = engine.calls[0].params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, -1, None)
    assert params.stop == ()
    assert not params.processes_logits and params.min_p == 0.0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ],
)
async def test_bad_sampling_values_are_400_naming_the_field(
    client: httpx.AsyncClient, engine: FakeEngine, body: dict, param: str
) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not engine.calls


async def test_several_prompts_give_indexed_choices(engine: FakeEngine) -> None:
    from adapterhub_server.api import create_app

    engine.echo_prompt = True
    app = create_app(engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.post(
            "/v1/completions", json={"prompt": ["the lazy dog", "paris"], "max_tokens": 20}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == ["the lazy dog", "paris"]
    assert len({call.request_id for call in engine.calls}) == 2
    tokens = [len(engine.tokenizer(p).input_ids) for p in ("the lazy dog", "paris")]
    assert body["usage"]["prompt_tokens"] == sum(tokens)
    assert body["usage"]["completion_tokens"] == sum(tokens)


@pytest.mark.parametrize(
    "prompt",
    [[261, 78, 78, 81], [[261, 78], [81, 70]]],
    ids=["token-ids", "list-of-token-ids"],
)
async def test_token_id_prompts(client: httpx.AsyncClient, engine: FakeEngine, prompt) -> None:
    r = await client.post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    expected = [prompt] if isinstance(prompt[0], int) else prompt
    assert [call.prompt_token_ids for call in engine.calls] == expected
    assert len(r.json()["choices"]) == len(expected)


async def test_logprobs_legacy_shape(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "logprobs": 2})
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.logprobs == 2
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = r.json()["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == [fake_logprob(i) for i in range(n)]
    assert lp["text_offset"][0] == 0
    for token, offset, next_offset in zip(lp["tokens"], lp["text_offset"], lp["text_offset"][1:]):
        assert next_offset == offset + len(token)
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == chosen  # the sampled token is always listed
        assert 1 <= len(top) <= 3


async def test_logprobs_zero_lists_only_the_sampled_token(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert all(len(top) == 1 for top in lp["top_logprobs"])


async def test_stream_format(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    for chunk in chunks:
        Completion.model_validate(chunk)
        assert chunk["object"] == "text_completion"
        assert "usage" not in chunk
        assert [c["index"] for c in chunk["choices"]] == [0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == BASE_REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert engine.aborted == []


async def test_stream_include_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = sse_json(r.text)
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(chunks) - 1
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    assert all("usage" not in c for c in chunks[:-1])


async def test_stream_several_prompts(engine: FakeEngine) -> None:
    from adapterhub_server.api import create_app

    engine.echo_prompt = True
    app = create_app(engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        r = await c.post("/v1/completions", json={"prompt": ["paris", "lazy dog"], "stream": True})
    chunks = sse_json(r.text)
    texts = {0: "", 1: ""}
    finished = []
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished.append(choice["index"])
    assert texts == {0: "paris", 1: "lazy dog"}
    assert sorted(finished) == [0, 1]


async def test_stream_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True, "logprobs": 1})
    chunks = sse_json(r.text)
    offsets = []
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        assert lp["tokens"] == [chunk["choices"][0]["text"]]
        offsets += lp["text_offset"]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0
