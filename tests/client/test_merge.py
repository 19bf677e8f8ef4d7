"""`merged_adapters` on completions and chat, and `adapters.merge()`, through the typed
client (sync and async) against a real server on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import (
    AdapterHubClient,
    AsyncAdapterHubClient,
    BadRequestError,
    MergedAdapters,
    NotFoundError,
    PermissionDeniedError,
)
from tests.api.test_merge_http import ADMIN_KEY, API_KEY, BASE_ID, MergeServer, merge_server

MERGE = MergedAdapters(
    ids=["alpha@1", "beta@prod"], weights=[0.8, 0.6], merge_strategy="dare_linear", density=0.5
)


@pytest.fixture(scope="module")
def live(tiny_base: Path, tiny_adapters, tmp_path_factory) -> Iterator[MergeServer]:
    with merge_server(tmp_path_factory.mktemp("merge-client"), tiny_base, tiny_adapters) as s:
        yield s


def test_merge_sync(live: MergeServer) -> None:
    with AdapterHubClient(base_url=live.url, api_key=API_KEY, max_retries=0) as hub:
        first = hub.completions.create(
            model=BASE_ID, prompt="hello", max_tokens=6, temperature=0, merged_adapters=MERGE
        )
        # A plain mapping works too, and the same merge gives the same tokens.
        again = hub.completions.create(
            model=BASE_ID,
            prompt="hello",
            max_tokens=6,
            temperature=0,
            merged_adapters=MERGE.model_dump(exclude_none=True),
        )
        assert first.choices[0].text == again.choices[0].text
        base = hub.completions.create(model=BASE_ID, prompt="hello", max_tokens=6, temperature=0)
        assert base.choices[0].text != first.choices[0].text
        chat = hub.chat.completions.create(
            model=BASE_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=4,
            temperature=0,
            merged_adapters=MERGE,
        )
        assert chat.choices[0].message.content
        with hub.completions.create(
            model=BASE_ID,
            prompt="hello",
            max_tokens=6,
            temperature=0,
            merged_adapters=MERGE,
            stream=True,
        ) as stream:
            assert "".join(c.choices[0].text for c in stream if c.choices) == first.choices[0].text
        with pytest.raises(BadRequestError) as info:
            hub.completions.create(
                model=BASE_ID,
                prompt="hello",
                max_tokens=2,
                merged_adapters={
                    "ids": ["alpha", "gamma"],
                    "merge_strategy": "ties",
                    "density": 0.5,
                },
            )
        assert info.value.code == "invalid_merge"
        with pytest.raises(PermissionDeniedError):
            hub.adapters.merge("mix", ids=["alpha", "beta"])

    with AdapterHubClient(base_url=live.url, api_key=ADMIN_KEY, max_retries=0) as admin:
        version = admin.adapters.merge(
            "mix",
            ids=MERGE.ids,
            weights=MERGE.weights,
            merge_strategy="dare_linear",
            density=0.5,
            alias="prod",
        )
        assert (version.ref, version.kind, version.aliases) == (
            "mix@1",
            "merge:dare_linear",
            ["prod"],
        )
        served = admin.completions.create(
            model="mix@prod", prompt="hello", max_tokens=6, temperature=0
        )
        assert served.choices[0].text == first.choices[0].text
        assert admin.adapters.get_version("mix", 1).kind == "merge:dare_linear"
        with pytest.raises(NotFoundError):
            admin.adapters.merge("mix", ids=["alpha", "missing"])
        with pytest.raises(BadRequestError):
            admin.adapters.merge("mix", ids=["alpha", "gamma"], merge_strategy="linear")
        assert admin.adapters.get("mix").versions == [1]


@pytest.mark.anyio
async def test_merge_async(live: MergeServer) -> None:
    async with AsyncAdapterHubClient(base_url=live.url, api_key=ADMIN_KEY, max_retries=0) as hub:
        merged = MergedAdapters(ids=["alpha", "beta"], weights=[1.0, -0.5], merge_strategy="cat")
        out = await hub.completions.create(
            model=BASE_ID, prompt="hello", max_tokens=6, temperature=0, merged_adapters=merged
        )
        chat = await hub.chat.completions.create(
            model=BASE_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=4,
            temperature=0,
            merged_adapters=merged,
        )
        assert chat.choices[0].message.content
        version = await hub.adapters.merge("amix", ids=["alpha", "beta"], weights=[1.0, -0.5])
        assert version.kind == "merge:cat" and version.rank == 16
        served = await hub.completions.create(
            model="amix", prompt="hello", max_tokens=6, temperature=0
        )
        assert served.choices[0].text == out.choices[0].text
        with pytest.raises(BadRequestError):
            await hub.completions.create(
                model="alpha", prompt="x", max_tokens=2, merged_adapters=merged
            )
