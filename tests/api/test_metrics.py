"""`GET /metrics` over the fake engine: request, generation and engine-load metrics."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from adapterhub_server.api import create_app
from adapterhub_server.api.metrics import UNKNOWN_ADAPTER, UNMATCHED_ROUTE
from adapterhub_server.engine.protocol import EngineStats
from tests.api.fake_engine import BASE_ID, FakeEngine

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, keyed by (sample name, its labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scrape: dict, name: str, **labels: str) -> float | None:
    return scrape.get((name, frozenset(labels.items())))


def label_values(scrape: dict, name: str, label: str) -> set[str]:
    return {dict(key)[label] for sample, key in scrape if sample == name and label in dict(key)}


async def scrape(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_counts_requests_by_route_status_and_adapter(client: httpx.AsyncClient) -> None:
    base = await client.post(
        "/v1/completions", json={"model": BASE_ID, "prompt": "hi", "max_tokens": 2}
    )
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    whole = await client.post("/v1/chat/completions", json=chat)
    streamed = await client.post(
        "/v1/chat/completions",
        json={**chat, "stream": True, "stream_options": {"include_usage": True}},
    )
    unknown = await client.post(
        "/v1/completions", json={"model": "no-such-adapter", "prompt": "hi"}
    )
    malformed = await client.post("/v1/completions", content=b"{not json")
    missing = await client.get("/v1/nothing/here/42")
    assert [r.status_code for r in (base, whole, streamed, unknown, malformed, missing)] == [
        200,
        200,
        200,
        404,
        400,
        404,
    ]
    m = await scrape(client)

    total = "adapterhub_http_requests_total"
    completions = {"route": "/v1/completions", "method": "POST"}
    chats = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(m, total, **completions, status="200", adapter="") == 1
    assert value(m, total, **chats, status="200", adapter="alpha") == 2
    # An unknown model and a body that names none share one label value.
    assert value(m, total, **completions, status="404", adapter=UNKNOWN_ADAPTER) == 1
    assert value(m, total, **completions, status="400", adapter=UNKNOWN_ADAPTER) == 1
    assert value(m, total, route=UNMATCHED_ROUTE, method="GET", status="404", adapter="") == 1
    assert label_values(m, total, "adapter") == {"", "alpha", UNKNOWN_ADAPTER}
    assert not any("nothing" in r for r in label_values(m, total, "route"))

    duration = "adapterhub_http_request_duration_seconds_count"
    assert value(m, duration, **completions) == 3
    assert value(m, duration, **chats) == 2

    # Time to first token: once per request that generated anything, by adapter.
    ttft = "adapterhub_time_to_first_token_seconds_count"
    assert value(m, ttft, adapter="") == 1
    assert value(m, ttft, adapter="alpha") == 2

    usage = [base.json()["usage"], whole.json()["usage"]]
    streamed_usage = [
        e for e in streamed.text.split("\n\n") if '"usage":{' in e and '"choices":[]' in e
    ]
    assert len(streamed_usage) == 1
    assert (
        value(m, "adapterhub_generation_tokens_total", adapter="")
        == (usage[0]["completion_tokens"])
    )
    assert value(m, "adapterhub_prompt_tokens_total", adapter="") == usage[0]["prompt_tokens"]
    # Both alpha replies are the same text, generated to the end.
    assert value(m, "adapterhub_generation_tokens_total", adapter="alpha") == (
        2 * usage[1]["completion_tokens"]
    )


async def test_route_label_is_the_template_not_the_path(app: FastAPI) -> None:
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    app.add_api_route("/items/{item_id}", item, methods=["GET"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for item_id in ("a", "b", "c"):
            assert (await client.get(f"/items/{item_id}")).status_code == 200
        assert (await client.post("/items/d")).status_code == 405
        m = await scrape(client)
    total = "adapterhub_http_requests_total"
    assert value(m, total, route="/items/{item_id}", method="GET", status="200", adapter="") == 3
    assert value(m, total, route="/items/{item_id}", method="POST", status="405", adapter="") == 1
    assert not any("/items/a" in r for r in label_values(m, total, "route"))


async def test_engine_gauges_and_counters_are_read_at_scrape_time(
    client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = EngineStats(
        running=3,
        waiting=5,
        max_num_seqs=8,
        adapter_slots_used=2,
        adapter_slots_total=4,
        adapters_in_host_memory=6,
        adapter_loads=7,
        adapter_evictions=1,
        adapter_cache_hits=11,
        adapter_cache_misses=4,
    )
    monkeypatch.setattr(engine, "stats", lambda: stats)
    m = await scrape(client)
    assert value(m, "adapterhub_running_sequences") == 3
    assert value(m, "adapterhub_queued_sequences") == 5
    assert value(m, "adapterhub_max_running_sequences") == 8
    assert value(m, "adapterhub_adapter_slots_used") == 2
    assert value(m, "adapterhub_adapter_slots_total") == 4
    assert value(m, "adapterhub_adapters_in_host_memory") == 6
    assert value(m, "adapterhub_adapter_loads_total") == 7
    assert value(m, "adapterhub_adapter_evictions_total") == 1
    assert value(m, "adapterhub_adapter_cache_hits_total") == 11
    assert value(m, "adapterhub_adapter_cache_misses_total") == 4
    assert value(m, "adapterhub_ready") == 1

    def broken() -> EngineStats:
        raise RuntimeError("engine is gone")

    monkeypatch.setattr(engine, "stats", broken)
    engine.is_ready = False
    m = await scrape(client)  # still answers, with what it can read
    assert value(m, "adapterhub_ready") == 0
    assert value(m, "adapterhub_running_sequences") is None


async def test_step_observer_feeds_the_batch_histograms(app: FastAPI) -> None:
    metrics = app.state.metrics
    for seqs, tokens in ((1, 7), (4, 4), (4, 40)):
        metrics.observe_step(seqs, tokens)
    metrics.observe_adapter_load("alpha@1", 0.02)
    m = samples(metrics.render()[0].decode())
    assert value(m, "adapterhub_batch_sequences_count") == 3
    assert value(m, "adapterhub_batch_sequences_sum") == 9
    assert value(m, "adapterhub_batch_sequences_bucket", le="2.0") == 1
    assert value(m, "adapterhub_batch_tokens_sum") == 51
    assert value(m, "adapterhub_adapter_load_seconds_count") == 1


async def test_each_app_has_its_own_registry(anyio_backend: str) -> None:
    first, second = create_app(FakeEngine()), create_app(FakeEngine())
    for app, n in ((first, 2), (second, 1)):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(n):
                assert (await client.get("/v1/models")).status_code == 200
    for app, n in ((first, 2), (second, 1)):
        m = samples(app.state.metrics.render()[0].decode())
        labels = {"route": "/v1/models", "method": "GET", "status": "200", "adapter": ""}
        assert value(m, "adapterhub_http_requests_total", **labels) == n


async def test_requests_refused_before_routing_keep_their_route_label() -> None:
    from adapterhub_server.api.auth import ApiKeys

    app = create_app(FakeEngine(), api_keys=ApiKeys(inference=("k",)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.post("/v1/chat/completions", json={})).status_code == 401
        response = await c.get("/metrics", headers={"Authorization": "Bearer k"})
    m = samples(response.text)
    total = "adapterhub_http_requests_total"
    assert value(m, total, route="/v1/models", method="GET", status="401", adapter="") == 1
    chats = {"route": "/v1/chat/completions", "method": "POST", "status": "401"}
    assert value(m, total, **chats, adapter=UNKNOWN_ADAPTER) == 1
