"""DoRA, modules_to_save and trainable tokens as fine-tuning hyperparameter extensions: they
reach the trainer's config and the job's report, and bad values are a 400 naming the field,
checked against the served base (its module names, vocabulary, tied embeddings)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from adapterhub_server.finetune import BaseModelInfo, FineTuningService
from tests.finetune.conftest import BASE_ID, app_client, fake_runner, job_body, upload
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.anyio

HP = "method.supervised.hyperparameters"


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


def open_service(base: Path, root: Path) -> FineTuningService:
    """A service over the real tiny base's facts (its runner is never started)."""
    return FineTuningService.open(
        root / "jobs",
        base=BaseModelInfo.from_directory(base, BASE_ID),
        registry=root / "registry",
        runner=fake_runner(),
    )


@pytest.fixture
def service(tiny_base: Path, tmp_path: Path) -> Iterator[FineTuningService]:
    service = open_service(tiny_base, tmp_path)
    yield service
    service.stop()


@pytest.fixture
async def http(service: FineTuningService, anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(service) as client:
        yield client


async def test_kind_extensions_reach_the_trainer_and_the_report(
    http: httpx.AsyncClient, service: FineTuningService
) -> None:
    file_id = await upload(http)
    body = job_body(
        file_id,
        use_dora=True,
        modules_to_save=["lm_head"],
        trainable_token_indices=[5, 17],
        max_steps=2,
    )
    r = await http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    hp = job["hyperparameters"]
    assert hp["use_dora"] is True
    assert hp["modules_to_save"] == ["lm_head"]
    assert hp["trainable_token_indices"] == [5, 17]
    config = service.store.job_config(job["id"])
    assert config["dora"] is True
    assert config["modules_to_save"] == ["lm_head"]
    assert config["trainable_token_indices"] == [5, 17]


async def test_plain_jobs_report_plain_lora(http: httpx.AsyncClient) -> None:
    file_id = await upload(http)
    job = (await http.post("/v1/fine_tuning/jobs", json=job_body(file_id))).json()
    hp = job["hyperparameters"]
    assert (hp["use_dora"], hp["modules_to_save"], hp["trainable_token_indices"]) == (
        False,
        [],
        [],
    )


@pytest.mark.parametrize(
    ("hyperparameters", "param", "text"),
    [
        ({"modules_to_save": ["q_proj"]}, f"{HP}.modules_to_save", "'q_proj' is not supported"),
        ({"modules_to_save": ["lm_head", "norm"]}, f"{HP}.modules_to_save", "only lm_head"),
        (
            {"trainable_token_indices": [5, 10**6]},
            f"{HP}.trainable_token_indices",
            "1000000 outside the vocabulary",
        ),
        (
            {"trainable_token_indices": [3, 3]},
            f"{HP}.trainable_token_indices",
            "3 given twice",
        ),
        (
            {"modules_to_save": ["embed_tokens"], "trainable_token_indices": [3]},
            f"{HP}.trainable_token_indices",
            "already trains every embedding row",
        ),
        (
            {"training_method": "full", "use_dora": True},
            f"{HP}.use_dora",
            "LoRA training only",
        ),
        (
            {"training_method": "full", "modules_to_save": ["lm_head"]},
            f"{HP}.modules_to_save",
            "LoRA training only",
        ),
        (
            {"training_method": "full", "trainable_token_indices": [5]},
            f"{HP}.trainable_token_indices",
            "LoRA training only",
        ),
    ],
)
async def test_bad_kind_values_are_400_naming_the_field(
    http: httpx.AsyncClient,
    service: FineTuningService,
    hyperparameters: dict,
    param: str,
    text: str,
) -> None:
    file_id = await upload(http)
    r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, **hyperparameters))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert text in error["message"], error
    assert error["message"].startswith(f"{param}: "), error  # the request's name, not the trainer's
    assert list(service.store.jobs_dir.iterdir()) == []


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"trainable_token_indices": [-1]},
        {"trainable_token_indices": []},
        {"trainable_token_indices": ["5"]},
        {"use_dora": "yes"},
        {"modules_to_save": "lm_head"},
    ],
)
async def test_malformed_kind_values_are_400(
    http: httpx.AsyncClient, service: FineTuningService, hyperparameters: dict
) -> None:
    file_id = await upload(http)
    r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, **hyperparameters))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(f"{HP}.{next(iter(hyperparameters))}"), error
    assert list(service.store.jobs_dir.iterdir()) == []


async def test_tied_base_refuses_a_head_copy_with_token_rows(
    tied_base: Path, tmp_path: Path, anyio_backend: str
) -> None:
    service = open_service(tied_base, tmp_path)
    try:
        async with app_client(service) as http:
            file_id = await upload(http)
            body = job_body(file_id, modules_to_save=["lm_head"], trainable_token_indices=[5])
            r = await http.post("/v1/fine_tuning/jobs", json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == f"{HP}.trainable_token_indices"
            assert "ties lm_head to embed_tokens" in error["message"]
            # Either alone is fine on the tied base.
            for alone in ({"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [5]}):
                r = await http.post("/v1/fine_tuning/jobs", json=job_body(file_id, **alone))
                assert r.status_code == 200, r.text
    finally:
        service.stop()
