"""No request path unpickles, and nothing a client sends turns on `trust_remote_code`.

Every unpickling entry point (`pickle.load(s)`, `pickle.Unpickler`, `torch.load` and the
loaders behind it in `torch.serialization`) is replaced with one that fails the test, then
the whole request surface runs in-process against the real tiny engine and registry: upload
an adapter, serve it (load into a slot, generate, stream), list and download it, upload a
training file and run a fine-tuning job (with the fake trainer) to success.
"""

from __future__ import annotations

import ast
import json
import pickle
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization
from fastapi.testclient import TestClient

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.finetune import BaseModelInfo, FineTuningService
from adapterhub_server.server import build_app, build_server
from tests.finetune.conftest import fake_runner, jsonl

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("adapterhub_server", "trainer", "client")
FILES = ("adapter_config.json", "adapter_model.safetensors")


class UnpicklingAttempted(AssertionError):
    pass


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise UnpicklingAttempted("something tried to unpickle")


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every unpickler raises; returns the list of names patched (for the self-check)."""
    targets: list[tuple[Any, str]] = [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ]
    for private in ("_load", "_legacy_load"):
        if hasattr(torch.serialization, private):
            targets.append((torch.serialization, private))
    for owner, name in targets:
        monkeypatch.setattr(owner, name, _refuse)
    yield [f"{owner.__name__}.{name}" for owner, name in targets]


def test_the_patches_bite(no_unpickling: list[str], tmp_path: Path) -> None:
    """Self-check: with the fixture on, unpickling anything really fails."""
    assert "torch.load" in no_unpickling
    with pytest.raises(UnpicklingAttempted):
        pickle.loads(pickle.dumps({"a": 1}))
    with pytest.raises(UnpicklingAttempted):
        torch.load(tmp_path / "x.pt")
    with pytest.raises(UnpicklingAttempted):
        torch.serialization.load(tmp_path / "x.pt")


def _wait_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job stayed {job['status']}"
        time.sleep(0.05)  # polling a status another process changes: nothing to wait on


def test_every_request_path_works_without_unpickling(
    no_unpickling: list[str],
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    # Built with the patches on: loading the base model and warming up never unpickle
    # either.
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path / "registry",
        fine_tuning=False,
        max_upload_bytes=1_000_000,
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    jobs = FineTuningService.open(
        tmp_path / "jobs",
        base=BaseModelInfo(model_id="tiny-base", path=tiny_base),
        registry=tmp_path / "registry",
        runner=fake_runner(),
    )
    server = replace(server, fine_tuning=jobs)
    adapter = tiny_adapters["r8"]
    with TestClient(build_app(server.engine, server), raise_server_exceptions=False) as client:
        files = [("files", (f, (adapter / f).read_bytes())) for f in FILES]
        r = client.post("/v1/adapters", data={"name": "safe", "alias": "prod"}, files=files)
        assert r.status_code == 201, r.text

        body = {"prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        base = client.post("/v1/completions", json={"model": "tiny-base", **body})
        served = client.post("/v1/completions", json={"model": "safe@prod", **body})
        assert base.status_code == 200 and served.status_code == 200, served.text
        # The adapter was really loaded and applied, not skipped.
        assert served.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "safe", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")

        assert "safe" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["safe"]
        assert client.get("/v1/adapters/safe/versions/1").status_code == 200
        for f in FILES:
            got = client.get(f"/v1/adapters/safe/versions/1/files/{f}")
            assert got.status_code == 200 and got.content == (adapter / f).read_bytes()

        r = client.post(
            "/v1/files", files={"file": ("train.jsonl", jsonl())}, data={"purpose": "fine-tune"}
        )
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        assert client.get(f"/v1/files/{file_id}/content").content == jsonl()
        r = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-base", "training_file": file_id, "suffix": "ok-no-pickle"},
        )
        assert r.status_code == 200, r.text
        job = _wait_job(client, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").status_code == 200

        assert client.delete("/v1/adapters/safe/versions/1?force=true").status_code == 200


# -- trust_remote_code ---------------------------------------------------------------------


def remote_code_violations(source: str, filename: str) -> list[str]:
    """Every `trust_remote_code=<anything but the literal False>` keyword, and every call
    that could smuggle it in through `**kwargs` into a Hugging Face loader."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            where = f"{filename}:{node.lineno}"
            if keyword.arg == "trust_remote_code" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"{where}: trust_remote_code={ast.unparse(keyword.value)}")
            func = ast.unparse(node.func)
            if keyword.arg is None and func.endswith(("from_pretrained", "AutoConfig")):
                found.append(f"{where}: {func}(**{ast.unparse(keyword.value)})")
    return found


