"""vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, driven as the inference
extension's adapter syncer drives vLLM: its request shapes, no key, from loopback.

A real server (uvicorn on 127.0.0.1, the real engine over a tiny model, a registry) started
with `--admin-loopback-without-key`, `--metrics-without-key` and
`--allowed-local-adapter-dirs`; requests "from elsewhere" go through an in-process transport
that claims another peer address.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from adapterhub_server.api import create_app
from adapterhub_server.api.auth import ApiKeys, is_loopback_client
from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import Server, build_app, build_server
from tests.api.fake_engine import FakeEngine
from tests.live_server import serve

FILES = ("adapter_config.json", "adapter_model.safetensors")
ADMIN_KEY = "admin-secret"
USER_KEY = "user-secret"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Live:
    server: Server
    app: FastAPI
    url: str
    allowed: Path
    outside: Path

    def versions(self, name: str) -> list[int]:
        assert self.server.registry is not None
        return [r.version for r in self.server.registry.versions(name)]


@pytest.fixture(scope="module")
def live(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("lora-admin")
    allowed, outside = root / "allowed", root / "outside"
    for name in ("r4", "r8"):
        shutil.copytree(tiny_adapters[name], allowed / name)
        shutil.copytree(tiny_adapters[name], outside / name)
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=root / "registry",
        fine_tuning=False,
        api_keys=(USER_KEY,),
        admin_keys=(ADMIN_KEY,),
        admin_loopback_without_key=True,
        metrics_without_key=True,
        allowed_local_adapter_dirs=(allowed,),
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    app = build_app(server.engine, server)
    with serve(app, lifespan="on") as url:
        yield Live(server, app, url, allowed, outside)


@pytest.fixture
def http(live: Live) -> Iterator[httpx.Client]:
    """A keyless client on loopback: the adapter syncer sidecar."""
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


@pytest.fixture
def remote(live: Live) -> Iterator[httpx.Client]:
    """A client whose peer address is not loopback (another pod)."""
    transport = httpx.ASGITransport(app=live.app, client=("10.1.2.3", 40000))  # type: ignore[arg-type]
    with _SyncOverAsync(transport) as client:
        yield client


class _SyncOverAsync:
    """httpx's ASGITransport is async-only; run each call on a private event loop."""

    def __init__(self, transport: httpx.ASGITransport) -> None:
        import anyio.from_thread

        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._transport = transport

    def __enter__(self) -> _SyncOverAsync:
        self._portal = self._portal_cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._portal_cm.__exit__(None, None, None)

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self._transport, base_url="http://test", timeout=60
            ) as client:
                return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

        return self._portal.call(go)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return self.request("GET", path, **kwargs)


def _model_ids(http: httpx.Client) -> set[str]:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def _complete(http: httpx.Client, model: str) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0},
    )


def _load(http: httpx.Client | _SyncOverAsync, name: str, path: object, **extra: object):
    # The syncer's payload (tools/dynamic-lora-sidecar/sidecar.py in the extension's repo).
    payload = {"lora_name": name, "lora_path": str(path), "base_model_name": "tiny-base"}
    return http.post("/v1/load_lora_adapter", json={**payload, **extra})


def _unload(http: httpx.Client | _SyncOverAsync, name: str, **kw: object) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name}, **kw)


# -- the syncer's cycle -------------------------------------------------------------------


def test_load_serve_unload_reload(live: Live, http: httpx.Client) -> None:
    assert "sql-lora" not in _model_ids(http)
    r = _load(http, "sql-lora", live.allowed / "r4")
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'sql-lora' added successfully."
    assert "sql-lora" in _model_ids(http)
    assert live.versions("sql-lora") == [1]
    # Warmed: parsed into host memory before the first request names it.
    assert live.server.engine.engine.adapters.rank_of("sql-lora@1") == 4
    assert _complete(http, "sql-lora").status_code == 200

    # The same files again (the syncer re-reconciles; another replica loads it): no new
    # version, still 200.
    assert _load(http, "sql-lora", live.allowed / "r4").status_code == 200
    assert live.versions("sql-lora") == [1]

    r = _unload(http, "sql-lora")
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'sql-lora' removed successfully."
    assert "sql-lora" not in _model_ids(http)
    gone = _complete(http, "sql-lora")
    assert gone.status_code == 404, gone.text
    assert live.server.engine.engine.adapters.rank_of("sql-lora@1") is None
    # The registry keeps the version; only this replica stopped serving it.
    assert live.versions("sql-lora") == [1]
    r = _unload(http, "sql-lora")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The lora adapter 'sql-lora' cannot be found."

    # Loading it again serves the same version again.
    assert _load(http, "sql-lora", live.allowed / "r4").status_code == 200
    assert live.versions("sql-lora") == [1]
    assert "sql-lora" in _model_ids(http)
    assert _complete(http, "sql-lora").status_code == 200


