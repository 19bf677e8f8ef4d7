"""The store under concurrency: a queued job is claimed once, whoever asks."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from adapterhub_server.errors import ConflictError
from adapterhub_server.finetune import FineTuningService
from adapterhub_server.finetune.records import JobRecord, new_id
from adapterhub_server.finetune.store import INDEX_FILE, SCHEMA_VERSION, FineTuneStore
from client.types import FineTuningJobCreateRequest
from tests.finetune.conftest import BASE_ID
from trainer.config import auto_epochs


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
        ids.append(store.add_job(job, {"name": "x"}).id)
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


OLD_FILES_TABLE = """
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL
)
"""


@pytest.mark.anyio
async def test_an_index_from_before_file_statistics_is_migrated_and_backfilled(
    tmp_path: Path, make_service: Callable[..., FineTuningService], anyio_backend: str
) -> None:
    root = tmp_path / "jobs"
    (root / "files").mkdir(parents=True)
    conn = sqlite3.connect(root / INDEX_FILE)
    conn.execute(OLD_FILES_TABLE)
    conn.execute(
        "INSERT INTO files (id, filename, bytes, created_at, purpose)"
        " VALUES ('file-old', 'old.jsonl', 10, 1, 'fine-tune')"
    )
    conn.commit()
    conn.close()
    (root / "files" / "file-old.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 30)

    service = make_service()
    with sqlite3.connect(root / INDEX_FILE) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    old = service.store.get_file("file-old")
    assert (old.filename, old.records, old.estimated_tokens) == ("old.jsonl", None, None)

    request = FineTuningJobCreateRequest(model=BASE_ID, training_file="file-old", suffix="ok")
    job = await service.create_job(request)
    assert job.hyperparameters.n_epochs == auto_epochs(30, 4)
    backfilled = service.store.get_file("file-old")
    assert backfilled.records == 30 and backfilled.estimated_tokens
    FineTuneStore(root).close()  # opening again is a no-op


def test_a_job_queued_before_configs_were_stored_trains_from_its_config_file(tmp_path) -> None:
    """Schema 1 kept the trainer config only as `config.json`; such a job still launches
    with that file, while a new job's config is written from its row."""
    store = FineTuneStore(tmp_path)
    legacy, current = queued(store, 2)
    with sqlite3.connect(tmp_path / INDEX_FILE) as conn:
        conn.execute("UPDATE jobs SET config = NULL WHERE id = ?", (legacy,))
    old_file = store.job_paths(legacy).config
    old_file.parent.mkdir(parents=True)
    old_file.write_text('{"name": "legacy"}')
    assert store.job_config(legacy) is None
    assert json.loads(store.prepare(legacy).config.read_text()) == {"name": "legacy"}
    assert json.loads(store.prepare(current).config.read_text()) == {"name": "x"}
