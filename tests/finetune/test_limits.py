"""Every hyperparameter is bounded at job creation, and so is a job's total work: what could
never finish, or could only fail later, is a 400 naming the field and queues nothing."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from adapterhub_server.finetune import FineTuningLimits, FineTuningService
from adapterhub_server.finetune.hyperparameters import estimate_work
from tests.finetune.conftest import BASE_CONTEXT, app_client, job_body, jsonl, upload
from trainer.config import TrainConfig, auto_epochs
from trainer.data import JsonlStats

pytestmark = pytest.mark.anyio

HP = "method.supervised.hyperparameters"


async def assert_refused(
    http: httpx.AsyncClient, service: FineTuningService, body: dict, param: str
) -> dict:
    """POST the job; it must be a 400 naming `param`, with nothing queued or written."""
    r = await http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert (await http.get("/v1/fine_tuning/jobs")).json()["data"] == []
    assert list(service.store.jobs_dir.iterdir()) == []
    return dict(error)


@pytest.mark.parametrize(
    ("change", "param", "text"),
    [
        # The reproduction: a billion epochs ran at 100% CPU until cancelled.
        ({"hyperparameters": {"n_epochs": 10**9}}, "hyperparameters.n_epochs", "at most 100"),
        ({"n_epochs": 10**9}, f"{HP}.n_epochs", "at most 100"),
        ({"max_steps": 10**9}, f"{HP}.max_steps", "at most 1,000,000"),
        ({"batch_size": 10**6}, f"{HP}.batch_size", "at most 256"),
        ({"grad_accum": 10**6}, f"{HP}.grad_accum", "at most 256"),
        ({"max_seq_len": BASE_CONTEXT + 1}, f"{HP}.max_seq_len", "the context of"),
        ({"lora_r": 65}, f"{HP}.lora_r", "--max-lora-rank"),
        ({"training_method": "full", "extract_rank": 65}, f"{HP}.extract_rank", "--max-lora-rank"),
        ({"lora_target_modules": ["q_proj", "lm_head"]}, f"{HP}.lora_target_modules", "lm_head"),
        ({"lora_target_modules": ["nope"]}, f"{HP}.lora_target_modules", "adaptable modules"),
        ({"learning_rate_multiplier": 1e4}, f"{HP}.learning_rate_multiplier", "limit of 1"),
        ({"learning_rate_multiplier": 1e308}, f"{HP}.learning_rate_multiplier", "limit of 1"),
        ({"seed": 2**40}, "seed", "at most 4294967295"),
        ({"seed": 2**64 - 1}, "seed", "at most 4294967295"),
    ],
)
async def test_each_hyperparameter_is_bounded_at_creation(
    http: httpx.AsyncClient, service: FineTuningService, change: dict, param: str, text: str
) -> None:
    file_id = await upload(http)
    body = job_body(file_id)
    if "hyperparameters" in change or "seed" in change:
        body.update(change)
    else:
        body = job_body(file_id, **change)
    error = await assert_refused(http, service, body, param)
    assert text in error["message"], error
    if param != "seed":
        assert error["message"].startswith(f"{param}: "), error


async def test_rank_above_the_servers_max_lora_rank_is_refused_at_creation(
    make_service: Callable[..., FineTuningService],
) -> None:
    # It used to train, then fail at publish.
    service = make_service(limits=FineTuningLimits(max_lora_rank=8))
    async with app_client(service) as http:
        file_id = await upload(http)
        error = await assert_refused(http, service, job_body(file_id, lora_r=16), f"{HP}.lora_r")
        assert error["message"] == (
            f"{HP}.lora_r: must be at most 8 (this server's --max-lora-rank), got 16"
        )
        # Asking for nothing gets the trainer's default rank (16) fitted to the limit.
        r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, "ok-default"))
        assert r.status_code == 200, r.text
        assert r.json()["hyperparameters"]["lora_r"] == 8
        r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, "ok-8", lora_r=8))
        assert r.status_code == 200, r.text
        full = job_body(file_id, "ok-full", training_method="full")
        r = await http.post("/v1/fine_tuning/jobs", json=full)
        assert r.status_code == 200, r.text
        assert r.json()["hyperparameters"]["extract_rank"] == 8


async def test_values_at_the_limits_are_accepted(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    body = job_body(
        file_id,
        n_epochs=100,
        batch_size=256,
        max_seq_len=BASE_CONTEXT,
        lora_r=64,
        lora_target_modules=["q_proj", "down_proj"],
        learning_rate_multiplier=1000,  # peak 1.0, the limit
    )
    r = await http.post("/v1/fine_tuning/jobs", json={**body, "seed": 2**32 - 1})
    assert r.status_code == 200, r.text
    config = service.store.job_config(r.json()["id"])
    assert (config["epochs"], config["r"], config["max_seq_len"]) == (100, 64, BASE_CONTEXT)
    assert config["lr"] == pytest.approx(1.0)


async def test_total_work_is_limited_with_the_estimate_in_the_message(
    make_service: Callable[..., FineTuningService],
) -> None:
    service = make_service(limits=FineTuningLimits(max_fine_tuning_tokens=2_000))
    async with app_client(service) as http:
        file_id = await upload(http)
        record = service.store.get_file(file_id)
        per_example = -(-(record.estimated_tokens or 0) // 2)
        assert record.records == 2 and 10 < per_example < 100

        error = await assert_refused(
            http, service, job_body(file_id, n_epochs=50), f"{HP}.n_epochs"
        )
        estimate = 2 * 50 * per_example
        assert f"about {estimate:,} tokens" in error["message"]
        assert f"100 sequences x ~{per_example} tokens" in error["message"]
        assert "limit of 2,000 (--max-fine-tuning-tokens)" in error["message"]

        # Steps count batch x accumulation sequences each, whatever the file's length.
        error = await assert_refused(
            http, service, job_body(file_id, max_steps=100, batch_size=4), f"{HP}.max_steps"
        )
        assert f"about {400 * per_example:,} tokens" in error["message"]

        # Truncation caps each example: the same job fits with a short max_seq_len.
        short = job_body(file_id, "ok-short", max_steps=100, batch_size=4, max_seq_len=4)
        assert (await http.post("/v1/fine_tuning/jobs", json=short)).status_code == 200
        ok = job_body(file_id, "ok-small", n_epochs=2)
        assert (await http.post("/v1/fine_tuning/jobs", json=ok)).status_code == 200


async def test_job_creation_uses_the_figures_stored_at_upload(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    lines = ['{"prompt":"q","completion":"a"}'] * 100  # under the test app's 4 KiB uploads
    file_id = await upload(http, jsonl(lines))
    assert service.store.get_file(file_id).records == 100
    # Were the file read again, "auto" epochs would come from this one record (25 epochs).
    service.store.file_path(file_id).write_text(lines[0] + "\n")
    r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, batch_size=4))
    assert r.status_code == 200, r.text
    assert r.json()["hyperparameters"]["n_epochs"] == auto_epochs(100, 4) == 3


def test_work_estimate(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl().decode())
    train = JsonlStats(records=10, estimated_tokens=1_000)  # 100 tokens an example
    config = TrainConfig(data=data, name="x", epochs=3, batch_size=2, max_seq_len=64)
    work = estimate_work(config, train)
    assert (work.sequences, work.tokens_per_sequence, work.tokens) == (30, 64, 30 * 64)
    config = TrainConfig(data=data, name="x", epochs=3, max_seq_len=512)
    assert estimate_work(config, train).tokens == 30 * 100
    steps = TrainConfig(data=data, name="x", max_steps=5, batch_size=2, grad_accum=3)
    assert estimate_work(steps, train).tokens == 5 * 2 * 3 * 100
    packed = TrainConfig(data=data, name="x", max_steps=5, batch_size=2, batching="packed")
    assert estimate_work(packed, train).tokens == 5 * 2 * 512  # packed rows are full
    evaluation = JsonlStats(records=4, estimated_tokens=40)
    with_eval = estimate_work(config, train, evaluation)
    assert with_eval.eval_tokens == 6 * 4 * 10
    assert with_eval.tokens == 30 * 100 + 240
