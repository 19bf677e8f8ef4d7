"""`merged_adapters` on completions and chat, and `POST /v1/adapters/{name}/merges`, over
HTTP against the real engine on the tiny model with a registry and API keys."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_server
from tests.live_server import serve

BASE_ID = "tiny-base"
API_KEY = "inference-key"
ADMIN_KEY = "admin-key"
MAX_RANK = 16


@dataclass
class MergeServer:
    url: str

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )


@contextmanager
def merge_server(root: Path, base: Path, adapters: dict[str, Path]) -> Iterator[MergeServer]:
    """A real server with `alpha` (r8, all projections), `beta` (r8, q/v; alias prod) and
    `gamma` (r4) in its registry, an inference key and an admin key."""
    config = ServerConfig(
        base_model=str(base),
        served_model_name=BASE_ID,
        registry=root / "registry",
        jobs_dir=root / "jobs",
        api_keys=(API_KEY,),
        admin_keys=(ADMIN_KEY,),
        engine=EngineConfig(max_num_seqs=8, max_loras=4, max_lora_rank=MAX_RANK),
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        live = MergeServer(url=url)
        with live.client() as http:
            for name, source, alias in (
                ("alpha", "r8", None),
                ("beta", "attn-only", "prod"),
                ("gamma", "r4", None),
            ):
                files = [
                    ("files", (f, (adapters[source] / f).read_bytes()))
                    for f in ("adapter_config.json", "adapter_model.safetensors")
                ]
                data = {"name": name, **({"alias": alias} if alias else {})}
                response = http.post("/v1/adapters", data=data, files=files)
                assert response.status_code == 201, response.text
        yield live


@pytest.fixture(scope="module")
def live(tiny_base: Path, tiny_adapters, tmp_path_factory) -> Iterator[MergeServer]:
    with merge_server(tmp_path_factory.mktemp("merge-http"), tiny_base, tiny_adapters) as s:
        yield s


def _completion(http: httpx.Client, merged: dict | None, model: str = BASE_ID, **extra):
    body = {"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0, **extra}
    if merged is not None:
        body["merged_adapters"] = merged
    return http.post("/v1/completions", json=body)


TIES = {
    "ids": ["alpha@1", "beta@prod"],
    "weights": [0.7, 0.5],
    "merge_strategy": "ties",
    "density": 0.5,
}
DARE = {
    "ids": ["alpha", "beta"],
    "weights": [1, 1],
    "merge_strategy": "dare_ties",
    "density": 0.6,
    "majority_sign_method": "frequency",
}


@pytest.mark.parametrize("merged", [TIES, DARE], ids=["ties", "dare_ties"])
def test_merge_served_in_a_batch_equals_its_published_version(live: MergeServer, merged) -> None:
    async def batch() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as http:
            bodies = [
                {"model": BASE_ID, "merged_adapters": merged},
                {"model": "alpha"},
                {"model": BASE_ID},
                {"model": "gamma"},
                {"model": BASE_ID, "merged_adapters": merged},
            ]
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/completions",
                        json={**b, "prompt": "hello world", "max_tokens": 8, "temperature": 0},
                    )
                    for b in bodies
                )
            )

    responses = asyncio.run(batch())
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert texts[0] == texts[4]
    assert texts[0] not in (texts[1], texts[2])  # neither a component nor the base
    assert responses[0].json()["model"] == BASE_ID

    with live.client() as admin:
        published = admin.post("/v1/adapters/mixed/merges", json={**merged, "alias": "x"})
        assert published.status_code == 201, published.text
        record = published.json()
        assert record["kind"] == f"merge:{merged['merge_strategy']}"
        assert record["lineage"]["extra"]["merge"]["adapters"] == ["alpha@1", "beta@1"]
        # The published version serves what the per-request merge served (same DARE masks).
        by_name = _completion(admin, None, model=record["ref"])
        assert by_name.json()["choices"][0]["text"] == texts[0]
        # Chat takes the field too.
        chat = admin.post(
            "/v1/chat/completions",
            json={
                "model": BASE_ID,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4,
                "temperature": 0,
                "merged_adapters": merged,
            },
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]


def _envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("merged", "model", "status", "param", "code", "words"),
    [
        (
            {"ids": ["alpha", "nope"]},
            BASE_ID,
            404,
            "merged_adapters.ids",
            "model_not_found",
            "nope",
        ),
        (
            {"ids": [f"a{i}" for i in range(9)]},
            BASE_ID,
            400,
            "merged_adapters.ids",
            None,
            "at most 8",
        ),
        (
            {"ids": ["alpha", "beta"], "weights": [1]},
            BASE_ID,
            400,
            "merged_adapters.weights",
            None,
            "one weight per id",
        ),
        (
            {"ids": ["alpha", "beta"], "merge_strategy": "svd"},
            BASE_ID,
            400,
            None,
            None,
            "merge_strategy",
        ),
        (
            {"ids": ["alpha", "beta"], "merge_strategy": "ties", "density": 0},
            BASE_ID,
            400,
            "merged_adapters.density",
            None,
            "(0, 1]",
        ),
        (
            {"ids": ["alpha", "beta"], "merge_strategy": "ties", "density": 1.5},
            BASE_ID,
            400,
            "merged_adapters.density",
            None,
            "(0, 1]",
        ),
        (
            {"ids": ["alpha", "gamma"], "merge_strategy": "linear"},
            BASE_ID,
            400,
            "merged_adapters",
            "invalid_merge",
            "same rank",
        ),
        (
            {"ids": ["alpha", "beta", "gamma"]},
            BASE_ID,
            400,
            "merged_adapters",
            "invalid_merge",
            f"--max-lora-rank={MAX_RANK}",
        ),
        ({"ids": ["alpha", "beta"]}, "gamma", 400, "model", None, "base model"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_merge_requests_are_refused_and_change_nothing(
    live: MergeServer, merged, model, status, param, code, words, stream
) -> None:
    with live.client(API_KEY) as http:
        before = http.get("/v1/models").json()
        error = _envelope(_completion(http, merged, model=model, stream=stream), status)
        assert words in error["message"]
        if param is not None:
            assert error["param"] == param
        if code is not None:
            assert error["code"] == code
        assert http.get("/v1/models").json() == before
        ok = _completion(http, {"ids": ["alpha", "beta"], "weights": [0.5, 0.5]})
        assert ok.status_code == 200, ok.text


def test_publish_needs_the_admin_scope(live: MergeServer) -> None:
    body = {"ids": ["alpha", "beta"], "weights": [0.5, 0.5], "merge_strategy": "linear"}
    with live.client(API_KEY) as http:
        assert _envelope(http.post("/v1/adapters/nope-merge/merges", json=body), 403)
    with live.client() as admin:
        assert admin.get("/v1/adapters/nope-merge").status_code == 404
        created = admin.post("/v1/adapters/lin/merges", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["kind"] == "merge:linear"


def test_refused_publish_stores_nothing(live: MergeServer) -> None:
    with live.client() as admin:
        before = admin.get("/v1/adapters").json()
        bad = {"ids": ["alpha", "gamma"], "merge_strategy": "linear"}
        error = _envelope(admin.post("/v1/adapters/never/merges", json=bad), 400)
        assert "same rank" in error["message"]
        error = _envelope(admin.post("/v1/adapters/never/merges", json={"ids": ["zzz"]}), 404)
        assert admin.get("/v1/adapters").json() == before
        assert admin.get("/v1/adapters/never").status_code == 404


def test_adapter_listing_shows_kinds(live: MergeServer) -> None:
    with live.client() as admin:
        listing = {a["name"]: a["latest"]["kind"] for a in admin.get("/v1/adapters").json()["data"]}
    assert listing["alpha"] == listing["beta"] == listing["gamma"] == "lora"
