"""`/v1/adapters` with the real engine and registry: upload, then query at once, no restart."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_server
from tests.live_server import serve

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f, (adapter_dir / f).read_bytes())) for f in FILES]


def _digest(adapter_dir: Path) -> dict[str, str]:
    return {f: hashlib.sha256((adapter_dir / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def server_url(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path_factory.mktemp("registry"),
        max_upload_bytes=1_000_000,
        engine=EngineConfig(max_num_seqs=8, max_loras=2),
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        yield url


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
    ids = tok.encode(prompt)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


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
