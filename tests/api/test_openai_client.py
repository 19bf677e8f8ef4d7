"""The official `openai` package works against the server, over real HTTP (uvicorn)."""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import LiveServer
from tests.api.fake_engine import ADAPTER_REPLIES, BASE_ID, BASE_REPLY

CHAT = [{"role": "user", "content": "hello"}]


def test_completions_create(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model=BASE_ID, prompt="hello", max_tokens=5, logprobs=2)
    assert completion.id.startswith("cmpl-")
    assert completion.model == BASE_ID
    (choice,) = completion.choices
    assert choice.text == BASE_REPLY[: len(choice.text)]
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 5
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_completions_stream(oai: openai.OpenAI) -> None:
    stream = oai.completions.create(
        model="alpha", prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ADAPTER_REPLIES["alpha"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_chat_completions_create(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model="beta", messages=CHAT, logprobs=True, top_logprobs=2, temperature=0
    )
    assert chat.id.startswith("chatcmpl-")
    (choice,) = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ADAPTER_REPLIES["beta"]
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert chat.usage is not None
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_chat_completions_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=BASE_ID, messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == BASE_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list().data
    assert [m.id for m in models] == [BASE_ID, *ADAPTER_REPLIES]
    assert models[0].owned_by == "adapterhub"
    assert models[0].model_extra is not None and models[0].model_extra["parent"] is None
    assert all(m.model_extra and m.model_extra["parent"] == BASE_ID for m in models[1:])


def test_unknown_model_raises_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="missing", messages=CHAT)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="missing", prompt="hi", stream=True)


def test_bad_request_raises_bad_request(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_ID, prompt="hi", temperature=3)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=BASE_ID, prompt="hi", max_tokens=10_000)
    assert info.value.code == "context_length_exceeded"


def test_request_id_header(oai: openai.OpenAI) -> None:
    raw = oai.completions.with_raw_response.create(
        model=BASE_ID, prompt="hi", extra_headers={"x-request-id": "trace-1"}
    )
    assert raw.headers["x-request-id"] == "trace-1"
    raw.parse()


def test_extensions_via_extra_body(oai: openai.OpenAI, live_server: LiveServer) -> None:
    oai.completions.create(model=BASE_ID, prompt="hi", extra_body={"top_k": 3, "ignore_eos": True})
    params = live_server.engine.calls[-1].params
    assert params.top_k == 3 and params.ignore_eos is True
