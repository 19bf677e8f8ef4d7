"""`/v1/adapters` with the real engine and registry: upload, then query at once, no restart."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.registry import Registry, RegistryAdapterSource
from adapterhub_server.server import Server, build_app, build_server
from tests.engine.conftest import greedy_continuation
from tests.live_server import serve

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f, (adapter_dir / f).read_bytes())) for f in FILES]


def _digest(adapter_dir: Path) -> dict[str, str]:
    return {f: hashlib.sha256((adapter_dir / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def live(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path_factory.mktemp("registry"),
        max_upload_bytes=1_000_000,
        engine=EngineConfig(max_num_seqs=8, max_loras=2),
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        yield server, url


@pytest.fixture(scope="module")
def server_url(live: tuple[Server, str]) -> str:
    return live[1]


@pytest.fixture
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


def _greedy(http: httpx.Client, model: str, prompt: str = "hello world", n: int = 8) -> str:
    r = http.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _peft_text(tiny_base: Path, adapter_dir: Path, prompt: str = "hello world", n: int = 8) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter_dir
    ).eval()
    return tok.decode(greedy_continuation(model, tok.encode(prompt), n), skip_special_tokens=True)


def test_upload_then_query_without_restart(http, tiny_base, tiny_adapters) -> None:
    adapter = tiny_adapters["r8"]
    r = http.post(
        "/v1/adapters",
        data={"name": "support-bot", "alias": "prod", "sha256": json.dumps(_digest(adapter))},
        files=_files(adapter),
    )
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["version"] == 1 and record["ref"] == "support-bot@1"
    assert (
        record["files"]["adapter_model.safetensors"]["sha256"]
        == _digest(adapter)["adapter_model.safetensors"]
    )
    expected = _peft_text(tiny_base, adapter)
    for ref in ("support-bot", "support-bot@1", "support-bot@prod"):
        assert _greedy(http, ref) == expected, ref
    models = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "support-bot" in models


def test_new_version_and_alias_moves(http, tiny_base, tiny_adapters) -> None:
    v1, v2 = tiny_adapters["r4"], tiny_adapters["r16-rslora"]
    assert http.post("/v1/adapters", data={"name": "multi"}, files=_files(v1)).status_code == 201
    assert http.post("/v1/adapters", data={"name": "multi"}, files=_files(v2)).status_code == 201
    out_v1, out_v2 = _peft_text(tiny_base, v1), _peft_text(tiny_base, v2)
    assert out_v1 != out_v2
    assert _greedy(http, "multi") == out_v2  # newest
    assert _greedy(http, "multi@1") == out_v1
    r = http.put("/v1/adapters/multi/aliases/stable", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert _greedy(http, "multi@stable") == out_v1
    r = http.put("/v1/adapters/multi/aliases/stable", json={"version": 2})
    assert r.json()["previous"] == 1
    assert _greedy(http, "multi@stable") == out_v2
    assert http.delete("/v1/adapters/multi/aliases/stable").status_code == 200
    assert (
        http.post("/v1/completions", json={"model": "multi@stable", "prompt": "x"}).status_code
        == 404
    )
    info = http.get("/v1/adapters/multi").json()
    assert info["versions"] == [1, 2] and info["latest"]["version"] == 2
    listed = {a["name"] for a in http.get("/v1/adapters").json()["data"]}
    assert "multi" in listed


def test_download_returns_the_stored_bytes(http, tiny_adapters) -> None:
    adapter = tiny_adapters["attn-only"]
    http.post("/v1/adapters", data={"name": "dl"}, files=_files(adapter))
    r = http.get("/v1/adapters/dl/versions/1/files/adapter_model.safetensors")
    assert r.status_code == 200
    assert r.content == (adapter / "adapter_model.safetensors").read_bytes()
    assert http.get("/v1/adapters/dl/versions/1").json()["rank"] == 8
    assert http.get("/v1/adapters/dl/versions/9").status_code == 404


def _bad_weights(tmp_path: Path, src: Path, mutate) -> Path:
    out = tmp_path / "bad"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(src / "adapter_model.safetensors")
    mutate(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    key = next(iter(tensors))
    tensors[key][0, 0] = math.nan


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 7)


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("pickle", 400),
        ("nan", 400),
        ("shape", 400),
        ("dotdot-name", 400),
        ("slash-name", 400),
        ("encoded-name", 400),
        ("sha-mismatch", 400),
        ("bad-metadata", 400),
        ("no-files", 400),
    ],
)
def test_bad_uploads_are_rejected_and_store_nothing(
    http, tiny_adapters, tmp_path, case, status
) -> None:
    src = tiny_adapters["r4"]
    name, files, data = "bad-case", _files(src), {}
    if case == "pickle":
        files = [
            ("files", ("adapter_config.json", (src / "adapter_config.json").read_bytes())),
            ("files", ("adapter_model.bin", b"\x80\x04\x95pickle")),
        ]
    elif case == "nan":
        files = _files(_bad_weights(tmp_path, src, _nan))
    elif case == "shape":
        files = _files(_bad_weights(tmp_path, src, _wrong_shape))
    elif case == "dotdot-name":
        name = ".."
    elif case == "slash-name":
        name = "a/b"
    elif case == "encoded-name":
        name = "%2e%2e"
    elif case == "sha-mismatch":
        data["sha256"] = json.dumps({"adapter_model.safetensors": "0" * 64})
    elif case == "bad-metadata":
        data["metadata"] = "{not json"
    elif case == "no-files":
        files = [("files", ("README.md", b"hello"))]
    before = http.get("/v1/adapters").json()["data"]
    r = http.post("/v1/adapters", data={"name": name, **data}, files=files)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/adapters").json()["data"] == before


def test_oversized_upload_is_413(http, tiny_adapters) -> None:
    files = [*_files(tiny_adapters["r4"]), ("files", ("padding.bin", b"\0" * 1_100_000))]
    r = http.post("/v1/adapters", data={"name": "too-big"}, files=files)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert http.get("/v1/adapters/too-big").status_code == 404


def test_delete_waits_for_running_requests(http, server_url, tiny_adapters) -> None:
    http.post("/v1/adapters", data={"name": "busy"}, files=_files(tiny_adapters["r32"]))
    streaming, done = threading.Event(), threading.Event()
    body = {"model": "busy", "prompt": "abc", "max_tokens": 150, "ignore_eos": True, "stream": True}

    def long_request() -> None:
        with (
            httpx.Client(base_url=server_url, timeout=120) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                streaming.set()
        done.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        assert streaming.wait(60)
        r = http.delete("/v1/adapters/busy/versions/1")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "conflict"
        assert _greedy(http, "busy@1", n=2)  # still servable: nothing was deleted
    finally:
        worker.join(120)
    assert done.is_set()
    assert http.delete("/v1/adapters/busy/versions/1").status_code == 200
    r = http.post("/v1/completions", json={"model": "busy", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404


def test_start_up_adapters_are_served_beside_the_registry(
    tiny_base, tiny_adapters, tmp_path
) -> None:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path / "reg",
        lora_modules={"startup": tiny_adapters["r4"]},
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    assert server.registry is not None and server.registry.list_adapters() == []
    without = build_server(replace(config, registry=None))
    assert without.registry is None
    with (
        serve(build_app(server.engine, server), lifespan="on") as url,
        httpx.Client(base_url=url) as c,
    ):
        assert "startup" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert (
            c.post(
                "/v1/completions", json={"model": "startup", "prompt": "x", "max_tokens": 2}
            ).status_code
            == 200
        )


# --- hostile uploads (issue 13) ---------------------------------------------------------------


def _stored(http: httpx.Client) -> list:
    r = http.get("/v1/adapters")
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_duplicate_file_parts_are_refused(http, tiny_adapters) -> None:
    src = tiny_adapters["r4"]
    before = _stored(http)
    files = [*_files(src), ("files", ("adapter_config.json", b'{"r": 4}'))]
    r = http.post("/v1/adapters", data={"name": "twice"}, files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "files" and "adapter_config.json" in error["message"]
    assert _stored(http) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", '{"note": "\\ud800"}'),  # the reproduction: a JSON escape
        ("metadata", '{"\\udfff": 1}'),
        ("metadata", "[" * 65 + "]" * 65),
        ("metadata", '{"n": ' + "9" * 1001 + "}"),
        ("metadata", '{"n": 18446744073709551616}'),
        ("metadata", '{"n": NaN}'),
        ("sha256", '{"adapter_model.safetensors": "\\ud800"}'),
        ("sha256", '{"x": ' + "[" * 70 + "]" * 70 + "}"),
    ],
)
def test_invalid_json_form_fields_are_400(http, tiny_adapters, field, value) -> None:
    before = _stored(http)
    r = http.post(
        "/v1/adapters", data={"name": "bad-json", field: value}, files=_files(tiny_adapters["r4"])
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_value" and error["param"] == field, error
    assert _stored(http) == before


def _raw_multipart(fields: dict[str, str], files: dict[str, bytes], charset: str) -> tuple:
    """A multipart body whose text is `charset`-encoded, as that charset parameter declares.

    Starlette decodes form fields with the charset the client names, so a client naming
    unicode_escape can send lone surrogates in plain fields (\\ud800 decodes to one)."""
    boundary = "hostile-boundary"
    parts = []
    for key, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for filename, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}; charset={charset}"
    return body, {"content-type": content_type}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"name": "ok-name", "description": "a \\ud800 b"}, "description"),
        ({"name": "ok-name", "alias": "\\udc00"}, "alias"),
        ({"name": "\\ud800"}, "name"),
    ],
)
def test_lone_surrogates_in_plain_form_fields_are_400(http, tiny_adapters, fields, param) -> None:
    src = tiny_adapters["r4"]
    before = _stored(http)
    body, headers = _raw_multipart(
        fields, {f: (src / f).read_bytes() for f in FILES}, "unicode_escape"
    )
    r = http.post("/v1/adapters", content=body, headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_value" and error["param"] == param, error
    assert _stored(http) == before


def test_backtracking_patterns_are_matched_in_linear_time(http, tiny_adapters, tmp_path) -> None:
    """The issue's reproduction: "model(.|.)*Z" froze the server at upload (target_modules:
    refused after seconds) or at every load (exclude_modules: accepted, matching nothing)."""
    src = tiny_adapters["r4"]
    config = json.loads((src / "adapter_config.json").read_text())
    weights = (src / "adapter_model.safetensors").read_bytes()

    def upload(name: str, **changes: object) -> httpx.Response:
        files = [
            ("files", ("adapter_config.json", json.dumps({**config, **changes}).encode())),
            ("files", ("adapter_model.safetensors", weights)),
        ]
        return http.post("/v1/adapters", data={"name": name}, files=files)

    r = upload("regex-target", target_modules="model(.|.)*Z")
    assert r.status_code == 400 and "target_modules" in r.json()["error"]["message"]
    r = upload("regex-lookahead", target_modules=".*(?=q_proj)q_proj")
    assert r.status_code == 400, r.text
    assert "target_modules" in r.json()["error"]["message"]
    assert "linear time" in r.json()["error"]["message"]
    r = upload("regex-exclude", exclude_modules="model(.|.)*Z")
    assert r.status_code == 201, r.text
    assert _greedy(http, "regex-exclude", n=2)  # the engine's load matches it too
    assert http.get("/health").status_code == 200


def test_absurd_weights_are_refused_at_upload(http, tiny_adapters, tmp_path) -> None:
    def inflate(tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            tensors[key].fill_(1e15)

    before = _stored(http)
    r = http.post(
        "/v1/adapters",
        data={"name": "absurd"},
        files=_files(_bad_weights(tmp_path, tiny_adapters["r4"], inflate)),
    )
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "too large to serve" in message and "model.layers." in message
    assert _stored(http) == before


def test_listing_survives_a_stored_lone_surrogate(http, live, tiny_adapters) -> None:
    """A row stored before uploads checked Unicode: GET /v1/adapters used to answer 500 to
    everyone from then on."""
    server, _ = live
    assert (
        http.post(
            "/v1/adapters", data={"name": "old-row"}, files=_files(tiny_adapters["r4"])
        ).status_code
        == 201
    )
    assert server.registry is not None and server.registry.root is not None
    with sqlite3.connect(server.registry.root / "registry.db") as db:
        db.execute(
            "UPDATE versions SET metadata = ?, description = ? WHERE name = 'old-row'",
            ('{"note": "\\ud800"}', "bad \udcff bytes".encode("utf-8", "surrogateescape")),
        )
    r = http.get("/v1/adapters")
    assert r.status_code == 200, r.text
    (row,) = [a for a in r.json()["data"] if a["name"] == "old-row"]
    assert row["latest"]["metadata"] == {"note": "\ufffd"}
    assert http.get("/v1/adapters/old-row").status_code == 200
    assert http.get("/v1/adapters/old-row/versions/1").status_code == 200


class _DeleteAfterResolve(RegistryAdapterSource):
    """The registry source, except that when the engine thread resolves `ref` the version
    is deleted right after: the request holds a location whose files are gone before the
    adapter cache reads them."""

    def __init__(self, registry: Registry, ref: str) -> None:
        super().__init__(registry)
        self.ref = ref

    def locate(self, ref: str):  # type: ignore[no-untyped-def]
        loc = super().locate(ref)
        if loc is not None and ref == self.ref and threading.current_thread().name == "engine":
            name, _, version = loc.key.partition("@")
            self.registry.delete_version(name, int(version))
        return loc


def test_query_racing_a_delete_gets_404_without_paths(http, live, tiny_adapters) -> None:
    server, _ = live
    registry = server.registry
    assert registry is not None and registry.root is not None
    assert (
        http.post(
            "/v1/adapters", data={"name": "racer"}, files=_files(tiny_adapters["r4"])
        ).status_code
        == 201
    )
    chained = server.engine.engine.adapters.source
    index = next(i for i, s in enumerate(chained.sources) if isinstance(s, RegistryAdapterSource))
    original = chained.sources[index]
    chained.sources[index] = _DeleteAfterResolve(registry, "racer")
    try:
        r = http.post("/v1/completions", json={"model": "racer", "prompt": "x", "max_tokens": 2})
    finally:
        chained.sources[index] = original
    assert str(registry.root) not in r.text
    assert "/" not in r.json()["error"]["message"].replace("/v1/", "")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"model": "racer", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
