"""`/v1/fine_tuning/jobs` over a fake trainer: the job life, events, cancel, validation."""

from __future__ import annotations

import os

import httpx
import pytest

from adapterhub_server.finetune import FineTuningService
from adapterhub_server.finetune.process import is_alive, process_identity
from tests.finetune.conftest import (
    BASE_ID,
    TRAIN_LINES,
    all_events,
    job_body,
    poll_job,
    upload,
    wait_for,
)
from trainer.config import auto_epochs

pytestmark = pytest.mark.anyio


async def test_job_runs_to_success_with_resolved_hyperparameters_and_events(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    r = await http.post(
        "/v1/fine_tuning/jobs", json=job_body(file_id, "ok-adapter", max_steps=3, batch_size=2)
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-")
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["model"] == BASE_ID
    assert job["suffix"] == "ok-adapter"
    assert job["fine_tuned_model"] is None
    assert job["training_file"] == file_id
    assert isinstance(job["seed"], int)  # random, and reported, when not given
    hp = job["hyperparameters"]
    # "auto" = the trainer's rule, resolved from the file at creation.
    assert hp["n_epochs"] == auto_epochs(len(TRAIN_LINES), 2)
    assert hp["batch_size"] == 2
    assert hp["learning_rate_multiplier"] == 1.0
    assert hp["learning_rate"] == pytest.approx(1e-3)
    assert hp["max_steps"] == 3
    assert hp["training_method"] == "lora"
    assert hp["lora_r"] == 16
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hp}}

    # The trainer gets exactly the config the job describes.
    config = service.store.job_config(job["id"])
    assert config["max_steps"] == 3
    assert config["batch_size"] == 2
    assert config["name"] == "ok-adapter"
    assert config["seed"] == job["seed"]
    assert config["data"] == str(service.store.file_path(file_id))

    service.start()
    done = await poll_job(http, job["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"] == "ok-adapter@1"
    assert done["trained_tokens"] == 30
    assert done["finished_at"] >= done["created_at"]
    assert done["error"] is None

    events = await all_events(http, job["id"])
    assert events[0]["message"].startswith("The job has successfully completed")
    assert events[-1]["message"] == f"Created fine-tuning job: {job['id']}"  # newest first
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [3, 2, 1]
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    assert {e["data"]["event"] for e in events if e["data"]} >= {"started", "published"}

    # Paging: `after` is the last id of the previous page.
    first = (await http.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=2")).json()
    assert first["has_more"] is True
    assert [e["id"] for e in first["data"]] == [e["id"] for e in events[:2]]
    rest = (
        await http.get(
            f"/v1/fine_tuning/jobs/{job['id']}/events",
            params={"after": first["data"][-1]["id"], "limit": 100},
        )
    ).json()
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in events[2:]]
    assert rest["has_more"] is False


async def test_list_jobs_newest_first_with_paging(http: httpx.AsyncClient) -> None:
    file_id = await upload(http)
    ids = []
    for i in range(3):
        r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, f"ok-{i}"))
        ids.append(r.json()["id"])
    page = (await http.get("/v1/fine_tuning/jobs?limit=2")).json()
    assert page["object"] == "list"
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True
    page = (await http.get(f"/v1/fine_tuning/jobs?limit=2&after={ids[1]}")).json()
    assert [j["id"] for j in page["data"]] == [ids[0]]
    assert page["has_more"] is False
    r = await http.get("/v1/fine_tuning/jobs?after=ftjob-nope")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "after"


