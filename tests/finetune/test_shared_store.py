"""Fine-tuning state on a shared registry, against a real PostgreSQL server and object stores:
replicas see each other's files and jobs, workers claim each job once, leases expire,
checkpoints move between workers, and a worker that lost its job cannot touch it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterhub_server.finetune.objects import DirectoryObjects, S3Objects, download_tree
from adapterhub_server.finetune.records import FileRecord, JobRecord, new_id
from adapterhub_server.finetune.shared_store import SharedFineTuneStore
from tests.registry import cluster_services as services

pytestmark = pytest.mark.skipif(
    services.pg_bin() is None,
    reason="PostgreSQL binaries (initdb, pg_ctl) are not installed; scripts/test.sh installs "
    "them when run as root",
)
MODEL = "tiny-base"


@pytest.fixture
def index(pg_url: str) -> Iterator[object]:
    from adapterhub_server.registry.postgres_index import PostgresIndex

    idx = PostgresIndex(services.create_database(pg_url))
    yield idx
    idx.close()


@pytest.fixture
def objects(tmp_path: Path) -> DirectoryObjects:
    return DirectoryObjects(tmp_path / "blobs" / "fine-tuning")


def _store(index, objects, tmp_path: Path, name: str, **kwargs) -> SharedFineTuneStore:
    kwargs.setdefault("model_id", MODEL)
    return SharedFineTuneStore(
        index, objects, tmp_path / name, base_model=f"/models/{name}", worker=name, **kwargs
    )


def _upload(store: SharedFineTuneStore, text: str) -> FileRecord:
    staged = store.staging_path()
    staged.write_text(text)
    record = FileRecord(
        id=new_id("file"),
        filename="train.jsonl",
        bytes=len(text),
        created_at=int(time.time()),
        purpose="fine-tune",
        records=text.count("\n"),
        estimated_tokens=10,
    )
    return store.add_file(record, staged)


def _queue(store: SharedFineTuneStore, file_id: str, n: int = 1, model: str = MODEL) -> list[str]:
    ids = []
    for i in range(n):
        job = JobRecord(
            id=new_id("ftjob"),
            created_at=i,
            status="queued",
            model=model,
            suffix=f"s{i}",
            training_file=file_id,
            validation_file=None,
            seed=0,
            hyperparameters={},
        )
        config = {"name": f"s{i}", "data": "/elsewhere/train.jsonl", "registry": "/somewhere"}
        ids.append(store.add_job(job, config).id)
    return ids


def test_files_and_jobs_are_shared_between_replicas(index, objects, tmp_path: Path) -> None:
    a, b = _store(index, objects, tmp_path, "a"), _store(index, objects, tmp_path, "b")
    record = _upload(a, '{"prompt": "p", "completion": "c"}\n')
    assert [f.id for f in b.list_files()] == [record.id]
    fetched = b.local_file(record.id)  # not on b's disk until asked for
    assert fetched.parent == tmp_path / "b" / "files"
    assert fetched.read_text() == '{"prompt": "p", "completion": "c"}\n'
    (job_id,) = _queue(a, record.id)
    assert b.get_job(job_id).status == "queued"
    b.cancel(job_id)
    assert a.status(job_id) == "cancelled"
    assert [e.message for e in a.list_events(job_id)[0]] == ["Job cancelled"]
    a.delete_file(record.id)
    assert b.list_files() == [] and list(objects.keys("files/")) == []


def test_workers_claim_each_job_exactly_once(index, objects, tmp_path: Path) -> None:
    workers = [_store(index, objects, tmp_path, f"w{i}") for i in range(4)]
    file_id = _upload(workers[0], "{}\n").id
    ids = _queue(workers[0], file_id, 30)
    other_base = _queue(workers[0], file_id, 1, model="another-base")
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(store: SharedFineTuneStore) -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append((job.id, job.worker or ""))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in claimed) == sorted(ids)  # each once, none of another base
    assert other_base[0] not in {j for j, _ in claimed}
    for job_id, worker in claimed:
        assert workers[0].get_job(job_id).worker == worker


def test_an_expired_lease_moves_the_job_and_fences_the_old_worker(
    index, objects, tmp_path: Path
) -> None:
    a = _store(index, objects, tmp_path, "a", lease_s=2.0)
    b = _store(index, objects, tmp_path, "b", lease_s=2.0)
    (job_id,) = _queue(a, _upload(a, "{}\n").id)
    assert a.claim_next().id == job_id
    paths = a.prepare(job_id)
    checkpoint = paths.checkpoints / "step-00000004"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "weights.bin").write_bytes(b"\x01" * 1000)
    (checkpoint / "trainer_state.json").write_text('{"step": 4}')
    a.checkpoint_saved(job_id, checkpoint)
    assert a.renew_leases([job_id]) == set()  # held while renewed
    assert b.claim_next() is None

    time.sleep(2.5)  # a stops renewing (it died, or hung)
    taken = b.claim_next()
    assert taken is not None and taken.id == job_id and taken.worker == "b"
    assert taken.attempts == 2
    events = [e.message for e in b.list_events(job_id)[0]]
    assert any("takes the job over from checkpoint step-00000004" in m for m in events)

    # b resumes from a's checkpoint, with its own paths and no registry path in the config.
    resumed = b.prepare(job_id)
    restored = resumed.checkpoints / "step-00000004"
    assert (restored / "adapter" / "weights.bin").read_bytes() == b"\x01" * 1000
    assert json.loads((restored / "trainer_state.json").read_text()) == {"step": 4}
    config = json.loads(resumed.config.read_text())
    assert config["data"] == str(b.file_path(taken.training_file))
    assert config["base_model"] == "/models/b" and config["registry"] is None

    # a comes back: it learns the job is gone and can change nothing about it.
    assert a.renew_leases([job_id]) == {job_id}
    assert not a.transition(job_id, ["running"], "succeeded")
    a.set_process(job_id, 1234, "x")
    a.record_progress(job_id, [], fine_tuned_model="stale@1")
    job = b.get_job(job_id)
    assert (job.status, job.pid, job.fine_tuned_model) == ("running", None, None)
    assert b.transition(job_id, ["running"], "succeeded")


def test_a_checkpoint_is_named_only_once_uploaded_and_older_ones_go(
    index, objects, tmp_path: Path
) -> None:
    a = _store(index, objects, tmp_path, "a")
    (job_id,) = _queue(a, _upload(a, "{}\n").id)
    a.claim_next()
    paths = a.prepare(job_id)
    for step in (2, 4):
        checkpoint = paths.checkpoints / f"step-{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}))
        a.checkpoint_saved(job_id, checkpoint)
    keys = sorted(objects.keys(f"jobs/{job_id}/"))
    assert keys == [f"jobs/{job_id}/checkpoints/step-00000004/trainer_state.json"]

    # Cancelled meanwhile (from any replica): a late upload is not recorded or kept.
    a.cancel(job_id)
    late = paths.checkpoints / "step-00000006"
    late.mkdir()
    (late / "trainer_state.json").write_text("{}")
    a.checkpoint_saved(job_id, late)
    assert not any("step-00000006" in k for k in objects.keys(f"jobs/{job_id}/"))
    a.discard_checkpoints(job_id)
    assert list(objects.keys(f"jobs/{job_id}/")) == []


@pytest.mark.parametrize("backend", ["directory", "s3"])
def test_object_stores_put_get_list_and_delete(backend: str, tmp_path: Path, request) -> None:
    if backend == "directory":
        store = DirectoryObjects(tmp_path / "objects")
    else:
        import boto3

        env = request.getfixturevalue("s3_env")
        bucket = services.create_bucket(env)
        store = S3Objects(boto3.client("s3"), bucket, "prefix/fine-tuning")
    source = tmp_path / "src"
    (source / "a").mkdir(parents=True)
    (source / "a" / "x.bin").write_bytes(b"x" * 10)
    (source / "y.txt").write_text("y")
    for path in (source / "a" / "x.bin", source / "y.txt"):
        store.put(f"jobs/j/{path.relative_to(source).as_posix()}", path)
    assert sorted(store.keys("jobs/j/")) == ["jobs/j/a/x.bin", "jobs/j/y.txt"]
    assert download_tree(store, "jobs/j", tmp_path / "dest") == 2
    assert (tmp_path / "dest" / "a" / "x.bin").read_bytes() == b"x" * 10
    with pytest.raises(FileNotFoundError):
        store.get("jobs/missing", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    assert store.delete_prefix("jobs/j/") == 2
    assert list(store.keys("jobs/")) == []
