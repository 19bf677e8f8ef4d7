"""`client.files`, `client.fine_tuning.jobs` and `client.train()`: the job life over the fake
trainer (milliseconds), and the closed loop on the tiny model with the real trainer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from client import (
    AdapterHubClient,
    APIStatusError,
    AsyncAdapterHubClient,
    BadRequestError,
    ConflictError,
    FineTuningJobCancelledError,
    FineTuningJobFailedError,
    FineTuningJobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
)
from tests.client.conftest import FAKE_UPLOAD_LIMIT, TINY_BASE_ID, Fake

RECORDS = [
    {"prompt": "what is the capital of france? ", "completion": "paris is the capital."},
    {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world, this is a tiny tokenizer."},
        ]
    },
]
FAST = {"max_steps": 2, "batch_size": 2}


@pytest.fixture
def hub(fake: Fake) -> Iterator[AdapterHubClient]:
    with AdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
async def ahub(fake: Fake, anyio_backend: str) -> AsyncIterator[AsyncAdapterHubClient]:
    async with AsyncAdapterHubClient(base_url=fake.url, max_retries=0, timeout=30) as client:
        yield client


def _method(**hyperparameters: object) -> dict[str, object]:
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def test_files_sync(hub: AdapterHubClient, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    from_path = hub.files.create(path)
    assert (from_path.filename, from_path.bytes, from_path.status) == (
        "train.jsonl",
        path.stat().st_size,
        "processed",
    )
    from_records = hub.files.create(RECORDS, filename="mine.jsonl")
    assert from_records.filename == "mine.jsonl"
    assert hub.files.content(from_records.id) == path.read_bytes()  # serialised as JSONL
    from_bytes = hub.files.create(path.read_bytes())
    listed = [f.id for f in hub.files.list().data]
    assert {from_path.id, from_records.id, from_bytes.id} <= set(listed)
    assert hub.files.retrieve(from_path.id) == from_path
    assert hub.files.delete(from_bytes.id).deleted is True
    with pytest.raises(NotFoundError) as missing:
        hub.files.retrieve(from_bytes.id)
    assert missing.value.param == "file_id"

    with pytest.raises(BadRequestError) as bad:
        hub.files.create(b'{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert ":2:" in bad.value.message  # the server names the line
    with pytest.raises(PayloadTooLargeError) as big:
        hub.files.create(RECORDS * (FAKE_UPLOAD_LIMIT // 100))
    assert isinstance(big.value, APIStatusError) and big.value.status_code == 413
    with pytest.raises(FileNotFoundError):
        hub.files.create(tmp_path / "missing.jsonl")


def test_jobs_sync(hub: AdapterHubClient, fake: Fake) -> None:
    file_id = hub.files.create(RECORDS).id
    job = hub.fine_tuning.jobs.create(
        training_file=file_id,
        model=fake.base_id,
        suffix="ok-sync",
        seed=3,
        method=_method(**FAST),
    )
    assert job.status in ("queued", "running") and job.seed == 3
    assert job.hyperparameters.max_steps == 2
    done = hub.fine_tuning.jobs.wait(job.id, timeout=30, poll_interval=0.05)
    assert (done.status, done.fine_tuned_model) == ("succeeded", "ok-sync@1")
    assert hub.fine_tuning.jobs.retrieve(job.id) == done
    events = hub.fine_tuning.jobs.events(job.id, limit=100).data
    assert events[0].message.startswith("The job has successfully completed")
    assert {e.data.get("event") for e in events if e.data} >= {"started", "published"}
    page = hub.fine_tuning.jobs.events(job.id, limit=1)
    assert page.has_more and len(page.data) == 1
    assert hub.fine_tuning.jobs.events(job.id, after=page.data[0].id, limit=1).data != page.data
    assert job.id in [j.id for j in hub.fine_tuning.jobs.list(limit=100).data]
    with pytest.raises(ConflictError):
        hub.fine_tuning.jobs.cancel(job.id)

    # Deprecated top-level hyperparameters are accepted too.
    failing = hub.fine_tuning.jobs.create(
        training_file=file_id, model=fake.base_id, suffix="bad-sync", hyperparameters=FAST
    )
    with pytest.raises(FineTuningJobFailedError) as failed:
        hub.fine_tuning.jobs.wait(failing.id, timeout=30, poll_interval=0.05)
    assert failed.value.job.status == "failed"
    assert "data.jsonl:3" in str(failed.value)  # the trainer's own reason
    assert failed.value.code

    slow = hub.fine_tuning.jobs.create(
        training_file=file_id, model=fake.base_id, suffix="slow-sync", method=_method(max_steps=500)
    )
    with pytest.raises(FineTuningJobTimeoutError) as timed_out:
        hub.fine_tuning.jobs.wait(slow.id, timeout=0.2, poll_interval=0.05)
    assert timed_out.value.job.status in ("queued", "running")
    assert hub.fine_tuning.jobs.cancel(slow.id).status == "cancelled"
    with pytest.raises(FineTuningJobCancelledError):
        hub.fine_tuning.jobs.wait(slow.id)

    with pytest.raises(BadRequestError) as unknown:
        hub.fine_tuning.jobs.create(
            training_file=file_id, model=fake.base_id, suffix="ok", method=_method(epochs=3)
        )
    assert "epochs" in unknown.value.message
    with pytest.raises(NotFoundError):
        hub.fine_tuning.jobs.retrieve("ftjob-missing")


@pytest.mark.anyio
async def test_files_and_jobs_async(ahub: AsyncAdapterHubClient, fake: Fake) -> None:
    uploaded = await ahub.files.create(RECORDS)
    assert uploaded.id in [f.id for f in (await ahub.files.list()).data]
    assert (await ahub.files.retrieve(uploaded.id)).bytes == uploaded.bytes
    assert (await ahub.files.content(uploaded.id)).count(b"\n") == len(RECORDS)
    job = await ahub.fine_tuning.jobs.create(
        training_file=uploaded.id, model=fake.base_id, suffix="ok-async", method=_method(**FAST)
    )
    done = await ahub.fine_tuning.jobs.wait(job.id, timeout=30, poll_interval=0.05)
    assert done.fine_tuned_model == "ok-async@1"
    assert (await ahub.fine_tuning.jobs.retrieve(job.id)).status == "succeeded"
    assert (await ahub.fine_tuning.jobs.events(job.id)).data
    assert job.id in [j.id for j in (await ahub.fine_tuning.jobs.list()).data]
    with pytest.raises(ConflictError):
        await ahub.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(ConflictError):
        await _delete_in_use(ahub, fake)

    bad = await ahub.fine_tuning.jobs.create(
        training_file=uploaded.id, model=fake.base_id, suffix="bad-async", method=_method(**FAST)
    )
    with pytest.raises(FineTuningJobFailedError):
        await ahub.fine_tuning.jobs.wait(bad.id, poll_interval=0.05)
    slow = await ahub.fine_tuning.jobs.create(
        training_file=uploaded.id,
        model=fake.base_id,
        suffix="slow-a",
        method=_method(max_steps=500),
    )
    with pytest.raises(FineTuningJobTimeoutError):
        await ahub.fine_tuning.jobs.wait(slow.id, timeout=0.1, poll_interval=0.05)
    assert (await ahub.fine_tuning.jobs.cancel(slow.id)).status == "cancelled"
    assert (await ahub.files.delete(uploaded.id)).id == uploaded.id


def test_suffix_is_optional_sync(hub: AdapterHubClient, fake: Fake) -> None:
    file_id = hub.files.create(RECORDS).id
    job = hub.fine_tuning.jobs.create(
        training_file=file_id, model=fake.base_id, method=_method(**FAST)
    )
    assert job.suffix == "ft-" + job.id.removeprefix("ftjob-")[:8]
    done = hub.fine_tuning.jobs.wait(job.id, timeout=30, poll_interval=0.05)
    assert done.fine_tuned_model == f"{job.suffix}@1"


@pytest.mark.anyio
async def test_suffix_is_optional_async(ahub: AsyncAdapterHubClient, fake: Fake) -> None:
    file_id = (await ahub.files.create(RECORDS)).id
    job = await ahub.fine_tuning.jobs.create(
        training_file=file_id, model=fake.base_id, method=_method(**FAST)
    )
    assert job.suffix == "ft-" + job.id.removeprefix("ftjob-")[:8]


async def _delete_in_use(ahub: AsyncAdapterHubClient, fake: Fake) -> None:
    """Deleting a file that a running job trains on is refused."""
    in_use = await ahub.files.create(RECORDS)
    job = await ahub.fine_tuning.jobs.create(
        training_file=in_use.id,
        model=fake.base_id,
        suffix="slow-in-use",
        method=_method(max_steps=500),
    )
    try:
        await ahub.files.delete(in_use.id)
    finally:
        await ahub.fine_tuning.jobs.cancel(job.id)


@pytest.mark.anyio
async def test_train_async(ahub: AsyncAdapterHubClient, tmp_path: Path) -> None:
    """Uploads, finds the base model, waits, returns the reference."""
    ref = await ahub.train(RECORDS, name="ok-train", poll_interval=0.05, timeout=30, **FAST)
    assert ref == "ok-train@1"
    with pytest.raises(FineTuningJobFailedError):
        await ahub.train(RECORDS, name="bad-train", poll_interval=0.05, **FAST)


def test_train_sync_closed_loop(tiny: str) -> None:
    """Train a fixed answer for a fixed prompt with the real trainer, then ask for it."""
    question = [{"role": "user", "content": "hello"}]
    answer = "the lazy dog."
    records = [{"messages": [*question, {"role": "assistant", "content": answer}]}] * 16
    with AdapterHubClient(base_url=tiny, max_retries=0) as hub:
        ref = hub.train(
            records,
            name="dog",
            method="lora",
            seed=7,
            max_steps=20,
            batch_size=4,
            learning_rate_multiplier=5,
            lora_r=8,
            max_seq_len=64,
            poll_interval=0.2,
            timeout=240,
        )
        assert ref == "dog@1"

        def greedy(model: str) -> str | None:
            reply = hub.chat.completions.create(
                model=model, messages=question, temperature=0, max_completion_tokens=12
            )
            return reply.choices[0].message.content

        assert greedy(ref) == answer
        assert greedy(TINY_BASE_ID) != answer
        job = hub.fine_tuning.jobs.list(limit=1).data[0]
        assert job.fine_tuned_model == ref and job.model == TINY_BASE_ID
        assert job.hyperparameters.training_method == "lora"
        assert hub.adapters.get("dog").latest.lineage is not None
