"""A full queue answers 429 with Retry-After, at once, for exactly the requests past capacity.

The real tiny engine is held between two steps (a command on its thread waits on an event),
so nothing admitted can finish while the burst arrives: with `max_num_seqs=2` and
`max_queued_requests=2`, four of seven concurrent requests are accepted and three refused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_async_engine
from tests.reliability.conftest import assert_error_envelope

MAX_NUM_SEQS, MAX_QUEUED, BURST = 2, 2, 7
BODY = {"model": "tiny-base", "prompt": "hello", "max_tokens": 3, "temperature": 0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_burst_past_capacity_gets_exactly_the_overflow_as_429(tiny_base: Path) -> None:
    engine = build_async_engine(
        ServerConfig(
            base_model=str(tiny_base),
            served_model_name="tiny-base",
            engine=EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_queued_requests=MAX_QUEUED),
        )
    )
    engine.start()
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert gate.wait(60), "the test never released the engine"

    transport = httpx.ASGITransport(app=build_app(engine))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = asyncio.ensure_future(engine.call_on_engine(hold))
            await asyncio.to_thread(holding.wait, 30)
            tasks = [
                asyncio.ensure_future(client.post("/v1/completions", json=BODY))
                for _ in range(BURST)
            ]
            overflow = BURST - MAX_NUM_SEQS - MAX_QUEUED
            # The refusals come back while the engine is still held: they did not queue.
            deadline = time.monotonic() + 30
            while sum(t.done() for t in tasks) < overflow:
                assert time.monotonic() < deadline, "no 429 while the queue was full"
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=1)
            refused = [t.result() for t in tasks if t.done()]
            gate.set()
            await held
            responses = await asyncio.gather(*tasks)

            assert len(refused) == overflow
            for r in refused:
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert_error_envelope(r.json(), status=429)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] * (MAX_NUM_SEQS + MAX_QUEUED) + [429] * overflow
            # Capacity came back: the refused requests left nothing counted behind.
            after = await asyncio.gather(
                *(client.post("/v1/completions", json=BODY) for _ in range(2))
            )
            assert [r.status_code for r in after] == [200, 200]
    finally:
        gate.set()
        engine.shutdown()
