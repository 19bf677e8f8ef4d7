"""HTTP answers from the first second: probes while the engine loads, then every route."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapterhub_server.api import create_app
from adapterhub_server.startup import StartupApp
from tests.api.fake_engine import FakeEngine
from tests.live_server import serve


def _app_with_tracked_lifespan(events: list[str]) -> FastAPI:
    app = create_app(FakeEngine())

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        events.append("start")
        yield
        events.append("stop")

    app.router.lifespan_context = lifespan
    return app


def test_probes_answer_while_loading_then_every_route() -> None:
    release = threading.Event()
    events: list[str] = []
    failures: list[BaseException] = []

    def load() -> FastAPI:
        assert release.wait(30)
        return _app_with_tracked_lifespan(events)

    startup = StartupApp(load, on_failure=failures.append)
    with serve(startup, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        for method, path in (("GET", "/ready"), ("GET", "/v1/models"), ("POST", "/v1/files")):
            r = http.request(method, path)
            assert r.status_code == 503, path
            assert r.json()["error"]["code"] == "not_ready"
            assert r.headers["retry-after"] == "1"
            assert r.headers["x-request-id"]
        assert events == [] and not startup.loaded

        release.set()
        deadline_ok = False
        for _ in range(500):
            if http.get("/ready").status_code == 200:
                deadline_ok = True
                break
            threading.Event().wait(0.01)
        assert deadline_ok
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-base"
        assert events == ["start"]
    assert events == ["start", "stop"]  # the real app's lifespan is left at shutdown
    assert failures == [] and startup.failed is None


def test_a_failed_load_is_reported_and_keeps_answering_not_ready() -> None:
    failures: list[BaseException] = []

    def load() -> FastAPI:
        raise RuntimeError("no such model")

    startup = StartupApp(load, on_failure=failures.append)
    with serve(startup, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(500):
            if failures:
                break
            threading.Event().wait(0.01)
        assert [str(e) for e in failures] == ["no such model"]
        assert isinstance(startup.failed, RuntimeError)
        assert http.get("/v1/models").status_code == 503
        assert http.get("/health").status_code == 200


@pytest.mark.anyio
async def test_drain_before_loading_is_a_no_op() -> None:
    startup = StartupApp(lambda: None, on_failure=lambda _: None)
    await startup.drain(0.1)
