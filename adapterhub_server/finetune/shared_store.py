"""Fine-tuning state for a cluster: rows in the registry's PostgreSQL database, bytes in its
blob store, workers holding leases.

Every replica of a shared registry serves `/v1/files` and `/v1/fine_tuning/jobs` from the same
tables (schema `adapterhub_finetune`, versioned and migrated like the index), so a job created
on one replica is listed, followed and cancelled from any other. Uploaded files and
checkpoints live in the blob store under `fine-tuning/` (`objects.py`); the local jobs
directory is only scratch space where a worker trains.

Only replicas started with `--fine-tuning-worker` train. A worker claims the oldest queued
job of its base model with `SELECT ... FOR UPDATE SKIP LOCKED` (concurrent workers never
take the same job and never wait on each other) and holds a lease on it, renewed on every
runner tick. Each complete checkpoint is uploaded and then recorded in the job's row, so the
row only ever names a checkpoint whose bytes are all there. A worker that dies stops renewing;
once its lease has expired (by the database's clock, so hosts' clocks do not matter) another
worker claims the job, downloads the recorded checkpoint and resumes the trainer from it.
Updates to a running job carry `worker = <this worker>`, so a worker that was only slow
cannot overwrite what the new holder does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapterhub_server.finetune.job_tables import (
    JobPaths,
    JobTables,
    get_job_row,
    insert_events,
)
from adapterhub_server.finetune.objects import ObjectStore, download_tree, upload_tree
from adapterhub_server.finetune.records import QUEUED, RUNNING, JobRecord, make_event
from adapterhub_server.finetune.store import (
    FILES_DIR,
    JOBS_DIR,
    UPLOAD_PREFIX,
    sweep_uploads,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

SCHEMA = "adapterhub_finetune"
"""PostgreSQL schema of the tables (the registry index owns `public`)."""
_MIGRATION_LOCK = 0x41484654  # pg_advisory_xact_lock key ("AHFT")
DEFAULT_LEASE_S = 60.0
"""How long a worker holds a job without renewing it. A worker renews every runner tick
(half a second), so only a dead or stuck worker loses a job; a shorter lease resumes a dead
worker's job sooner."""

