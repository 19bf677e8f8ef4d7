"""`client.adapters` against the real engine and registry: upload, query at once, inspect,
download, aliases, delete; sync and async."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from client import (
    AdapterHubClient,
    AdapterVersion,
    AsyncAdapterHubClient,
    BadRequestError,
    ConflictError,
    IntegrityError,
    NotFoundError,
)
from client.resources.adapters import ADAPTER_FILES
from tests.client.conftest import TINY_BASE_ID


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_logprob(hub: AdapterHubClient, model: str) -> float | None:
    out = hub.completions.create(
        model=model, prompt="hello", max_tokens=1, temperature=0, logprobs=0
    )
    assert out.choices[0].logprobs is not None
    return out.choices[0].logprobs.token_logprobs[0]


def test_adapters_sync(tiny: str, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    first, second = tiny_adapters["r8"], tiny_adapters["r4"]
    with AdapterHubClient(base_url=tiny, max_retries=0) as hub:
        v1 = hub.adapters.upload(
            first, name="bot", alias="prod", description="triage", metadata={"team": "support"}
        )
        assert isinstance(v1, AdapterVersion)
        assert (v1.ref, v1.aliases, v1.description) == ("bot@1", ["prod"], "triage")
        assert v1.metadata == {"team": "support"}
        assert {f: v1.files[f].sha256 for f in ADAPTER_FILES} == {
            f: _sha(first / f) for f in ADAPTER_FILES
        }
        assert hub.adapters.upload(second, name="bot").version == 2

        # Servable at once, under every reference form.
        base = _first_logprob(hub, TINY_BASE_ID)
        assert _first_logprob(hub, "bot@prod") == _first_logprob(hub, "bot@1") != base
        assert "bot" in [m.id for m in hub.models.list().data]

        assert "bot" in [a.name for a in hub.adapters.list().data]
        info = hub.adapters.get("bot")
        assert (info.versions, info.aliases, info.latest.version) == ([1, 2], {"prod": 1}, 2)
        assert [v.ref for v in hub.adapters.versions("bot")] == ["bot@1", "bot@2"]
        assert hub.adapters.get_version("bot", 2).rank == 4
        assert hub.adapters.resolve("bot").version == 2
        assert hub.adapters.resolve("bot@prod").version == 1

        out = hub.adapters.download("bot@prod", to=tmp_path / "dl")
        for f in ADAPTER_FILES:
            assert (out / f).read_bytes() == (first / f).read_bytes()
        assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)

        moved = hub.adapters.set_alias("bot", "prod", 2)
        assert (moved.version, moved.previous) == (2, 1)
        assert _first_logprob(hub, "bot@prod") == _first_logprob(hub, "bot@2")
        with pytest.raises(ConflictError) as aliased:
            hub.adapters.delete("bot", 2)
        assert aliased.value.code == "conflict" and aliased.value.param == "version"
        assert hub.adapters.delete_alias("bot", "prod").version == 2
        assert hub.adapters.delete("bot", 1).versions == [1]
        assert hub.adapters.get("bot").versions == [2]

        with pytest.raises(NotFoundError):
            hub.adapters.get("no-such-adapter")
        with pytest.raises(NotFoundError):
            hub.adapters.resolve("bot@no-such-alias")
        with pytest.raises(NotFoundError):
            hub.completions.create(model="bot@1", prompt="hi")  # deleted
        with pytest.raises(BadRequestError) as bad:
            hub.adapters.upload(first, name="../etc")
        assert bad.value.code == "invalid_adapter"
        with pytest.raises(NotADirectoryError):
            hub.adapters.upload(first / "adapter_config.json", name="x")


@pytest.mark.anyio
async def test_adapters_async(tiny: str, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    adapter = tiny_adapters["r16-rslora"]
    async with AsyncAdapterHubClient(base_url=tiny, max_retries=0) as hub:
        v1 = await hub.adapters.upload(adapter, name="abot", alias="canary")
        assert v1.ref == "abot@1"
        await hub.adapters.upload(tiny_adapters["attn-only"], name="abot")
        assert "abot" in [a.name for a in (await hub.adapters.list()).data]
        assert (await hub.adapters.get("abot")).aliases == {"canary": 1}
        assert [v.version for v in await hub.adapters.versions("abot")] == [1, 2]
        assert (await hub.adapters.get_version("abot", 2)).target_modules == ["q_proj", "v_proj"]
        assert (await hub.adapters.resolve("abot@canary")).version == 1
        out = await hub.adapters.download("abot@canary", to=tmp_path)
        assert (out / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()
        reply = await hub.chat.completions.create(
            model="abot@canary", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.model == "abot@canary"
        assert (await hub.adapters.set_alias("abot", "canary", 2)).previous == 1
        with pytest.raises(ConflictError):
            await hub.adapters.delete("abot", 2)
        assert (await hub.adapters.delete("abot", 2, force=True)).versions == [2]
        with pytest.raises(NotFoundError):
            await hub.adapters.delete_alias("abot", "canary")  # dropped with its version


def test_a_download_that_does_not_match_its_sha256_leaves_nothing(tmp_path: Path) -> None:
    record = {
        "name": "a",
        "version": 1,
        "ref": "a@1",
        "status": "ready",
        "created": 1.0,
        "files": {"adapter_config.json": {"sha256": "0" * 64, "size": 2}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/files/adapter_config.json"):
            return httpx.Response(200, content=b"{}")
        return httpx.Response(200, json=record)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with (
        AdapterHubClient(base_url="http://hub", http_client=http) as hub,
        pytest.raises(IntegrityError),
    ):
        hub.adapters.download("a@1", to=tmp_path)
    assert list(tmp_path.iterdir()) == []
