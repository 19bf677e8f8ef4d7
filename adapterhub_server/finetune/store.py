"""Persistent state of fine-tuning: uploaded files, jobs and their events.

Layout under the jobs directory:

    jobs.sqlite3 (+ -wal, -shm)     index of files, jobs and events (SQLite, WAL mode)
    files/<file id>.jsonl           uploaded training files, each validated before it lands
    files/.upload-<token>           an upload being written (renamed into place when valid)
    jobs/<job id>/config.json       the trainer's `--config`
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
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_server.errors import ConflictError, InvalidRequestError, NotFoundError
from adapterhub_server.finetune.records import (
    ACTIVE_STATUSES,
    CANCELLED,
    QUEUED,
    RUNNING,
    TERMINAL_STATUSES,
    EventRecord,
    FileRecord,
    JobError,
    JobRecord,
    make_event,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "jobs.sqlite3"
FILES_DIR = "files"
JOBS_DIR = "jobs"
RUNNER_LOCK = "runner.lock"
_UPLOAD_PREFIX = ".upload-"
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
    attempts INTEGER NOT NULL DEFAULT 0
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
SCHEMA_VERSION = 1
"""`PRAGMA user_version` of an index at the current layout. 0: before the files' `records`
and `estimated_tokens` columns (added by `_migrate`)."""
_ADDED_COLUMNS = {1: (("files", "records", "INTEGER"), ("files", "estimated_tokens", "INTEGER"))}
"""Columns each schema version added to tables that existed before it."""


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def log(self) -> Path:
        return self.dir / "trainer.log"


class FineTuneStore:
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
        with self._lock:
            conn = self._connection()
            conn.execute(begin)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: a read-check-write (claim, cancel,
        # delete-if-unused) cannot interleave with another writer.
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("BEGIN")

    # -- files --------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def staging_path(self) -> Path:
        """A fresh path in the files directory to write an upload to before validating it."""
        return self.files_dir / f"{_UPLOAD_PREFIX}{secrets.token_hex(8)}"

    def add_file(self, record: FileRecord, staged: Path) -> FileRecord:
        """Move the validated `staged` upload into place and index it (atomic rename)."""
        final = self.file_path(record.id)
        os.replace(staged, final)
        _fsync_dir(self.files_dir)
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO files (id, filename, bytes, created_at, purpose, records,"
                    " estimated_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.filename,
                        record.bytes,
                        record.created_at,
                        record.purpose,
                        record.records,
                        record.estimated_tokens,
                    ),
                )
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return record

    def set_file_stats(self, file_id: str, records: int, estimated_tokens: int) -> None:
        """Store the statistics of a file uploaded before they were kept."""
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET records = ?, estimated_tokens = ? WHERE id = ?",
                (records, estimated_tokens, file_id),
            )

    def get_file(self, file_id: str) -> FileRecord:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no such file: {file_id!r}", param="file_id")
        return _file(row)

    def list_files(self) -> list[FileRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM files ORDER BY seq DESC").fetchall()
        return [_file(row) for row in rows]

    def delete_file(self, file_id: str) -> FileRecord:
        """Remove a file; ConflictError while a queued or running job still needs it."""
        with self._write() as conn:
            row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no such file: {file_id!r}", param="file_id")
            marks = ",".join("?" * len(ACTIVE_STATUSES))
            users = conn.execute(
                f"SELECT id FROM jobs WHERE status IN ({marks})"
                " AND (training_file = ? OR validation_file = ?) ORDER BY seq",
                (*sorted(ACTIVE_STATUSES), file_id, file_id),
            ).fetchall()
            if users:
                raise ConflictError(
                    f"file {file_id} is used by fine-tuning job(s) "
                    f"{', '.join(r['id'] for r in users)} that have not finished; cancel them "
                    "or wait for them to finish",
                    param="file_id",
                )
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        # After the commit: a crash in between leaves an unindexed file, which is swept.
        self.file_path(file_id).unlink(missing_ok=True)
        return _file(row)

    def _sweep_files(self) -> None:
        """Remove staged uploads and unindexed files that a crashed writer left behind."""
        with self._read() as conn:
            known = {row["id"] for row in conn.execute("SELECT id FROM files")}
        cutoff = time.time() - _STALE_UPLOAD_S
        for path in self.files_dir.iterdir():
            stale = path.name.startswith(_UPLOAD_PREFIX) or (
                path.suffix == ".jsonl" and path.stem not in known
            )
            with contextlib.suppress(OSError):
                if stale and path.stat().st_mtime < cutoff:
                    path.unlink()
                    logger.info("removed leftover upload %s", path)

    # -- jobs ---------------------------------------------------------------------------

    def job_paths(self, job_id: str) -> JobPaths:
        return JobPaths(self.jobs_dir / job_id)

    def add_job(self, job: JobRecord, *events: EventRecord) -> JobRecord:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO jobs (id, created_at, status, model, suffix, training_file,"
                " validation_file, seed, hyperparameters) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.created_at,
                    job.status,
                    job.model,
                    job.suffix,
                    job.training_file,
                    job.validation_file,
                    job.seed,
                    json.dumps(job.hyperparameters),
                ),
            )
            _insert_events(conn, events)
        return job

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as conn:
            return _get_job(conn, job_id)

    def list_jobs(
        self, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self._read() as conn:
            start = _cursor(conn, "jobs", after, "after")
            rows = conn.execute(
                "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (start, limit + 1)
            ).fetchall()
        return [_job(row) for row in rows[:limit]], len(rows) > limit

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        """Oldest first."""
        marks = ",".join("?" * len(statuses))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
        return [_job(row) for row in rows]

    def jobs_with_process(self) -> list[JobRecord]:
        """Jobs that recorded a trainer process and never saw it exit, oldest first."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE pid IS NOT NULL ORDER BY seq").fetchall()
        return [_job(row) for row in rows]

    def status(self, job_id: str) -> str:
        with self._read() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no such fine-tuning job: {job_id!r}", param="fine_tuning_job_id")
        return str(row["status"])

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
            return _get_job(conn, row["id"])

    def set_process(self, job_id: str, pid: int | None, pid_start: str | None) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET pid = ?, pid_start = ? WHERE id = ?", (pid, pid_start, job_id)
            )

    def transition(
        self,
        job_id: str,
        from_statuses: Iterable[str],
        to_status: str,
        *,
        error: JobError | None = None,
        message: str | None = None,
        level: str = "info",
    ) -> bool:
        """Compare-and-set the status; False (and nothing changed) if it was not in
        `from_statuses`. A terminal status sets `finished_at`; the trainer process is
        forgotten; `message` becomes an event in the same transaction."""
        sources = tuple(from_statuses)
        now = int(time.time())
        finished = now if to_status in TERMINAL_STATUSES else None
        marks = ",".join("?" * len(sources))
        with self._write() as conn:
            changed = conn.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?, error = ?, pid = NULL,"
                f" pid_start = NULL, estimated_finish = NULL WHERE id = ? AND status IN ({marks})",
                (
                    to_status,
                    finished,
                    json.dumps(error.to_dict()) if error else None,
                    job_id,
                    *sources,
                ),
            ).rowcount
            if changed and message is not None:
                _insert_events(conn, [make_event(job_id, message, created_at=now, level=level)])
        return bool(changed)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (the runner stops its trainer); idempotent.

        ConflictError for a job that already succeeded or failed.
        """
        now = int(time.time())
        with self._write() as conn:
            job = _get_job(conn, job_id)
            if job.status == CANCELLED:
                return job
            if job.status in TERMINAL_STATUSES:
                raise ConflictError(
                    f"fine-tuning job {job_id} already {job.status}; only queued or running "
                    "jobs can be cancelled",
                    param="fine_tuning_job_id",
                )
            conn.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, estimated_finish = NULL WHERE id = ?",
                (CANCELLED, now, job_id),
            )
            _insert_events(conn, [make_event(job_id, "Job cancelled", created_at=now)])
            return _get_job(conn, job_id)

    def record_progress(
        self,
        job_id: str,
        events: Sequence[EventRecord],
        *,
        events_offset: int | None = None,
        fine_tuned_model: str | None = None,
        trained_tokens: int | None = None,
        estimated_finish: int | None = None,
    ) -> None:
        """Append events and update what they tell (fields left None are kept), at once.

        Events and the file offset they were read up to commit together, so a restart
        neither loses nor repeats trainer events.
        """
        updates = {
            "events_offset": events_offset,
            "fine_tuned_model": fine_tuned_model,
            "trained_tokens": trained_tokens,
            "estimated_finish": estimated_finish,
        }
        updates = {k: v for k, v in updates.items() if v is not None}
        with self._write() as conn:
            _insert_events(conn, events)
            if updates:
                assignments = ", ".join(f"{name} = ?" for name in updates)
                conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?", (*updates.values(), job_id)
                )

    def add_event(self, job_id: str, message: str, *, level: str = "info") -> None:
        self.record_progress(
            job_id, [make_event(job_id, message, created_at=int(time.time()), level=level)]
        )

    def list_events(
        self, job_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list[EventRecord], bool]:
        """Newest first; `after` is the id of the last event of the previous page."""
        with self._read() as conn:
            _get_job(conn, job_id)
            start = _cursor(conn, "events", after, "after", job_id=job_id)
            rows = conn.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, start, limit + 1),
            ).fetchall()
        return [_event(row) for row in rows[:limit]], len(rows) > limit


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cursor(
    conn: sqlite3.Connection, table: str, after: str | None, param: str, job_id: str | None = None
) -> int:
    """The `seq` to page below: that of the `after` row, or past the newest row."""
    if after is None:
        return 2**62
    query = f"SELECT seq FROM {table} WHERE id = ?"
    args: tuple[Any, ...] = (after,)
    if job_id is not None:
        query += " AND job_id = ?"
        args += (job_id,)
    row = conn.execute(query, args).fetchone()
    if row is None:
        raise InvalidRequestError(f"{param}: no such id {after!r} in this list", param=param)
    return int(row["seq"])


def _insert_events(conn: sqlite3.Connection, events: Iterable[EventRecord]) -> None:
    conn.executemany(
        "INSERT INTO events (id, job_id, created_at, level, message, type, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.id,
                e.job_id,
                e.created_at,
                e.level,
                e.message,
                e.type,
                None if e.data is None else json.dumps(e.data, default=str),
            )
            for e in events
        ],
    )


def _get_job(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no such fine-tuning job: {job_id!r}", param="fine_tuning_job_id")
    return _job(row)


def _file(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        id=row["id"],
        filename=row["filename"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        purpose=row["purpose"],
        records=row["records"],
        estimated_tokens=row["estimated_tokens"],
    )


def _job(row: sqlite3.Row) -> JobRecord:
    error = json.loads(row["error"]) if row["error"] else None
    return JobRecord(
        id=row["id"],
        created_at=row["created_at"],
        status=row["status"],
        model=row["model"],
        suffix=row["suffix"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        seed=row["seed"],
        hyperparameters=json.loads(row["hyperparameters"]),
        finished_at=row["finished_at"],
        fine_tuned_model=row["fine_tuned_model"],
        trained_tokens=row["trained_tokens"],
        error=JobError(**error) if error else None,
        estimated_finish=row["estimated_finish"],
        events_offset=row["events_offset"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        attempts=row["attempts"],
    )


def _event(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        id=row["id"],
        job_id=row["job_id"],
        created_at=row["created_at"],
        level=row["level"],
        message=row["message"],
        type=row["type"],
        data=json.loads(row["data"]) if row["data"] else None,
    )
