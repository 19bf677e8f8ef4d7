"""Fixtures for fine-tuning tests: a service over a fake trainer, its HTTP app, polling."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from adapterhub_server.api import create_app
from adapterhub_server.finetune import (
    BaseModelInfo,
    FineTuningLimits,
    FineTuningService,
    RunnerConfig,
)
from tests.api.fake_engine import FakeEngine
from tests.tiny_models import ALL_PROJECTIONS

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
BASE_ID = FakeEngine().base_model_id
BASE_CONTEXT = 1024
"""The fake base model's context window: jobs' `max_seq_len` may not exceed it."""
T = TypeVar("T")

TRAIN_LINES = [
    '{"prompt": "what is the capital of france? ", "completion": "paris is the capital."}',
    '{"messages": [{"role": "user", "content": "hello"}, '
    '{"role": "assistant", "content": "hello world, this is a tiny tokenizer."}]}',
]


def jsonl(lines: list[str] = TRAIN_LINES) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, what: str = "condition") -> T:
    """Poll until `predicate()` is truthy; the timeout only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fake_runner(**overrides: object) -> RunnerConfig:
    settings: dict[str, object] = {
        "trainer_command": (sys.executable, str(FAKE_TRAINER)),
        "poll_interval_s": 0.05,
        "stop_timeout_s": 20.0,
    }
    settings.update(overrides)
    return RunnerConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., FineTuningService]]:
    """Opens services over one jobs directory (like restarts of one server); all are stopped
    at teardown."""
    opened: list[FineTuningService] = []

    def make(limits: FineTuningLimits | None = None, **runner: object) -> FineTuningService:
        service = FineTuningService.open(
            tmp_path / "jobs",
            base=BaseModelInfo(
                model_id=BASE_ID,
                path=tmp_path / "base",
                context_length=BASE_CONTEXT,
                target_modules=frozenset(ALL_PROJECTIONS),
            ),
            registry=tmp_path / "registry",
            runner=fake_runner(**runner),
            limits=limits,
        )
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.stop()


@pytest.fixture
def service(make_service: Callable[..., FineTuningService]) -> FineTuningService:
    """A service whose runner is NOT started: tests start it when they want jobs to run."""
    return make_service()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def app_client(
    service: FineTuningService, *, max_upload_bytes: int = 4096
) -> AsyncIterator[httpx.AsyncClient]:
    """In-process client of the app over a fake engine and `service`."""
    app = create_app(FakeEngine(), fine_tuning=service, max_upload_bytes=max_upload_bytes)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def http(service: FineTuningService, anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    """In-process client of the app over a fake engine and `service`."""
    async with app_client(service) as client:
        yield client


async def upload(http: httpx.AsyncClient, data: bytes = b"", name: str = "train.jsonl") -> str:
    r = await http.post(
        "/v1/files", files={"file": (name, data or jsonl())}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def job_body(file_id: str, suffix: str | None = "ok-adapter", **hyperparameters: object) -> dict:
    body: dict = {"model": BASE_ID, "training_file": file_id}
    if suffix is not None:
        body["suffix"] = suffix
    if hyperparameters:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    return body


async def poll_job(
    http: httpx.AsyncClient, job_id: str, *statuses: str, timeout: float = 60.0
) -> dict:
    """GET the job until its status is one of `statuses`; returns the job."""
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        r = await http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stayed {job['status']}, wanted {statuses}")
        await anyio.sleep(0.02)


async def all_events(http: httpx.AsyncClient, job_id: str) -> list[dict]:
    r = await http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    assert r.status_code == 200, r.text
    return list(r.json()["data"])