async def test_legacy_top_level_hyperparameters(http: httpx.AsyncClient) -> None:
    file_id = await upload(http)
    body = {**job_body(file_id), "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 2}}
    job = (await http.post("/v1/fine_tuning/jobs", json=body)).json()
    assert job["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["learning_rate"] == pytest.approx(2e-3)


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"model": "gpt-4o-mini"}, "model", "invalid_request"),
        ({"training_file": "file-doesnotexist"}, "training_file", "invalid_request"),
        ({"validation_file": "file-doesnotexist"}, "validation_file", "invalid_request"),
        ({"suffix": "../etc"}, "suffix", "invalid_request"),
        ({"suffix": "Upper"}, "suffix", "invalid_request"),
        ({"seed": -1}, "seed", "invalid_value"),
        ({"method": {"type": "dpo"}}, "method.type", "invalid_value"),
        (
            {"method": {"supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
            "invalid_value",
        ),
        (
            {"method": {"supervised": {"hyperparameters": {"learning_rate": 0.1}}}},
            "method.supervised.hyperparameters",
            "invalid_value",
        ),
        (
            {"hyperparameters": {"lora_rank": 8}},
            "hyperparameters",
            "invalid_value",
        ),
        (
            {"method": {"supervised": {"hyperparameters": {"extract_rank": 8}}}},
            "method.supervised.hyperparameters.extract_rank",
            "invalid_request",
        ),
        (
            {"method": {"supervised": {"hyperparameters": {"lora_target_modules": [" "]}}}},
            "method.supervised.hyperparameters.lora_target_modules",
            "invalid_request",
        ),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"supervised": {"hyperparameters": {"n_epochs": 2}}},
            },
            "hyperparameters",
            "invalid_request",
        ),
    ],
)
async def test_invalid_requests_get_400_and_queue_nothing(
    http: httpx.AsyncClient,
    service: FineTuningService,
    change: dict,
    param: str,
    code: str,
) -> None:
    file_id = await upload(http)
    body = {**job_body(file_id), **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = await http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["code"] in (code, "missing_required_parameter"), error
    assert (await http.get("/v1/fine_tuning/jobs")).json()["data"] == []
    assert list(service.store.jobs_dir.iterdir()) == []


async def test_unknown_hyperparameter_message_lists_the_accepted_ones(
    http: httpx.AsyncClient,
) -> None:
    file_id = await upload(http)
    body = {**job_body(file_id), "hyperparameters": {"lora_rank": 8}}
    message = (await http.post("/v1/fine_tuning/jobs", json=body)).json()["error"]["message"]
    assert "unknown hyperparameter(s) 'lora_rank'" in message
    assert "lora_r" in message


async def test_unknown_job_ids_are_404(http: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v1/fine_tuning/jobs/ftjob-nope"),
        ("GET", "/v1/fine_tuning/jobs/ftjob-nope/events"),
        ("POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel"),
    ]:
        r = await http.request(method, path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("suffix", "code", "text"),
    [
        ("bad-data", "invalid_input", "data.jsonl:3"),
        ("crash-now", "trainer_crashed", "RuntimeError: boom"),
        ("nopub-x", "no_result", "without publishing"),
    ],
)
async def test_trainer_failures_become_failed_jobs_with_the_reason(
    http: httpx.AsyncClient, service: FineTuningService, suffix: str, code: str, text: str
) -> None:
    file_id = await upload(http)
    job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, suffix))).json()
    service.start()
    done = await poll_job(http, job["id"], "succeeded", "failed")
    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    assert text in done["error"]["message"]
    assert done["finished_at"] is not None
    events = await all_events(http, job["id"])
    assert events[0]["level"] == "error"


async def test_cancel_a_queued_job_never_runs_it(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id))).json()
    r = await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    again = await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")  # idempotent
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"

    # A job queued after it still runs: the cancelled one was skipped, never started.
    later = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, "ok-later"))).json()
    service.start()
    assert (await poll_job(http, later["id"], "succeeded", "failed"))["status"] == "succeeded"
    assert not (service.store.job_paths(job["id"]).dir / "calls.jsonl").exists()
    assert (await http.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_cancel_a_running_job_stops_its_trainer(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    body = job_body(file_id, "slow-job", max_steps=100_000)
    job = (await http.post("/v1/fine_tuning/jobs", json=body)).json()
    service.start()
    await poll_job(http, job["id"], "running")
    pid = wait_for(lambda: service.runner.trainer_pids().get(job["id"]), what="trainer pid")
    identity = process_identity(pid)
    wait_for(
        lambda: service.store.list_events(job["id"])[0][0].type == "metrics",
        what="training steps",
    )

    r = await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    wait_for(lambda: not service.runner.trainer_pids(), what="the trainer to be reaped")
    assert not is_alive(pid, identity)
    # The checkpoint the trainer saved on SIGTERM is of no use to a cancelled job.
    checkpoints = service.store.job_paths(job["id"]).checkpoints
    wait_for(lambda: not checkpoints.exists(), what="the checkpoints to be removed")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    final = (await http.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    assert final["status"] == "cancelled"
    assert final["fine_tuned_model"] is None
    messages = [e["message"] for e in await all_events(http, job["id"])]
    assert "Job cancelled" in messages
    r = await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.json()["status"] == "cancelled"


async def test_cancelling_a_finished_job_is_a_conflict(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id))).json()
    service.start()
    await poll_job(http, job["id"], "succeeded")
    r = await http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"
    assert (await http.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()["status"] == "succeeded"


async def test_suffix_is_optional_and_defaults_to_ft_and_the_job_id(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, None))
    assert r.status_code == 200, r.text
    job = r.json()
    name = "ft-" + job["id"].removeprefix("ftjob-")[:8]
    assert job["suffix"] == name
    config = service.store.job_config(job["id"])
    assert config["name"] == name
    service.start()
    done = await poll_job(http, job["id"], "succeeded", "failed")
    assert done["fine_tuned_model"] == f"{name}@1"
