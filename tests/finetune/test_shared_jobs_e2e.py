"""Fine-tuning jobs across real server processes on one PostgreSQL + S3 registry: any
replica serves the jobs API, only `--fine-tuning-worker` replicas train, a SIGKILLed worker's
job resumes on another worker from its uploaded checkpoint, and cancel works from anywhere."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg
import pytest

from adapterhub_server.finetune.process import is_alive
from tests.finetune.conftest import wait_for
from tests.finetune.test_e2e import TINY, create, job, started_runs, upload
from tests.registry import cluster_services as services
from tests.trainer.helpers import write_data

pytestmark = pytest.mark.skipif(
    services.pg_bin() is None,
    reason="PostgreSQL binaries (initdb, pg_ctl) are not installed; scripts/test.sh installs "
    "them when run as root",
)
WORKER = ("--fine-tuning-worker", "--fine-tuning-lease", "3")


def _row(db: str, job_id: str) -> dict:
    with psycopg.connect(db, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute(
            "SELECT status, worker, checkpoint, pid, pid_start, attempts"
            " FROM adapterhub_finetune.jobs"
            " WHERE id = %s",
            (job_id,),
        ).fetchone()
    assert row is not None
    return dict(row)


def _objects(env: dict[str, str], bucket: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [obj["Key"] for obj in found]


@pytest.fixture
def cluster(
    pg_url: str, s3_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, str, str, Path]]:
    db = services.create_database(pg_url)
    bucket = services.create_bucket(s3_env)
    yield db, bucket, f"s3://{bucket}/shared", tmp_path


def test_a_killed_workers_job_resumes_on_another_and_any_replica_follows_it(
    cluster: tuple[str, str, str, Path], tiny_base: Path, s3_env: dict[str, str]
) -> None:
    db, bucket, blobs, tmp = cluster
    data = write_data(tmp / "train.jsonl")
    with ExitStack() as stack:
        front = stack.enter_context(services.serve_replica(tiny_base, db, blobs, tmp / "front"))
        worker_a = stack.enter_context(
            services.serve_replica(tiny_base, db, blobs, tmp / "a", *WORKER)
        )
        http = stack.enter_context(httpx.Client(base_url=front.url, timeout=60))

        # Created on the replica that does not train: a worker picks it up.
        created = create(http, upload(http, data), "moving", max_steps=100_000, **TINY)
        first = wait_for(
            lambda: (row := _row(db, created["id"]))["checkpoint"] and row,
            timeout=240,
            what="worker a to upload a checkpoint",
        )
        assert first["worker"].split(":")[1] == str(worker_a.proc.pid)
        keys = _objects(s3_env, bucket, f"shared/fine-tuning/jobs/{created['id']}/checkpoints/")
        assert keys and all(f"/{first['checkpoint']}/" in k for k in keys)
        trainer = (first["pid"], first["pid_start"])
        assert trainer[0] and is_alive(*trainer)

        # The worker dies without a word; its trainer dies with it.
        os.kill(worker_a.proc.pid, signal.SIGKILL)
        worker_a.proc.wait()
        wait_for(lambda: not is_alive(*trainer), timeout=30, what="the trainer to die")
        assert job(http, created["id"])["status"] == "running"  # until its lease runs out

        worker_b = stack.enter_context(
            services.serve_replica(tiny_base, db, blobs, tmp / "b", *WORKER)
        )
        runs = wait_for(
            lambda: (runs := started_runs(http, created["id"]))[1:] and runs,
            timeout=240,
            what="the job to resume on worker b",
        )
        taken = _row(db, created["id"])
        assert taken["worker"].split(":")[1] == str(worker_b.proc.pid)
        assert taken["attempts"] == 2
        # Newest first: worker b's trainer resumed from (at least) a's uploaded checkpoint.
        resumed = runs[0]["data"]["resumed_from_step"]
        assert resumed >= int(first["checkpoint"].removeprefix("step-")) > 0
        events = http.get(f"/v1/fine_tuning/jobs/{created['id']}/events", params={"limit": 100})
        messages = [e["message"] for e in events.json()["data"]]
        assert any("stopped renewing its lease" in m for m in messages)

        # Cancelled on the front replica: worker b stops its trainer and drops the checkpoints.
        r = http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        wait_for(
            lambda: (
                _row(db, created["id"])["pid"] is None
                and not _objects(s3_env, bucket, f"shared/fine-tuning/jobs/{created['id']}/")
            ),
            timeout=60,
            what="worker b to stop the cancelled job and delete its checkpoints",
        )

        # A short job trains on worker b and is served by the front replica at once.
        short = create(http, upload(http, data), "short", max_steps=3, **TINY)
        done = wait_for(
            lambda: (j := job(http, short["id"]))["status"] in ("succeeded", "failed") and j,
            timeout=240,
            what="the short job",
        )
        assert done["status"] == "succeeded", done["error"]
        assert done["fine_tuned_model"] == "short@1"
        r = http.post(
            "/v1/completions",
            json={"model": "short@1", "prompt": "hello", "max_tokens": 3, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "short@1"