def test_other_content_needs_load_inplace(live: Live, http: httpx.Client) -> None:
    assert _load(http, "swap", live.allowed / "r4").status_code == 200
    r = _load(http, "swap", live.allowed / "r8")
    assert r.status_code == 400, r.text
    assert "already been loaded" in r.json()["error"]["message"]
    assert live.versions("swap") == [1]
    r = _load(http, "swap", live.allowed / "r8", load_inplace=True)
    assert r.status_code == 200, r.text
    assert live.versions("swap") == [1, 2]
    assert live.server.engine.engine.adapters.rank_of("swap@2") == 8


def test_bad_requests(live: Live, http: httpx.Client) -> None:
    for body, param in [
        ({"lora_name": "x"}, None),
        ({"lora_path": str(live.allowed / "r4")}, None),
        ({"lora_name": "x", "lora_path": str(live.allowed / "r4"), "bogus": 1}, None),
        ({"lora_name": "Bad/Name", "lora_path": str(live.allowed / "r4")}, "name"),
        (
            {"lora_name": "x", "lora_path": str(live.allowed / "r4"), "base_model_name": "other"},
            "base_model_name",
        ),
    ]:
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400, (body, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param
    assert live.server.registry is not None
    assert "x" not in {i.name for i in live.server.registry.list_adapters()}


# -- path confinement -------------------------------------------------------------------


def test_paths_stay_inside_allowed_dirs(live: Live, http: httpx.Client) -> None:
    escape_dir = live.allowed / "escape-dir"
    escape_dir.symlink_to(live.outside / "r4", target_is_directory=True)
    escape_file = live.allowed / "escape-file"
    escape_file.mkdir()
    (escape_file / "adapter_config.json").write_bytes(
        (live.allowed / "r4" / "adapter_config.json").read_bytes()
    )
    (escape_file / "adapter_model.safetensors").symlink_to(
        live.outside / "r4" / "adapter_model.safetensors"
    )
    bad_paths = [
        live.allowed / ".." / "outside" / "r4",  # ../
        live.outside / "r4",  # absolute, elsewhere
        escape_dir,  # a directory symlink out of the allowed tree
        escape_file,  # one file linking out
        "/etc",
        "r4",  # relative: refused, never resolved against the working directory
        "./r4",
        live.allowed / "missing",
    ]
    for path in bad_paths:
        r = _load(http, "escaped", path)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "lora_path", r.text
    assert live.server.registry is not None
    assert "escaped" not in {i.name for i in live.server.registry.list_adapters()}
    assert "escaped" not in _model_ids(http)


# -- the Hugging Face cache --------------------------------------------------------------


def make_hf_cache(cache: Path, repo_id: str, adapter_dir: Path, *, commit: str = COMMIT) -> None:
    """The layout huggingface_hub writes under HF_HUB_CACHE."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for filename in FILES:
        data = (adapter_dir / filename).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / filename).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def test_hub_references_from_offline_cache(
    live: Live,
    http: httpx.Client,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "hf-cache"
    make_hf_cache(cache, "someone/Sql-LoRA", tiny_adapters["r8"])
    make_hf_cache(cache, "someone/other", tiny_adapters["r4"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    r = _load(http, "from-hub", "hf://someone/Sql-LoRA")
    assert r.status_code == 200, r.text
    assert live.versions("from-hub") == [1]
    assert _load(http, "from-hub", f"hf://someone/Sql-LoRA@{COMMIT}").status_code == 200
    assert live.versions("from-hub") == [1]  # same files, no new version
    assert live.server.registry is not None
    record = live.server.registry.resolve("from-hub")
    assert record.metadata["source"] == "hf://someone/Sql-LoRA"

    r = _load(http, "bare-repo", "someone/other")  # vLLM's bare owner/repo form
    assert r.status_code == 200, r.text
    assert {"from-hub", "bare-repo"} <= _model_ids(http)
    assert _complete(http, "bare-repo").status_code == 200

    r = _load(http, "not-cached", "hf://someone/absent")
    assert r.status_code == 502, r.text
    for bad in ["hf://../x", "hf://a/b@../c", "a/b/c"]:
        assert _load(http, "bad-hub", bad).status_code == 400, bad


# -- auth ------------------------------------------------------------------------------------


def test_keys_from_elsewhere(live: Live, http: httpx.Client, remote: _SyncOverAsync) -> None:
    path = live.allowed / "r4"
    # Another pod without a key: refused before anything happens.
    assert _load(remote, "remote", path).status_code == 401
    assert _unload(remote, "sql-lora").status_code == 401
    assert remote.get("/v1/models").status_code == 401
    # An inference key lacks the admin scope.
    user = {"Authorization": f"Bearer {USER_KEY}"}
    assert remote.post("/v1/load_lora_adapter", json={}, headers=user).status_code == 403
    # Loopback with a wrong key is refused too: only a keyless caller is waved through.
    wrong = {"Authorization": "Bearer nope"}
    r = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "remote", "lora_path": str(path)},
        headers=wrong,
    )
    assert r.status_code == 401
    # The admin key works from anywhere.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = remote.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "remote", "lora_path": str(path)},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    # --metrics-without-key: the picker scrapes from another pod.
    r = remote.get("/metrics")
    assert r.status_code == 200
    assert "adapterhub_lora_requests_info{" in r.text


def test_loopback_without_the_flag_needs_a_key(anyio_backend: str) -> None:
    keys = ApiKeys(inference=(USER_KEY,), admin=(ADMIN_KEY,))
    import anyio

    async def status(app: FastAPI, client: tuple[str, int], **kw: object) -> int:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.post("/v1/load_lora_adapter", json={}, **kw)).status_code  # type: ignore[arg-type]

    async def main() -> None:
        closed = create_app(FakeEngine(), api_keys=keys)
        assert await status(closed, ("127.0.0.1", 1)) == 401
        opened = create_app(FakeEngine(), api_keys=keys, admin_loopback_without_key=True)
        # Past auth (no admin service mounted on this app: 404), from loopback only.
        assert await status(opened, ("127.0.0.1", 1)) == 404
        assert await status(opened, ("::1", 1)) == 404
        for peer in ("10.0.0.1", "127.0.0.6", "192.168.1.1", "::ffff:10.0.0.1"):
            assert await status(opened, (peer, 1)) == 401, peer

    anyio.run(main)


def test_is_loopback_client() -> None:
    def scope(host: str | None) -> dict:
        return {"client": (host, 1) if host is not None else None}

    assert is_loopback_client(scope("127.0.0.1"))
    assert is_loopback_client(scope("::1"))
    assert is_loopback_client(scope("::ffff:127.0.0.1"))
    for host in ("127.0.0.6", "10.0.0.1", "localhost", "", None, "0.0.0.0"):
        assert not is_loopback_client(scope(host)), host


# -- without a registry ----------------------------------------------------------------------


def test_no_registry_serves_the_directory_in_place(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    shutil.copytree(tiny_adapters["r4"], allowed / "a")
    shutil.copytree(tiny_adapters["r8"], allowed / "b")
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=None,
        lora_modules={"static": tiny_adapters["r4"]},
        allowed_local_adapter_dirs=(allowed,),
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    app = build_app(server.engine, server)
    with serve(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=60) as http:
        assert _load(http, "dyn", allowed / "a").status_code == 200
        assert _load(http, "dyn", allowed / "a").status_code == 200
        assert "dyn" in _model_ids(http)
        assert _complete(http, "dyn").status_code == 200
        assert _load(http, "dyn", allowed / "b").status_code == 400
        assert _load(http, "dyn", allowed / "b", load_inplace=True).status_code == 200
        # Files that cannot be served never replace what is served.
        broken = allowed / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
        r = _load(http, "dyn", broken, load_inplace=True)
        assert r.status_code == 400, r.text
        assert _load(http, "fresh", broken).status_code == 400
        assert "fresh" not in _model_ids(http)
        assert _complete(http, "dyn").status_code == 200
        # --lora-modules names are fixed at start-up.
        assert _load(http, "static", allowed / "b").status_code == 400
        assert _unload(http, "dyn").status_code == 200
        assert "dyn" not in _model_ids(http)
        assert _complete(http, "dyn").status_code == 404
        assert _unload(http, "static").status_code == 200
        assert _complete(http, "static").status_code == 404
        # Brought back only with its own files.
        assert _load(http, "static", allowed / "b").status_code == 400
        assert _load(http, "static", allowed / "a").status_code == 200
        assert _complete(http, "static").status_code == 200
