"""Models, completions and chat, sync and async, plain and streamed, over real HTTP."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from client import (
    AdapterHubClient,
    AsyncAdapterHubClient,
    AsyncStream,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    InternalServerError,
    NotFoundError,
    Stream,
)
from tests.api.fake_engine import ADAPTER_REPLIES, BASE_REPLY
from tests.client.conftest import TINY_BASE_ID, Fake

CHAT = [{"role": "user", "content": "hello"}]
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 2


@pytest.fixture
def hub(fake: Fake) -> Iterator[AdapterHubClient]:
    with AdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
async def ahub(fake: Fake, anyio_backend: str) -> AsyncIterator[AsyncAdapterHubClient]:
    async with AsyncAdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as client:
        yield client


def _wait_for_abort(fake: Fake) -> None:
    deadline = time.monotonic() + 10
    while not fake.engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)


# -- the real engine on the tiny model -------------------------------------------------------


def test_real_engine_sync(tiny: str) -> None:
    with AdapterHubClient(base_url=tiny + "/v1", max_retries=0) as hub:  # `/v1` is accepted
        assert hub.health().status == "ok"
        models = hub.models.list()
        assert models.data[0].id == TINY_BASE_ID and models.data[0].parent is None
        greedy = hub.completions.create(
            model=TINY_BASE_ID, prompt="hello", max_tokens=6, temperature=0, ignore_eos=True
        )
        assert isinstance(greedy, Completion)
        assert greedy.usage is not None and greedy.usage.completion_tokens == 6
        with hub.completions.create(
            model=TINY_BASE_ID,
            prompt="hello",
            max_tokens=6,
            temperature=0,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy.choices[0].text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

        with pytest.raises(BadRequestError) as info:
            hub.completions.create(model=TINY_BASE_ID, prompt="hello", max_tokens=5000)
        assert info.value.status_code == 400
        assert info.value.code == "context_length_exceeded"
        assert info.value.param == "max_tokens"
        with pytest.raises(NotFoundError) as missing:
            hub.chat.completions.create(model="no-such-adapter", messages=CHAT)
        assert missing.value.code == "model_not_found" and missing.value.request_id


@pytest.mark.anyio
async def test_real_engine_async(tiny: str) -> None:
    async with AsyncAdapterHubClient(base_url=tiny, max_retries=0) as hub:
        assert (await hub.health()).status == "ok"
        assert (await hub.models.list()).data[0].id == TINY_BASE_ID
        reply = await hub.chat.completions.create(
            model=TINY_BASE_ID, messages=CHAT, max_completion_tokens=5, temperature=0, seed=3
        )
        assert isinstance(reply, ChatCompletion)
        stream = await hub.chat.completions.create(
            model=TINY_BASE_ID,
            messages=CHAT,
            max_completion_tokens=5,
            temperature=0,
            seed=3,
            stream=True,
        )
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == reply.choices[0].message.content
        with pytest.raises(BadRequestError) as info:
            await hub.completions.create(model=TINY_BASE_ID, prompt="hi", max_tokens=5000)
        assert info.value.code == "context_length_exceeded"


# -- the fake engine: exact replies, scripted failures ---------------------------------------


def test_completions_and_chat_sync(hub: AdapterHubClient, fake: Fake) -> None:
    models = hub.models.list()
    assert [m.id for m in models.data][1:] == list(ADAPTER_REPLIES)
    assert all(m.parent == models.data[0].id for m in models.data[1:])

    completion = hub.completions.create(
        model="alpha", prompt="hi", logprobs=2, stop="brown", seed=5, top_k=4, temperature=0.5
    )
    params = fake.engine.calls[-1].params
    assert (params.stop, params.seed, params.top_k, params.temperature) == (("brown",), 5, 4, 0.5)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is not None
    assert len(completion.choices[0].logprobs.tokens) > 0

    chat = hub.chat.completions.create(
        model="beta", messages=CHAT, logprobs=True, top_logprobs=2, temperature=0
    )
    assert chat.choices[0].message.content == ADAPTER_REPLIES["beta"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content

    stream = hub.chat.completions.create(
        model="beta", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, Stream)
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ADAPTER_REPLIES["beta"]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert stream.response.is_closed  # read to the end: released without a close()

    base = hub.completions.create(model="", prompt="hi", stream=True)
    assert "".join(c.choices[0].text for c in base) == BASE_REPLY


@pytest.mark.anyio
async def test_completions_and_chat_async(ahub: AsyncAdapterHubClient) -> None:
    assert len((await ahub.models.list()).data) == 1 + len(ADAPTER_REPLIES)
    completion = await ahub.completions.create(model="alpha", prompt="hi", max_tokens=2)
    assert completion.choices[0].finish_reason == "length"
    chat = await ahub.chat.completions.create(model="beta", messages=CHAT)
    assert chat.choices[0].message.content == ADAPTER_REPLIES["beta"]
    stream = await ahub.completions.create(model="alpha", prompt="hi", stream=True)
    assert isinstance(stream, AsyncStream)
    assert "".join([c.choices[0].text async for c in stream]) == ADAPTER_REPLIES["alpha"]
    assert stream.response.is_closed


def test_errors_sync(hub: AdapterHubClient) -> None:
    with pytest.raises(NotFoundError) as missing:
        hub.completions.create(model="nope", prompt="hi", stream=True)  # refused before a 200
    err = missing.value
    assert err.status_code == 404 and err.code == "model_not_found" and err.param == "model"
    assert err.body["error"]["type"] == "invalid_request_error"
    assert err.message == "The model `nope` does not exist."
    assert err.request_id and err.request_id in str(err)

    with pytest.raises(BadRequestError) as bad:
        hub.chat.completions.create(model="beta", messages=CHAT, temperature=3)
    assert bad.value.param == "temperature" and bad.value.code == "invalid_value"
    with pytest.raises(BadRequestError) as long:
        hub.completions.create(model="beta", prompt="hi", max_tokens=1000)
    assert long.value.code == "context_length_exceeded"


@pytest.mark.anyio
async def test_errors_async(ahub: AsyncAdapterHubClient) -> None:
    with pytest.raises(NotFoundError) as missing:
        await ahub.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(BadRequestError) as bad:
        await ahub.completions.create(model="alpha", prompt="hi", n=129)
    assert bad.value.status_code == 400 and bad.value.param == "n"


def test_error_event_mid_stream_raises_the_mapped_error(hub: AdapterHubClient, fake: Fake) -> None:
    fake.engine.fail_after = 2
    stream = hub.completions.create(model="alpha", prompt="hi", stream=True)
    received = []
    with pytest.raises(InternalServerError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].text)
    assert len(received) == 2  # what came before the failure was delivered
    assert info.value.status_code == 500 and info.value.type == "server_error"
    assert stream.response.is_closed


@pytest.mark.anyio
async def test_error_event_mid_stream_async(ahub: AsyncAdapterHubClient, fake: Fake) -> None:
    fake.engine.fail_after = 1
    stream = await ahub.chat.completions.create(model="beta", messages=CHAT, stream=True)
    with pytest.raises(InternalServerError):
        async for _ in stream:
            pass


def test_breaking_out_of_a_stream_releases_the_connection(
    hub: AdapterHubClient, fake: Fake
) -> None:
    fake.engine.step_delay = 0.05
    fake.engine.echo_prompt = True
    with hub.completions.create(model="", prompt=LONG_PROMPT, max_tokens=60, stream=True) as stream:
        for _ in stream:
            break
    assert stream.response.is_closed
    _wait_for_abort(fake)  # the server saw the disconnect and freed the batch slot
    assert fake.engine.aborted == [fake.engine.calls[-1].request_id]
    assert fake.engine.finished == []
    # The pool holds no connection still busy with the abandoned response.
    pool = hub._http._transport._pool  # type: ignore[attr-defined]
    assert all(c.is_idle() or c.is_closed() for c in pool.connections)


def test_a_dropped_stream_releases_the_connection(hub: AdapterHubClient, fake: Fake) -> None:
    fake.engine.step_delay = 0.05
    fake.engine.echo_prompt = True
    stream = hub.chat.completions.create(
        model="", messages=[{"role": "user", "content": LONG_PROMPT}], stream=True
    )
    next(stream)
    response = stream.response
    del stream
    gc.collect()
    assert response.is_closed
    _wait_for_abort(fake)
    assert len(fake.engine.aborted) == 1


@pytest.mark.anyio
async def test_async_stream_closed_early_releases_the_connection(
    ahub: AsyncAdapterHubClient, fake: Fake
) -> None:
    import anyio

    fake.engine.step_delay = 0.05
    fake.engine.echo_prompt = True
    stream = await ahub.completions.create(model="", prompt=LONG_PROMPT, max_tokens=60, stream=True)
    async with stream:
        async for _ in stream:
            break
    assert stream.response.is_closed
    with anyio.fail_after(10):
        while not fake.engine.aborted:
            await anyio.sleep(0.02)
    assert fake.engine.finished == []

    # Dropped without closing: closed from the event loop.
    dropped = await ahub.completions.create(
        model="", prompt=LONG_PROMPT, max_tokens=60, stream=True
    )
    await dropped.__anext__()
    response = dropped.response
    del dropped
    gc.collect()
    with anyio.fail_after(10):
        while len(fake.engine.aborted) < 2:
            await anyio.sleep(0.02)
    assert response.is_closed
