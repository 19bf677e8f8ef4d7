"""Fixtures for HTTP-layer tests: the fake engine, the app, in-process and real clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from fastapi import FastAPI

from adapterhub_server.api import create_app
from tests.api.fake_engine import FakeEngine
from tests.live_server import serve


@pytest.fixture
def anyio_backend() -> str:
    # The service merges streams with asyncio primitives.
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine) -> FastAPI:
    return create_app(engine)


@pytest.fixture
async def client(app: FastAPI, anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    """In-process client: no sockets, the app runs in the test's event loop."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of a server-sent-event body, in order (`[DONE]` included)."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        events.append(block.removeprefix("data: "))
    return events


def sse_json(body: str) -> list[dict]:
    """The JSON events of an SSE body; asserts that it ends with exactly one `[DONE]`."""
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


@dataclass
class LiveServer:
    """A uvicorn server on a free local port, serving the app over a fake engine."""

    engine: FakeEngine
    base_url: str


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """One real HTTP server per module; tests must not change its engine's settings."""
    engine = FakeEngine()
    with serve(create_app(engine)) as base_url:
        yield LiveServer(engine=engine, base_url=base_url)


@pytest.fixture
def slow_live_server() -> Iterator[LiveServer]:
    """A real HTTP server whose engine emits one token every 50 ms."""
    engine = FakeEngine(step_delay=0.05, echo_prompt=True)
    with serve(create_app(engine)) as base_url:
        yield LiveServer(engine=engine, base_url=base_url)


@pytest.fixture
def oai(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    """The official `openai` client on `live_server` (no retries: a failing status must
    fail the test at once, not after back-off)."""
    with openai.OpenAI(
        base_url=f"{live_server.base_url}/v1", api_key="x", max_retries=0, timeout=30
    ) as client:
        yield client
