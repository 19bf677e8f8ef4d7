"""The store under concurrency: a queued job is claimed once, whoever asks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapterhub_server.errors import ConflictError
from adapterhub_server.finetune.records import JobRecord, new_id
from adapterhub_server.finetune.store import FineTuneStore


def queued(store: FineTuneStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = JobRecord(
            id=new_id("ftjob"),
            created_at=i,
            status="queued",
            model="m",
            suffix=f"s{i}",
            training_file="file-x",
            validation_file=None,
            seed=0,
            hyperparameters={},
        )
        ids.append(store.add_job(job).id)
    return ids


def test_each_queued_job_is_claimed_exactly_once(tmp_path: Path) -> None:
    stores = [FineTuneStore(tmp_path) for _ in range(4)]  # like four processes
    ids = queued(stores[0], 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(store: FineTuneStore) -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    assert len(claimed) == len(ids)  # nobody got a job twice
    for store in stores:
        store.close()


def test_status_changes_are_compare_and_set(tmp_path: Path) -> None:
    store = FineTuneStore(tmp_path)
    (job_id,) = queued(store, 1)
    store.cancel(job_id)
    # The runner's late "succeeded" must not overwrite the user's cancel.
    assert not store.transition(job_id, ["running"], "succeeded")
    assert store.get_job(job_id).status == "cancelled"
    assert store.cancel(job_id).status == "cancelled"  # idempotent

    (other,) = queued(store, 1)
    store.claim_next()
    assert store.transition(other, ["running"], "succeeded", message="done")
    with pytest.raises(ConflictError):
        store.cancel(other)
    assert store.get_job(other).finished_at is not None
