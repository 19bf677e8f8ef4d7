"""`GET /v1/models` and `GET /health`."""

from __future__ import annotations

import httpx
import pytest

from adapterhub_server.engine.protocol import ServableAdapter
from client.types import ModelList
from tests.api.fake_engine import BASE_ID, FakeEngine

pytestmark = pytest.mark.anyio


async def test_models_lists_base_then_adapters(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    ModelList.model_validate(body)
    assert body["object"] == "list"
    base, *adapters = body["data"]
    assert base == {
        "id": BASE_ID,
        "object": "model",
        "created": base["created"],
        "owned_by": "adapterhub",
        "parent": None,
        "root": BASE_ID,
    }
    assert [a["id"] for a in adapters] == ["alpha", "beta"]
    for adapter in adapters:
        assert adapter["object"] == "model"
        assert adapter["owned_by"] == "adapterhub"
        assert adapter["parent"] == BASE_ID
        assert adapter["root"] == BASE_ID
    assert [a["created"] for a in adapters] == [1_700_000_000, 1_700_000_001]


async def test_models_follow_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """The list is read per request: an adapter that becomes servable shows up at once."""
    engine.adapters["gamma"] = ServableAdapter(name="gamma", rank=4, created=5, source="gamma")
    ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert ids == [BASE_ID, "alpha", "beta", "gamma"]


async def test_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert r.headers["x-request-id"]


async def test_openapi_documents_the_error_envelope(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses  # validation errors answer 400
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert "text/event-stream" in responses["200"]["content"]
