"""Shared pieces of the reliability suites: the error-envelope check, an engine stand-in that
can retire adapters, and an app with every optional router mounted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from fastapi import FastAPI

from adapterhub_server.api import create_app
from adapterhub_server.api.adapters_service import AdapterAdminService
from adapterhub_server.finetune import BaseModelInfo, FineTuningService
from adapterhub_server.registry import BaseModelSpec, Registry, RegistryLimits
from tests.api.fake_engine import FakeEngine
from tests.finetune.conftest import fake_runner

T = TypeVar("T")

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def assert_error_envelope(body: Any, *, status: int) -> dict[str, Any]:
    """`body` is exactly `{"error": {"message", "type", "param", "code"}}`; returns the inner
    object. The type says whose fault it was: a 4xx is the client's, a 5xx the server's."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ENVELOPE_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    expected_type = "invalid_request_error" if status < 500 else "server_error"
    assert error["type"] == expected_type, (status, error)
    return error


class RetiringFakeEngine(FakeEngine):
    """The fake engine plus `retire_adapter`, which the adapter admin service needs: no
    request pins a registry adapter here, so retiring just runs `then` off the loop."""

    async def retire_adapter(self, key: str, then: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(then)


@dataclass
class FullApp:
    """The app with the inference, adapter and fine-tuning routes, and what backs them."""

    app: FastAPI
    engine: RetiringFakeEngine
    registry: Registry
    fine_tuning: FineTuningService
    root: Path


@pytest.fixture(scope="session")
def base_spec(tiny_base: Path) -> BaseModelSpec:
    return BaseModelSpec.from_directory(tiny_base, "tiny-base")


def build_full_app(
    root: Path,
    tiny_base: Path,
    base_spec: BaseModelSpec,
    *,
    max_upload_bytes: int = 1_000_000,
    **app_options: Any,
) -> FullApp:
    """Every router mounted, keys off; the job runner is not started (no trainer runs)."""
    engine = RetiringFakeEngine()
    registry = Registry.open(
        root / "registry",
        base=base_spec,
        limits=RegistryLimits(max_lora_rank=64, max_upload_bytes=max_upload_bytes),
    )
    fine_tuning = FineTuningService.open(
        root / "jobs",
        base=BaseModelInfo(model_id=engine.base_model_id, path=tiny_base),
        registry=root / "registry",
        runner=fake_runner(),
    )
    app = create_app(
        engine,
        adapters=AdapterAdminService(registry, engine),
        fine_tuning=fine_tuning,
        max_upload_bytes=max_upload_bytes,
        **app_options,
    )
    return FullApp(app=app, engine=engine, registry=registry, fine_tuning=fine_tuning, root=root)


@pytest.fixture
def full_app(tmp_path: Path, tiny_base: Path, base_spec: BaseModelSpec) -> Iterator[FullApp]:
    built = build_full_app(tmp_path, tiny_base, base_spec)
    yield built
    built.fine_tuning.stop()
    built.registry.close()
