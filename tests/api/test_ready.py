"""`GET /ready` (readiness) versus `GET /health` (liveness), and what `ready` means."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from adapterhub_server.engine.async_engine import AsyncLLMEngine
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


async def test_ready_engine_answers_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_engine_not_ready_answers_503_with_retry_after(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.is_ready = False
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert error["type"] == "server_error"
    # Liveness is unaffected: the process is up, only not taking requests.
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    engine.is_ready = True
    assert (await client.get("/ready")).status_code == 200


def _idle_engine() -> SimpleNamespace:
    """Just enough of an `LLMEngine` for the loop to turn with nothing to do."""
    return SimpleNamespace(max_num_seqs=1, has_work=lambda: False, close=lambda: None)


async def test_async_engine_is_ready_only_while_its_loop_runs_and_admits() -> None:
    engine = AsyncLLMEngine(_idle_engine(), base_model_id="tiny")  # type: ignore[arg-type]
    assert not engine.ready  # built, but the loop has not started
    engine.start()
    try:
        assert engine.ready
        await engine.drain(timeout=0.1)
        assert not engine.ready  # draining: balancers must stop sending requests
    finally:
        engine.shutdown()
    assert not engine.ready
