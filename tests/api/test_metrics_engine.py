"""Adapter-cache and batching metrics from a real engine over a tiny random model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from adapterhub_server.api import create_app
from adapterhub_server.api.metrics import observe_engine
from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine
from adapterhub_server.lora.cache import StaticAdapterSource
from tests.api.test_metrics import samples, value

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine_client(
    tiny_base: Path, tiny_adapters: dict[str, Path], anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over a running engine with one adapter, loaded lazily on first use."""
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_loras=2)
    engine = build_engine(
        ResolvedBaseModel(tiny_base, "tiny", "local"),
        config,
        source=StaticAdapterSource({"r4": tiny_adapters["r4"]}),
    )
    async_engine = AsyncLLMEngine(engine, base_model_id="tiny")
    app = create_app(async_engine)
    observe_engine(app, engine)
    async_engine.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        async_engine.shutdown()


async def test_adapter_cache_miss_then_hit(engine_client: httpx.AsyncClient) -> None:
    body = {"model": "r4", "prompt": "hello world", "max_tokens": 3, "ignore_eos": True}
    for _ in range(2):  # one after the other: the second finds the adapter in its slot
        response = await engine_client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
    base = {**body, "model": "tiny"}
    assert (await engine_client.post("/v1/completions", json=base)).status_code == 200

    m = samples((await engine_client.get("/metrics")).text)
    assert value(m, "adapterhub_adapter_cache_misses_total") == 1
    assert value(m, "adapterhub_adapter_cache_hits_total") == 1
    assert value(m, "adapterhub_adapter_loads_total") == 1
    assert value(m, "adapterhub_adapter_load_seconds_count") == 1
    assert value(m, "adapterhub_adapter_evictions_total") == 0
    assert value(m, "adapterhub_adapter_slots_used") == 1
    assert value(m, "adapterhub_adapter_slots_total") == 2
    assert value(m, "adapterhub_running_sequences") == 0
    # Each request: one prefill step and two decode steps, one sequence each.
    assert value(m, "adapterhub_batch_sequences_count") == 9
    assert value(m, "adapterhub_batch_sequences_sum") == 9
    assert value(m, "adapterhub_time_to_first_token_seconds_count", adapter="r4") == 2
    assert value(m, "adapterhub_generation_tokens_total", adapter="r4") == 6
    assert value(m, "adapterhub_generation_tokens_total", adapter="") == 3


async def test_kv_cache_and_prefix_metrics(engine_client: httpx.AsyncClient) -> None:
    """A repeated long prompt is served from the prefix cache: the token counters say so,
    and nothing holds blocks once the requests are done."""
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    for _ in range(2):
        response = await engine_client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 2 * 16

    m = samples((await engine_client.get("/metrics")).text)
    assert value(m, "adapterhub_prefix_cache_queries_tokens_total") == 2 * prompt_tokens
    # The second request reuses every full block of 16 but the one holding its last token.
    hit = (prompt_tokens - 1) // 16 * 16
    assert value(m, "adapterhub_prefix_cache_hits_tokens_total") == hit
    assert value(m, "adapterhub_kv_cache_usage_ratio") == 0
    assert value(m, "adapterhub_preemptions_total") == 0