_SCHEMA_1 = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.files (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    purpose TEXT NOT NULL,
    records BIGINT,
    estimated_tokens BIGINT
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    suffix TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    seed BIGINT NOT NULL,
    hyperparameters TEXT NOT NULL,
    config TEXT,
    finished_at BIGINT,
    fine_tuned_model TEXT,
    trained_tokens BIGINT,
    error TEXT,
    estimated_finish BIGINT,
    events_offset BIGINT NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_expires TIMESTAMPTZ,
    checkpoint TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON {SCHEMA}.jobs (status, seq);
CREATE TABLE IF NOT EXISTS {SCHEMA}.events (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON {SCHEMA}.events (job_id, seq)
"""
MIGRATIONS: dict[int, str] = {1: _SCHEMA_1}


def new_worker_id() -> str:
    """`host:pid:random`: unique per process start, readable in events and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Statements:
    """A psycopg cursor that takes the `?` placeholders `JobTables` writes."""

    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self.cur.execute(sql.replace("?", "%s"), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self.cur.executemany(sql.replace("?", "%s"), rows)


class SharedFineTuneStore(JobTables):
    """Files, jobs and events of a shared registry (see the module docstring)."""

    exclusive_runner = False

    def __init__(
        self,
        index: Any,
        objects: ObjectStore,
        work_dir: Path,
        *,
        model_id: str,
        base_model: str,
        worker: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        """`index`: the registry's `PostgresIndex` (its connections and transactions);
        `work_dir`: local scratch for uploads being checked, fetched files and the jobs
        this worker trains; `model_id` / `base_model`: the base this replica serves (a
        worker takes only jobs for it, and trains the copy at `base_model`)."""
        from psycopg.rows import dict_row

        from adapterhub_server.registry.postgres_index import migrate_schema

        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self._dict_row = dict_row
        self.index = index
        self.objects = objects
        self.root = Path(work_dir).expanduser()
        self.files_dir = self.root / FILES_DIR
        self.jobs_dir = self.root / JOBS_DIR
        for directory in (self.root, self.files_dir, self.jobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self.base_model = base_model
        self.worker = worker or new_worker_id()
        self.lease_s = float(lease_s)
        self._uploaded: dict[str, str] = {}
        """Job id -> name of the checkpoint last uploaded and recorded by this worker."""
        with index.transaction("write") as cur:
            migrate_schema(
                cur,
                version_table=f"{SCHEMA}_version",
                migrations=MIGRATIONS,
                lock_key=_MIGRATION_LOCK,
                what=f"fine-tuning tables in {index.display_url}",
            )
        with self._read() as conn:
            known = {row["id"] for row in conn.execute("SELECT id FROM files").fetchall()}
        sweep_uploads(self.files_dir, known)

    def close(self) -> None:
        """The connections belong to the registry's index, which closes them."""

    # -- connection ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, kind: str) -> Iterator[_Statements]:
        with self.index.transaction(kind) as cur:
            cur.row_factory = self._dict_row
            # Unqualified names are this schema's tables for this transaction only: the
            # index's `files` table and this `files` table never meet.
            cur.execute(f"SET LOCAL search_path TO {SCHEMA}")
            yield _Statements(cur)

    def _write(self) -> contextlib.AbstractContextManager[_Statements]:
        return self._transaction("write")

    def _read(self) -> contextlib.AbstractContextManager[_Statements]:
        return self._transaction("read")

    def _owned(self) -> tuple[str, tuple[Any, ...]]:
        return " AND (status <> ? OR worker = ?)", (RUNNING, self.worker)

    # -- files --------------------------------------------------------------------------

    @staticmethod
    def _file_key(file_id: str) -> str:
        return f"files/{file_id}.jsonl"

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def staging_path(self) -> Path:
        return self.files_dir / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"

    def local_file(self, file_id: str) -> Path:
        path = self.file_path(file_id)
        if not path.is_file():  # files never change once uploaded: a local copy stays valid
            self.objects.get(self._file_key(file_id), path)
        return path

    def _keep_file_bytes(self, file_id: str, staged: Path) -> None:
        self.objects.put(self._file_key(file_id), staged)
        os.replace(staged, self.file_path(file_id))

    def _remove_file_bytes(self, file_id: str) -> None:
        self.objects.delete_prefix(self._file_key(file_id))
        self.file_path(file_id).unlink(missing_ok=True)

    # -- jobs ---------------------------------------------------------------------------

    def job_paths(self, job_id: str) -> JobPaths:
        return JobPaths(self.jobs_dir / job_id)

    @staticmethod
    def _checkpoints_key(job_id: str) -> str:
        return f"jobs/{job_id}/checkpoints"

    def claim_next(self) -> JobRecord | None:
        """Take the oldest queued job for this base, or a running one whose worker's lease
        expired; None when there is neither."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT id, status, worker, checkpoint FROM jobs WHERE model = ? AND"
                " (status = ? OR (status = ? AND lease_expires < now()))"
                " ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                (self.model_id, QUEUED, RUNNING),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, estimated_finish = NULL,"
                " worker = ?, lease_expires = now() + make_interval(secs => ?),"
                " events_offset = 0, pid = NULL, pid_start = NULL WHERE id = ?",
                (RUNNING, self.worker, self.lease_s, row["id"]),
            )
            if row["status"] == RUNNING:
                where = f"checkpoint {row['checkpoint']}" if row["checkpoint"] else "the start"
                message = (
                    f"Worker {row['worker']} stopped renewing its lease; worker {self.worker} "
                    f"takes the job over from {where}"
                )
                logger.warning("job %s: %s", row["id"], message)
                insert_events(conn, [make_event(row["id"], message, created_at=int(time.time()))])
            return get_job_row(conn, row["id"])

    def renew_leases(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET lease_expires = now() + make_interval(secs => ?)"
                " WHERE id = ANY(?) AND worker = ? AND status = ?",
                (self.lease_s, ids, self.worker, RUNNING),
            )
            # A job that is no longer running here because it was cancelled is not lost:
            # the runner sees the cancel and stops its trainer in order.
            taken = conn.execute(
                "SELECT id FROM jobs WHERE id = ANY(?) AND status = ? AND worker <> ?",
                (ids, RUNNING, self.worker),
            ).fetchall()
        return {row["id"] for row in taken}

    def prepare(self, job_id: str) -> JobPaths:
        """Fresh scratch for the job: its files fetched, the recorded checkpoint (if any)
        downloaded, and the trainer config pointed at this machine's paths."""
        paths = self.job_paths(job_id)
        shutil.rmtree(paths.dir, ignore_errors=True)
        paths.dir.mkdir(parents=True)
        with self._read() as conn:
            row = conn.execute(
                "SELECT training_file, validation_file, config, checkpoint FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        config = json.loads(row["config"])
        config["data"] = str(self.local_file(row["training_file"]))
        if row["validation_file"]:
            config["eval_data"] = str(self.local_file(row["validation_file"]))
        if config.get("output_dir"):
            config["output_dir"] = str(paths.dir / "output")
        config["base_model"] = self.base_model
        config["registry"] = None  # from ADAPTERHUB_REGISTRY: no password on disk
        if row["checkpoint"]:
            prefix = f"{self._checkpoints_key(job_id)}/{row['checkpoint']}"
            found = download_tree(self.objects, prefix, paths.checkpoints / row["checkpoint"])
            logger.info("job %s: fetched checkpoint %s (%d files)", job_id, prefix, found)
            self._uploaded[job_id] = row["checkpoint"]
        write_json_atomic(paths.config, config)
        return paths

    def checkpoint_saved(self, job_id: str, checkpoint: Path) -> None:
        """Upload the checkpoint, record it in the job's row, then drop older uploads."""
        if self._uploaded.get(job_id) == checkpoint.name:
            return
        prefix = self._checkpoints_key(job_id)
        count = upload_tree(self.objects, checkpoint, f"{prefix}/{checkpoint.name}")
        with self._write() as conn:
            recorded = conn.execute(
                "UPDATE jobs SET checkpoint = ? WHERE id = ? AND status = ? AND worker = ?",
                (checkpoint.name, job_id, RUNNING, self.worker),
            ).rowcount
        if not recorded:  # cancelled or taken over meanwhile: the upload is nobody's
            self.objects.delete_prefix(f"{prefix}/{checkpoint.name}/")
            return
        self._uploaded[job_id] = checkpoint.name
        for key in list(self.objects.keys(f"{prefix}/")):
            if not key.startswith(f"{prefix}/{checkpoint.name}/"):
                self.objects.delete_prefix(key)
        logger.info("job %s: checkpoint %s uploaded (%d files)", job_id, checkpoint.name, count)

    def discard_checkpoints(self, job_id: str) -> None:
        shutil.rmtree(self.job_paths(job_id).checkpoints, ignore_errors=True)
        self.objects.delete_prefix(f"jobs/{job_id}/")
        self._uploaded.pop(job_id, None)
