"""A DoRA adapter over HTTP, with the real engine and registry: uploaded, then queried at once
(greedy text equal to PEFT's); broken DoRA files refused with the OpenAI error envelope
naming the problem, and nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import build_app, build_server
from tests.engine.conftest import greedy_continuation
from tests.live_server import serve
from tests.lora.dora_adapters import make_dora_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def dora_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dora_adapter(tiny_base, tmp_path_factory.mktemp("http-dora") / "d", seed=31)


@pytest.fixture(scope="module")
def http(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path_factory.mktemp("registry"),
        max_upload_bytes=1_000_000,
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    with (
        serve(build_app(server.engine, server), lifespan="on") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _files(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f, (directory / f).read_bytes())) for f in FILES]


def _peft_text(tiny_base: Path, adapter: Path, n: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = greedy_continuation(model, tok.encode(PROMPT), n)
    return tok.decode(ids, skip_special_tokens=True)


def test_upload_then_query(http: httpx.Client, tiny_base: Path, dora_dir: Path) -> None:
    r = http.post("/v1/adapters", data={"name": "dora-bot"}, files=_files(dora_dir))
    assert r.status_code == 201, r.text
    body = {"model": "dora-bot", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _peft_text(tiny_base, dora_dir, 8)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("short", "expected [64]"), ("nan", "non-finite"), ("missing", "use_dora: true")],
)
def test_broken_dora_uploads_are_refused(
    http: httpx.Client, dora_dir: Path, tmp_path: Path, case: str, fragment: str
) -> None:
    tensors = load_file(dora_dir / FILES[1])
    key = next(k for k in tensors if k.endswith("self_attn.q_proj.lora_magnitude_vector"))
    if case == "short":
        tensors[key] = tensors[key][:-3].clone()
    elif case == "nan":
        tensors[key][2] = float("nan")
    else:
        del tensors[key]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / FILES[0]).write_bytes((dora_dir / FILES[0]).read_bytes())
    save_file(tensors, bad / FILES[1])
    before = http.get("/v1/adapters").json()["data"]
    r = http.post("/v1/adapters", data={"name": f"bad-{case}"}, files=_files(bad))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and "lora_magnitude_vector" in error["message"]
    assert http.get("/v1/adapters").json()["data"] == before
