"""The async front of the engine: a bounded queue that refuses at once, and the drain that
precedes shutdown. Real engine thread, tiny random model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.outputs import RequestOutput
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import ContextLengthError, QueueFullError, ShuttingDownError
from tests.engine.test_engine import _engine

PROMPT = [5, 17, 42, 8, 99]
# max_num_seqs=2 and max_queued_requests=1: three requests outstanding fill it.
CAPACITY = 3


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture
def client(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AsyncLLMEngine]:
    engine = _engine(tiny_base, {}, max_num_seqs=2)
    real = engine.model.forward

    def slow_forward(*args, **kwargs):
        # A few ms per step: long requests outlive the test's waits on a tiny model.
        time.sleep(0.005)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
    client = AsyncLLMEngine(engine, base_model_id="tiny", max_queued_requests=1)
    client.start()
    yield client
    client.shutdown()


def _generate(client: AsyncLLMEngine, rid: str, max_tokens: int) -> AsyncIterator[RequestOutput]:
    return client.generate(
        request_id=rid, prompt_token_ids=PROMPT, params=_params(max_tokens), adapter=None
    )


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def _collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


async def _engine_idle(client: AsyncLLMEngine) -> None:
    await _until(lambda: not client.engine.has_work())


def test_a_full_queue_refuses_at_once_and_reopens(client: AsyncLLMEngine) -> None:
    async def scenario() -> None:
        assert client.max_outstanding == CAPACITY
        streams = [_generate(client, f"r{i}", 200) for i in range(CAPACITY)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.wait(firsts[:2])  # two run; the third waits for a batch slot
        await _until(lambda: client.num_outstanding == CAPACITY)

        # Hold the engine thread inside a command: the refusal must not need it.
        gate = threading.Event()
        blocker = asyncio.ensure_future(client.call_on_engine(lambda: gate.wait(30)))
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(QueueFullError, match=r"queue is full.*retry"):
                await asyncio.wait_for(anext(_generate(client, "extra", 5)), timeout=5)
        finally:
            gate.set()
            await blocker
        # Nothing of the refused request reached the engine.
        assert client.engine.num_running + client.engine.num_waiting == CAPACITY

        # A cancelled caller (here the waiting one) frees its place at once.
        firsts[2].cancel()
        await asyncio.gather(firsts[2], return_exceptions=True)
        assert client.num_outstanding == CAPACITY - 1
        again = _generate(client, "again", 3)
        again_first = asyncio.ensure_future(anext(again))
        await _until(lambda: client.num_outstanding == CAPACITY)

        # So does one that stops reading: its request is aborted and "again" gets its slot.
        await streams[0].aclose()
        outputs = [await again_first, *await _collect(again)]
        assert outputs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outputs) == 3
        await streams[1].aclose()
        assert client.num_outstanding == 0
        await _engine_idle(client)

    asyncio.run(scenario())


def test_requests_that_end_any_way_leave_no_count_behind(client: AsyncLLMEngine) -> None:
    async def scenario() -> None:
        for _ in range(2):  # more requests in all than the capacity
            outs = await asyncio.gather(
                *(_collect(_generate(client, f"ok{i}", 4)) for i in range(3))
            )
            assert all(o[-1].finish_reason == "length" for o in outs)
        with pytest.raises(ContextLengthError):  # refused by the engine thread
            await anext(_generate(client, "too-long", 10_000))
        # Cancelled while being admitted.
        gate = threading.Event()
        blocker = asyncio.ensure_future(client.call_on_engine(lambda: gate.wait(30)))
        pending = asyncio.ensure_future(anext(_generate(client, "cancelled", 4)))
        await _until(lambda: client.num_outstanding == 1)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        gate.set()
        await blocker
        assert client.num_outstanding == 0
        # The full capacity is available again.
        outs = await asyncio.gather(
            *(_collect(_generate(client, f"after{i}", 2)) for i in range(CAPACITY))
        )
        assert all(o[-1].finish_reason == "length" for o in outs)
        assert client.num_outstanding == 0
        await _engine_idle(client)

    asyncio.run(scenario())


def test_a_failed_request_frees_its_place(client: AsyncLLMEngine) -> None:
    async def scenario() -> None:
        real = client.engine.model.forward

        def failing(input_ids, *args):
            if 77 in input_ids.tolist():
                raise RuntimeError("poison")
            return real(input_ids, *args)

        client.engine.model.forward = failing  # type: ignore[method-assign]
        stream = client.generate(
            request_id="bad", prompt_token_ids=[77, 1, 2], params=_params(4), adapter=None
        )
        outs = await _collect(stream)
        assert outs[-1].finish_reason == "error" and outs[-1].error_code == "internal_error"
        assert client.num_outstanding == 0

    asyncio.run(scenario())


def test_drain_finishes_what_it_can_and_aborts_the_rest(client: AsyncLLMEngine) -> None:
    async def scenario() -> None:
        short = asyncio.ensure_future(_collect(_generate(client, "short", 3)))
        long = asyncio.ensure_future(_collect(_generate(client, "long", 240)))
        await _until(lambda: client.num_outstanding == 2)
        drain = asyncio.ensure_future(client.drain(timeout=0.5))
        await asyncio.sleep(0)
        assert client.draining
        with pytest.raises(ShuttingDownError):
            await anext(_generate(client, "late", 3))

        await drain
        short_out, long_out = short.result(), long.result()  # both ended by now
        assert short_out[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in short_out) == 3
        assert long_out[-1].finish_reason == "abort"
        assert long_out[-1].error_code == "shutting_down"
        assert 0 < sum(len(o.token_ids) for o in long_out) < 240
        assert client.num_outstanding == 0
        # Drain leaves the engine thread to shutdown().
        assert client.running
        await _engine_idle(client)
        with pytest.raises(ShuttingDownError):
            await anext(_generate(client, "later", 3))

    asyncio.run(scenario())


def test_drain_returns_once_everything_finished(client: AsyncLLMEngine) -> None:
    async def scenario() -> None:
        streams = [asyncio.ensure_future(_collect(_generate(client, f"r{i}", 5))) for i in range(3)]
        await _until(lambda: client.num_outstanding == 3)
        # A hang guard, far below drain's own timeout: drain must not sit that out.
        await asyncio.wait_for(client.drain(timeout=3600), timeout=60)
        for task in streams:
            assert task.result()[-1].finish_reason == "length"

    asyncio.run(scenario())