def test_the_remote_code_scan_finds_what_it_should() -> None:
    bad = (
        "AutoModel.from_pretrained(p, trust_remote_code=True)\n"
        "AutoTokenizer.from_pretrained(p, trust_remote_code=flag)\n"
        "AutoModel.from_pretrained(p, **options)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=False)\n"
    )
    assert len(remote_code_violations(bad, "x.py")) == 3


def test_trust_remote_code_is_never_enabled_in_the_source() -> None:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 20  # the scan really looked at the packages
    violations = [
        v
        for path in files
        for v in remote_code_violations(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not violations, violations


@pytest.fixture
def jobs_client(tmp_path: Path, tiny_base: Path) -> Iterator[tuple[TestClient, FineTuningService]]:
    from adapterhub_server.api import create_app
    from tests.api.fake_engine import FakeEngine

    service = FineTuningService.open(
        tmp_path / "jobs",
        base=BaseModelInfo(model_id="tiny-base", path=tiny_base),
        registry=tmp_path / "registry",
        runner=fake_runner(),
    )
    with TestClient(create_app(FakeEngine(), fine_tuning=service)) as client:
        yield client, service
    service.stop()


@pytest.mark.parametrize(
    "where",
    ["method", "hyperparameters"],
)
@pytest.mark.parametrize(
    "smuggled",
    [{"trust_remote_code": True}, {"auto_map": {"AutoModel": "evil.Model"}}, {"model_kwargs": {}}],
)
def test_hyperparameters_refuse_unknown_keys(
    jobs_client: tuple[TestClient, FineTuningService], where: str, smuggled: dict[str, Any]
) -> None:
    client, _ = jobs_client
    file_id = client.post(
        "/v1/files", files={"file": ("t.jsonl", jsonl())}, data={"purpose": "fine-tune"}
    ).json()["id"]
    body: dict[str, Any] = {"model": "tiny-base", "training_file": file_id, "suffix": "ok-x"}
    hyper = {"n_epochs": 1, **smuggled}
    if where == "method":
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    else:
        body["hyperparameters"] = hyper
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    assert next(iter(smuggled)) in r.json()["error"]["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_unknown_top_level_job_fields_never_reach_the_trainer(
    jobs_client: tuple[TestClient, FineTuningService],
) -> None:
    """OpenAI clients send fields this server does not know; whatever happens to them, the
    trainer's config never carries them."""
    client, service = jobs_client
    file_id = client.post(
        "/v1/files", files={"file": ("t.jsonl", jsonl())}, data={"purpose": "fine-tune"}
    ).json()["id"]
    body = {
        "model": "tiny-base",
        "training_file": file_id,
        "suffix": "ok-x",
        "trust_remote_code": True,
        "integrations": [{"trust_remote_code": True}],
    }
    r = client.post("/v1/fine_tuning/jobs", json=body)
    if r.status_code == 400:  # refused outright is fine too, if nothing was stored
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        return
    assert r.status_code == 200, r.text
    config = json.dumps(service.store.job_config(r.json()["id"]))
    assert "trust_remote_code" not in config and "integrations" not in config
    assert json.loads(config)["name"] == "ok-x"
