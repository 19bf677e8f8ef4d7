"""Persistent state of fine-tuning: uploaded files, jobs and their events.

Layout under the jobs directory:

    jobs.sqlite3 (+ -wal, -shm)     index of files, jobs and events (SQLite, WAL mode)
    files/<file id>.jsonl           uploaded training files, each validated before it lands
    files/.upload-<token>           an upload being written (renamed into place when valid)
    jobs/<job id>/config.json       the trainer's `--config` (from the job's row, at launch)
    jobs/<job id>/events.jsonl      the trainer's `--events`, tailed into the event table
    jobs/<job id>/checkpoints/      the trainer's `--checkpoint-dir` (what `--resume` uses)
    jobs/<job id>/trainer.log       the trainer's stdout and stderr
    runner.lock                     held (flock) by the one process that runs the jobs

Every state change is one `BEGIN IMMEDIATE` transaction, so several threads and processes may
use one directory: status changes are compare-and-set (`transition`), and a queued job is
claimed by exactly one runner (`claim_next`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from adapterhub_server.finetune.job_tables import JobPaths, JobTables, get_job_row
from adapterhub_server.finetune.records import QUEUED, RUNNING, JobRecord
from adapterhub_server.registry.local import fsync_dir, sqlite_transaction

__all__ = ["FineTuneStore", "JobPaths"]

logger = logging.getLogger(__name__)

INDEX_FILE = "jobs.sqlite3"
FILES_DIR = "files"
JOBS_DIR = "jobs"
RUNNER_LOCK = "runner.lock"
UPLOAD_PREFIX = ".upload-"
_STALE_UPLOAD_S = 3600.0
"""Staged uploads and unindexed files older than this are leftovers of a crash."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    records INTEGER,
    estimated_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    suffix TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL,
    finished_at INTEGER,
    fine_tuned_model TEXT,
    trained_tokens INTEGER,
    error TEXT,
    estimated_finish INTEGER,
    events_offset INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    config TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""
SCHEMA_VERSION = 2
"""`PRAGMA user_version` of an index at the current layout. 0: before the files' `records`
and `estimated_tokens` columns; 1: before the jobs' `config` (both added by `_migrate`)."""
_ADDED_COLUMNS = {
    1: (("files", "records", "INTEGER"), ("files", "estimated_tokens", "INTEGER")),
    2: (("jobs", "config", "TEXT"),),
}
"""Columns each schema version added to tables that existed before it."""


class FineTuneStore(JobTables):
    """Files, jobs and events in one directory (see the module docstring).

    Thread-safe: one connection guarded by a lock, reopened after `fork`. Process-safe through
    SQLite's locking (WAL: readers never wait for the writer).
    """

    def __init__(self, root: str | os.PathLike[str], *, busy_timeout_s: float = 30.0) -> None:
        self.root = Path(root).expanduser()
        self.files_dir = self.root / FILES_DIR
        self.jobs_dir = self.root / JOBS_DIR
        for directory in (self.root, self.files_dir, self.jobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self._write() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            _migrate(conn)
        self._sweep_files()

    @property
    def runner_lock_path(self) -> Path:
        return self.root / RUNNER_LOCK

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                self.root / INDEX_FILE,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # explicit BEGIN/COMMIT
                check_same_thread=False,  # guarded by self._lock
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock, sqlite_transaction(self._connection(), begin) as conn:
            yield conn

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: a read-check-write (claim, cancel,
        # delete-if-unused) cannot interleave with another writer.
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("BEGIN")

    # -- files --------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def local_file(self, file_id: str) -> Path:
        """The uploaded file's bytes on this machine."""
        return self.file_path(file_id)

    def staging_path(self) -> Path:
        """A fresh path in the files directory to write an upload to before validating it."""
        return self.files_dir / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"

    def _keep_file_bytes(self, file_id: str, staged: Path) -> None:
        os.replace(staged, self.file_path(file_id))
        fsync_dir(self.files_dir)

    def _remove_file_bytes(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def _sweep_files(self) -> None:
        """Remove staged uploads and unindexed files that a crashed writer left behind."""
        with self._read() as conn:
            known = {row["id"] for row in conn.execute("SELECT id FROM files")}
        sweep_uploads(self.files_dir, known)

    # -- jobs ---------------------------------------------------------------------------

    def job_paths(self, job_id: str) -> JobPaths:
        return JobPaths(self.jobs_dir / job_id)

    def claim_next(self) -> JobRecord | None:
        """Move the oldest queued job to `running` and return it; None when none is queued."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, estimated_finish = NULL"
                " WHERE id = ?",
                (RUNNING, row["id"]),
            )
            return get_job_row(conn, row["id"])

    def prepare(self, job_id: str) -> JobPaths:
        """The job's directory with its trainer config written out, ready to train in."""
        paths = self.job_paths(job_id)
        config = self.job_config(job_id)
        paths.dir.mkdir(parents=True, exist_ok=True)
        if config is not None:  # else: a job queued before configs were stored has its file
            write_json_atomic(paths.config, config)
        return paths

    def checkpoint_saved(self, job_id: str, checkpoint: Path) -> None:
        """Nothing to do: the next trainer of the job resumes from this directory."""

    def renew_leases(self, job_ids: Iterable[str]) -> set[str]:
        """No leases with one runner: no job is ever lost."""
        return set()

    def discard_checkpoints(self, job_id: str) -> None:
        shutil.rmtree(self.job_paths(job_id).checkpoints, ignore_errors=True)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index written by an older version to `SCHEMA_VERSION` (inside the opening
    write transaction, so concurrent openers migrate once). A newer index is left alone."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version >= SCHEMA_VERSION:
        return
    for added in range(version + 1, SCHEMA_VERSION + 1):
        for table, column, kind in _ADDED_COLUMNS.get(added, ()):
            present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:  # a fresh index has it from `SCHEMA` already
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def sweep_uploads(files_dir: Path, known: set[str]) -> None:
    """Remove staged uploads and files no row names that are older than `_STALE_UPLOAD_S`
    (a crashed writer's leftovers; a younger one may be an upload in flight)."""
    cutoff = time.time() - _STALE_UPLOAD_S
    for path in files_dir.iterdir():
        stale = path.name.startswith(UPLOAD_PREFIX) or (
            path.suffix == ".jsonl" and path.stem not in known
        )
        with contextlib.suppress(OSError):
            if stale and path.stat().st_mtime < cutoff:
                path.unlink()
                logger.info("removed leftover upload %s", path)


def write_json_atomic(path: Path, value: object) -> None:
    """Write `value` as JSON to `path` all at once (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(value, out, indent=2, default=str)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
