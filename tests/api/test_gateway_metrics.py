"""The metrics the Gateway API Inference Extension's endpoint picker reads.

`adapterhub_lora_requests_info` must parse as vLLM's `vllm:lora_requests_info` does: labels
`running_lora_adapters`, `waiting_lora_adapters` (comma-separated names, as sent in `model`)
and `max_lora`, value a unix time. Driven on a real engine over a tiny model, stepped by
hand so that which request runs and which waits is certain.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterhub_server.api import create_app
from adapterhub_server.api.auth import ApiKeys
from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.lora.cache import StaticAdapterSource
from adapterhub_server.lora.merge import MergeSpec
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

LORA_INFO = "adapterhub_lora_requests_info"


def lora_info(text: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name == LORA_INFO
        for s in family.samples
    ]


async def _scrape(app: object, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/metrics", headers=headers or {})


async def test_running_and_waiting_adapters(
    tiny_base: Path, tiny_adapters: dict[str, Path], anyio_backend: str
) -> None:
    # One batch slot: the first admitted request runs, every other one waits.
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=64, max_loras=2)
    names = ("r4", "r8", "patterns")
    engine = build_engine(
        ResolvedBaseModel(tiny_base, "tiny", "local"),
        config,
        source=StaticAdapterSource({n: tiny_adapters[n] for n in names}),
    )
    async_engine = AsyncLLMEngine(engine, base_model_id="tiny")
    app = create_app(async_engine)
    try:
        body = (await _scrape(app)).text
        [(labels, stamp)] = lora_info(body)
        assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}
        assert abs(stamp - time.time()) < 60

        params = SamplingParams(max_tokens=50, ignore_eos=True)
        engine.add_request("a", [1, 2, 3], params, "r4")
        deadline = time.monotonic() + 30
        while engine.num_running < 1:  # the adapter's files load on a background thread
            assert time.monotonic() < deadline
            engine.step()
            time.sleep(0.01)
        engine.add_request("b", [1, 2, 3], params, "r8")
        engine.add_request("c", [1, 2, 3], params, "patterns")
        engine.add_request("d", [1, 2, 3], params, "r8")
        engine.add_request("base", [1, 2, 3], params, None)
        merge = MergeSpec(ids=("r4", "r8"), weights=(0.5, 0.5))
        engine.add_request("merged", [1, 2, 3], params, merge)
        engine.step()

        [(labels, stamp)] = lora_info((await _scrape(app)).text)
        # Exactly the names clients send; the base model and per-request merges are left out.
        assert labels["running_lora_adapters"] == "r4"
        assert labels["waiting_lora_adapters"] == "patterns,r8"
        assert labels["max_lora"] == "2"
        assert abs(stamp - time.time()) < 60
        for request_id in ("a", "b", "c", "d", "base", "merged"):
            engine.abort(request_id)
        [(labels, _)] = lora_info((await _scrape(app)).text)
        assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""
    finally:
        engine.adapters.close()


async def test_queue_and_kv_metrics_the_picker_reads(anyio_backend: str) -> None:
    body = (await _scrape(create_app(FakeEngine()))).text
    names = {f.name for f in text_string_to_metric_families(body)}
    # --total-queued-requests-metric, --kv-cache-usage-percentage-metric (docs/kubernetes.md)
    assert {"adapterhub_queued_sequences", "adapterhub_kv_cache_usage_ratio"} <= names
    assert "adapterhub_running_sequences" in names


async def test_metrics_without_key(anyio_backend: str) -> None:
    keys = ApiKeys(inference=("user-key",), admin=("admin-key",))
    closed = create_app(FakeEngine(), api_keys=keys)
    assert (await _scrape(closed)).status_code == 401
    assert (await _scrape(closed, {"Authorization": "Bearer user-key"})).status_code == 200

    open_metrics = create_app(FakeEngine(), api_keys=keys, metrics_without_key=True)
    assert (await _scrape(open_metrics)).status_code == 200
    transport = httpx.ASGITransport(app=open_metrics)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        # Only /metrics opens up.
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.post("/v1/completions", json={})).status_code == 401
