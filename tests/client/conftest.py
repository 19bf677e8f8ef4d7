"""Real servers for the client tests, each on a free localhost port.

- `tiny`: the real engine on the tiny random model, with a registry and fine-tuning jobs
  that run the real trainer (adapters, the closed train -> query loop).
- `fake`: the fake engine (fast, scriptable: slow streams, failures mid-stream) with
  fine-tuning jobs run by the fake trainer (job life in milliseconds), and a small upload
  limit.
- `scripted`: a bare Starlette app that answers from a script of statuses, counting attempts
  (retries, timeouts, headers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapterhub_server.api import create_app
from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.finetune import BaseModelInfo, FineTuningService
from adapterhub_server.server import build_app, build_server
from tests.api.fake_engine import BASE_ID as FAKE_BASE_ID
from tests.api.fake_engine import FakeEngine
from tests.finetune.conftest import fake_runner
from tests.live_server import serve

TINY_BASE_ID = "tiny-base"
FAKE_UPLOAD_LIMIT = 64 * 1024


@pytest.fixture
def anyio_backend() -> str:
    # The server side of the in-process tests merges streams with asyncio primitives.
    return "asyncio"


@dataclass
class Fake:
    """The fake-engine server: its URL and engine (tests may script the engine)."""

    url: str
    engine: FakeEngine
    base_id: str = FAKE_BASE_ID


@dataclass
class Script:
    """What the scripted server answers, and what it saw."""

    plan: list[Any] = field(default_factory=list)
    """Per attempt, in order: an HTTP status to answer with (plus `Retry-After: 0` on 429
    and 503), or ("sleep", seconds) before answering; once empty, every attempt succeeds."""
    retry_after: str | None = "0"
    """The `Retry-After` value sent with 429 and 503 (None: no header)."""
    attempts: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    """The headers of every attempt."""

    def reset(self, *plan: Any, retry_after: str | None = "0") -> Script:
        self.plan, self.retry_after, self.attempts, self.headers = list(plan), retry_after, 0, []
        return self


@dataclass
class Scripted:
    url: str
    script: Script


@pytest.fixture(scope="package")
def tiny(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real engine on the tiny model, with a registry and real fine-tuning jobs."""
    root = tmp_path_factory.mktemp("client-tiny")
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name=TINY_BASE_ID,
        registry=root / "registry",
        jobs_dir=root / "jobs",
        engine=EngineConfig(max_num_seqs=8, max_loras=4),
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        yield url


@pytest.fixture(scope="package")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fake]:
    root = tmp_path_factory.mktemp("client-fake")
    engine = FakeEngine()
    service = FineTuningService.open(
        root / "jobs",
        base=BaseModelInfo(model_id=FAKE_BASE_ID, path=root / "base"),
        registry=root / "registry",
        runner=fake_runner(),
    )
    service.start()
    app = create_app(engine, fine_tuning=service, max_upload_bytes=FAKE_UPLOAD_LIMIT)
    try:
        with serve(app) as url:
            yield Fake(url=url, engine=engine)
    finally:
        service.stop()


@pytest.fixture
def fake(fake_server: Fake) -> Iterator[Fake]:
    """The fake-engine server: empty call records, settings restored after the test."""
    engine = fake_server.engine
    engine.calls, engine.aborted, engine.finished = [], [], []
    saved = {f.name: getattr(engine, f.name) for f in fields(engine)}
    yield fake_server
    for name, value in saved.items():
        setattr(engine, name, value)


def _scripted_app(script: Script) -> Starlette:
    async def answer(request: Request) -> Response:
        script.attempts += 1
        script.headers.append(dict(request.headers))
        await request.body()
        step = script.plan.pop(0) if script.plan else None
        if isinstance(step, tuple) and step[0] == "sleep":
            await asyncio.sleep(step[1])
            step = None
        if isinstance(step, int):
            headers = {"x-request-id": f"attempt-{script.attempts}"}
            if step in (429, 503) and script.retry_after is not None:
                headers["Retry-After"] = script.retry_after
            body = {
                "error": {
                    "message": f"scripted {step}",
                    "type": "invalid_request_error" if step < 500 else "server_error",
                    "param": "model",
                    "code": f"code_{step}",
                }
            }
            return JSONResponse(body, status_code=step, headers=headers)
        if request.url.path == "/v1/completions":
            choice = {"index": 0, "text": "ok", "finish_reason": "stop"}
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            return JSONResponse(
                {"id": "cmpl-1", "created": 1, "model": "m", "choices": [choice], "usage": usage}
            )
        return JSONResponse({"object": "list", "data": [{"id": "m", "created": 1}]})

    return Starlette(
        routes=[
            Route("/v1/models", answer, methods=["GET"]),
            Route("/v1/completions", answer, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="package")
def scripted_server() -> Iterator[Scripted]:
    script = Script()
    with serve(_scripted_app(script)) as url:
        yield Scripted(url=url, script=script)


@pytest.fixture
def scripted(scripted_server: Scripted) -> Scripted:
    scripted_server.script.reset()
    return scripted_server
