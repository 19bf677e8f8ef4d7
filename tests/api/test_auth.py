"""API keys: every route but the probes is protected, with the right scope, and the server
refuses to expose an open API by accident."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Route

from adapterhub_server.api.auth import PUBLIC_PATHS, ApiKeys, AuthScope, required_scope
from adapterhub_server.cli import build_parser, config_from_args, main, read_keys
from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_server, check_exposure
from tests.live_server import serve

INFERENCE_KEY = "sk-infer-0123456789"
ADMIN_KEY = "sk-admin-9876543210"

# Values for path parameters: the walk only needs each route to be reached.
_PATH_VALUES = {
    "name": "nope",
    "version": "1",
    "alias": "prod",
    "filename": "adapter_config.json",
    "file_id": "file-nope",
    "job_id": "ftjob-nope",
}


@pytest.fixture(scope="module")
def full_app(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """Every router mounted: inference, adapters (registry) and fine-tuning."""
    root = tmp_path_factory.mktemp("auth")
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=root / "registry",
        jobs_dir=root / "jobs",
        api_keys=(INFERENCE_KEY,),
        admin_keys=(ADMIN_KEY,),
        engine=EngineConfig(max_num_seqs=2, max_loras=1),
    )
    server = build_server(config)
    return build_app(server.engine, server)


@pytest.fixture(scope="module")
def url(full_app: FastAPI) -> Iterator[str]:
    with serve(full_app, lifespan="on") as base_url:
        yield base_url


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, Route]]:
    """(full path, route) for every route, descending into included routers."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:  # FastAPI's record of an `include_router`
            yield from _routes(original.routes, prefix + route.include_context.prefix)
        else:
            assert isinstance(route, Route), f"unexpected route type {type(route)}"
            yield prefix + route.path, route


def _endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """(method, concrete path) for every route and method the app serves."""
    found = []
    for template, route in _routes(list(app.routes)):
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: _PATH_VALUES[m.group(1)], template)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, path))
    assert len(found) > 20
    return found


def test_the_walk_covers_every_router(full_app: FastAPI) -> None:
    paths = {path for _, path in _endpoints(full_app)}
    for expected in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/adapters",
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/openapi.json",
        "/docs",
        "/health",
    ):
        assert expected in paths


