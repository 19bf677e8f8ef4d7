"""End to end with the real trainer on the tiny model: a job trains, publishes into the
server's registry and is servable at once; cancel stops the trainer; a stopped server's job
resumes from its checkpoint on the next start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.finetune.process import is_alive, process_identity
from adapterhub_server.server import Server, build_app, build_server
from tests.finetune.conftest import wait_for
from tests.live_server import serve
from tests.trainer.helpers import write_data

BASE_ID = "tiny-base"
TINY = {"lora_r": 8, "lora_alpha": 16, "max_seq_len": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-e2e")
    return {
        "registry": root / "registry",
        "jobs": root / "jobs",
        "data": write_data(root / "train.jsonl"),
    }


@contextmanager
def running_server(tiny_base: Path, dirs: dict[str, Path]) -> Iterator[tuple[str, Server]]:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name=BASE_ID,
        registry=dirs["registry"],
        jobs_dir=dirs["jobs"],
        engine=EngineConfig(max_num_seqs=4, max_loras=2),
    )
    server = build_server(config)
    with serve(build_app(server.engine, server), lifespan="on") as url:
        yield url, server


@pytest.fixture(scope="module")
def live(tiny_base: Path, dirs: dict[str, Path]) -> Iterator[tuple[str, Server]]:
    with running_server(tiny_base, dirs) as started:
        yield started


def upload(http: httpx.Client, path: Path) -> str:
    r = http.post(
        "/v1/files",
        files={"file": (path.name, path.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def create(http: httpx.Client, file_id: str, suffix: str, **hyperparameters: object) -> dict:
    body = {
        "model": BASE_ID,
        "training_file": file_id,
        "suffix": suffix,
        "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }
    r = http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def job(http: httpx.Client, job_id: str) -> dict:
    return dict(http.get(f"/v1/fine_tuning/jobs/{job_id}").json())


def trainer_events(http: httpx.Client, job_id: str) -> list[dict]:
    data = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [e for e in data if e["data"] and "event" in e["data"]]


def started_runs(http: httpx.Client, job_id: str) -> list[dict]:
    """The trainer's `started` events, newest first: one per trainer process of the job."""
    return [e for e in trainer_events(http, job_id) if e["data"]["event"] == "started"]


def test_openai_sdk_job_trains_publishes_and_serves_at_once(
    live: tuple[str, Server], dirs: dict[str, Path]
) -> None:
    from openai import OpenAI

    url, _ = live
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with open(dirs["data"], "rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    assert file.status == "processed"
    created = client.fine_tuning.jobs.create(
        model=BASE_ID,
        training_file=file.id,
        suffix="zork",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "learning_rate_multiplier": 5, "batch_size": 4}
            },
        },
    )
    assert created.status in ("queued", "running")
    ft = wait_for(
        lambda: (
            (j := client.fine_tuning.jobs.retrieve(created.id)).status
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        timeout=300,
        what="the job to finish",
    )
    assert ft.status == "succeeded", ft.error
    assert ft.fine_tuned_model == "zork@1"
    assert ft.trained_tokens and ft.trained_tokens > 0
    assert ft.hyperparameters.n_epochs == 1

    events = list(client.fine_tuning.jobs.list_events(created.id, limit=5))  # pages through all
    kinds = [(e.data or {}).get("event") for e in events]
    assert {"started", "metrics", "published", "succeeded"} <= set(kinds)
    assert events[0].message.startswith("The job has successfully completed")

    # Servable at once, through the registry, under the reference the job reports.
    assert "zork" in [m.id for m in client.models.list()]
    tuned = client.completions.create(
        model=ft.fine_tuned_model, prompt="hello", max_tokens=4, temperature=0, logprobs=0
    )
    base = client.completions.create(
        model=BASE_ID, prompt="hello", max_tokens=4, temperature=0, logprobs=0
    )
    assert tuned.model == "zork@1"
    assert tuned.choices[0].logprobs.token_logprobs != base.choices[0].logprobs.token_logprobs

    with httpx.Client(base_url=url) as http:
        version = http.get("/v1/adapters/zork/versions/1").json()
    assert version["lineage"]["hyperparameters"]["seed"] == 7
    assert version["lineage"]["hyperparameters"]["lr"] == pytest.approx(5e-3)
    assert version["base_model_id"] == BASE_ID  # the id the server serves, not a path


def test_cancel_stops_a_running_trainer(live: tuple[str, Server], dirs: dict[str, Path]) -> None:
    url, server = live
    assert server.fine_tuning is not None
    runner = server.fine_tuning.runner
    with httpx.Client(base_url=url, timeout=60) as http:
        created = create(http, upload(http, dirs["data"]), "endless", max_steps=100_000, **TINY)
        pid = wait_for(lambda: runner.trainer_pids().get(created["id"]), timeout=120)
        identity = process_identity(pid)
        wait_for(lambda: started_runs(http, created["id"]), timeout=120, what="the loop")
        r = http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        wait_for(lambda: not runner.trainer_pids(), timeout=120, what="the trainer to exit")
        assert not is_alive(pid, identity)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        final = job(http, created["id"])
        assert final["status"] == "cancelled"
        assert final["fine_tuned_model"] is None
        # Serving went on meanwhile and still does.
        r = http.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


def test_a_job_interrupted_by_a_server_stop_resumes_from_its_checkpoint(
    tiny_base: Path, tmp_path: Path
) -> None:
    dirs = {
        "registry": tmp_path / "registry",
        "jobs": tmp_path / "jobs",
        "data": write_data(tmp_path / "train.jsonl"),
    }
    with running_server(tiny_base, dirs) as (url, server), httpx.Client(base_url=url) as http:
        created = create(http, upload(http, dirs["data"]), "resumable", max_steps=100_000, **TINY)
        wait_for(lambda: started_runs(http, created["id"]), timeout=120, what="the loop")
    # The server stopped: the trainer saved a checkpoint and the job went back to the queue.
    stopped = server.fine_tuning.store.get_job(created["id"])  # type: ignore[union-attr]
    assert stopped.status == "queued"
    checkpoints = sorted((dirs["jobs"] / "jobs" / created["id"] / "checkpoints").iterdir())
    assert checkpoints

    with running_server(tiny_base, dirs) as (url, server), httpx.Client(base_url=url) as http:
        runs = wait_for(
            lambda: (runs := started_runs(http, created["id"]))[1:] and runs,
            timeout=120,
            what="the resumed trainer",
        )
        # Newest first: the second run resumed from the checkpoint the first one saved.
        latest = checkpoints[-1].name
        assert runs[0]["data"]["resumed_from_step"] == int(latest.removeprefix("step-"))
        events = http.get(f"/v1/fine_tuning/jobs/{created['id']}/events", params={"limit": 100})
        messages = [e["message"] for e in events.json()["data"]]
        assert any(f"resuming from checkpoint {latest}" in m for m in messages)
        assert job(http, created["id"])["status"] == "running"
        http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
    assert server.fine_tuning.store.get_job(created["id"]).attempts == 2  # type: ignore[union-attr]