def test_every_route_but_the_probes_needs_a_key(full_app: FastAPI, url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path in _endpoints(full_app):
            anonymous = http.request(method, path)
            wrong = http.request(method, path, headers={"Authorization": "Bearer sk-wrong"})
            if path in PUBLIC_PATHS:
                assert anonymous.status_code == 200, (method, path)
                continue
            for response in (anonymous, wrong):
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.headers["x-request-id"]
                assert response.json()["error"]["code"] == "invalid_api_key"


def test_scopes_on_every_route(full_app: FastAPI, url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path in _endpoints(full_app):
            if path in PUBLIC_PATHS:
                continue
            infer = http.request(method, path, headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
            admin = http.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            # Whatever the route answers to an empty request, it is not an auth refusal.
            assert admin.status_code not in (401, 403), (method, path, admin.text)
            if required_scope(method, path) is AuthScope.ADMIN:
                assert infer.status_code == 403, (method, path, infer.text)
                assert infer.json()["error"]["code"] == "insufficient_scope"
            else:
                assert infer.status_code not in (401, 403), (method, path, infer.text)


def test_scope_rules() -> None:
    assert required_scope("GET", "/health") is None
    assert required_scope("GET", "/ready") is None
    assert required_scope("GET", "/metrics") is AuthScope.INFERENCE
    assert required_scope("POST", "/v1/completions") is AuthScope.INFERENCE
    assert required_scope("GET", "/v1/adapters/x") is AuthScope.INFERENCE
    assert required_scope("POST", "/v1/adapters") is AuthScope.ADMIN
    assert required_scope("DELETE", "/v1/adapters/x/versions/1") is AuthScope.ADMIN
    assert required_scope("PUT", "/v1/adapters/x/aliases/prod") is AuthScope.ADMIN
    assert required_scope("GET", "/v1/files") is AuthScope.ADMIN
    assert required_scope("GET", "/v1/fine_tuning/jobs/x") is AuthScope.ADMIN
    # A look-alike prefix is not the admin tree (and still needs a key).
    assert required_scope("GET", "/v1/filesystem") is AuthScope.INFERENCE


def test_upload_without_a_key_is_refused_before_the_body_is_read(url: str) -> None:
    # Over the size limit: the size check would answer 413, auth answers first.
    body = b"x" * (3 * 1024**2)
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/adapters", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 401


def test_bearer_parsing(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get(
            "/v1/models", headers={"Authorization": f"bearer {INFERENCE_KEY}"}
        ).is_success
        basic = http.get("/v1/models", headers={"Authorization": f"Basic {INFERENCE_KEY}"})
        assert basic.status_code == 401
        assert "missing API key" in basic.json()["error"]["message"]
        assert http.get("/v1/models", headers={"Authorization": "Bearer"}).status_code == 401


def test_openapi_declares_the_bearer_scheme(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        schema = http.get("/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys(inference=("a1", "a2", "a3"), admin=("b1", "b2"))
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token in ("a1", "a3", "b1", "nope"):
        calls.clear()
        keys.scopes_of(token)
        assert len(calls) == 5, token  # no early exit on the first match
    assert keys.scopes_of("b2") == {AuthScope.ADMIN, AuthScope.INFERENCE}
    assert keys.scopes_of("a2") == {AuthScope.INFERENCE}
    assert keys.scopes_of("a") == frozenset()


def test_no_keys_means_open(tiny_base: Path) -> None:
    assert not ApiKeys().enabled
    with pytest.raises(ValueError):
        ApiKeys(inference=("",))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_exposure_check(host: str, allowed: bool) -> None:
    config = ServerConfig(host=host)
    if allowed:
        check_exposure(config)
    else:
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            check_exposure(config)
    check_exposure(ServerConfig(host=host, allow_unauthenticated=True))
    check_exposure(ServerConfig(host=host, api_keys=("k",)))
    check_exposure(ServerConfig(host=host, admin_keys=("k",)))


def test_cli_refuses_an_open_public_bind(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any model is loaded: fast, and nothing is exposed even briefly.
    assert main(["serve", "--host", "0.0.0.0", "--no-registry"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_keys_from_flags_files_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nk-file-1\n\nk-file-2  # ops\n")
    assert read_keys(["k1", "k1"], [keyfile], "NOPE") == ("k1", "k-file-1", "k-file-2")
    monkeypatch.setenv("ADAPTERHUB_API_KEY", "e1, e2")
    monkeypatch.setenv("ADAPTERHUB_ADMIN_KEY", "adm")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    config = config_from_args(args)
    assert config.api_keys == ("e1", "e2")
    assert config.admin_keys == ("adm",)
    # Flags win over the environment.
    args = build_parser().parse_args(["serve", "--api-key", "f1"])
    assert config_from_args(args).api_keys == ("f1",)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_keys([], [tmp_path / "empty"], "NOPE")
    with pytest.raises(ValueError, match="whitespace"):
        read_keys(["a b"], [], "NOPE")
    with pytest.raises(ValueError, match="cannot read"):
        read_keys([], [tmp_path / "missing"], "NOPE")


def test_the_client_sends_its_key_and_maps_refusals(url: str, tmp_path: Path) -> None:
    from client import AdapterHubClient, AuthenticationError, PermissionDeniedError

    with AdapterHubClient(base_url=url, api_key=INFERENCE_KEY, max_retries=0) as c:
        assert c.models.list().data[0].id == "tiny-base"
        with pytest.raises(PermissionDeniedError):
            c.files.list()
    with (
        AdapterHubClient(base_url=url, api_key="sk-wrong", max_retries=0) as c,
        pytest.raises(AuthenticationError),
    ):
        c.models.list()
    with AdapterHubClient(base_url=url, api_key=ADMIN_KEY, max_retries=0) as c:
        assert c.files.list().data == []
        assert c.adapters.list().data == []
