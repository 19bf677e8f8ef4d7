"""The rows of fine-tuning: uploaded files, jobs and their events, in SQL that SQLite and
PostgreSQL both run.

`JobTables` holds every query; a backend supplies the connection (`_write` / `_read`,
context managers yielding something with `execute` and `executemany` that take `?`
placeholders) and what lives outside the tables: the bytes of uploaded files, the trainer's
config and checkpoints (`store.py`: one directory; `shared_store.py`: a PostgreSQL index and
an object store). Status changes are compare-and-set (`transition`), so several threads and
processes may share one backend.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_server.errors import ConflictError, InvalidRequestError, NotFoundError
from adapterhub_server.finetune.records import (
    ACTIVE_STATUSES,
    CANCELLED,
    TERMINAL_STATUSES,
    EventRecord,
    FileRecord,
    JobError,
    JobRecord,
    make_event,
)


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live on the machine that trains it."""

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


class JobTables:
    """Files, jobs and events as rows (see the module docstring)."""

    exclusive_runner = True
    """Whether one process runs every job (a file lock decides, and it settles what a crash
    left at start); False where workers hold leases instead."""

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction that no other writer interleaves with."""
        raise NotImplementedError

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _owned(self) -> tuple[str, tuple[Any, ...]]:
        """SQL (and its arguments) appended to updates of a running job, so that a worker
        that lost a job's lease cannot change it; nothing with one runner."""
        return "", ()

    def _keep_file_bytes(self, file_id: str, staged: Path) -> None:
        """Move a validated upload's bytes to where the file lives (before its row)."""
        raise NotImplementedError

    def _remove_file_bytes(self, file_id: str) -> None:
        """Delete an uploaded file's bytes (after its row is gone)."""
        raise NotImplementedError

    # -- what a backend provides besides its connection -----------------------------------

    def staging_path(self) -> Path:
        """A fresh local path to write an upload to before it is validated."""
        raise NotImplementedError

    def file_path(self, file_id: str) -> Path:
        """Where an uploaded file is (or will be, once `local_file` fetched it) locally."""
        raise NotImplementedError

    def local_file(self, file_id: str) -> Path:
        """An uploaded file's bytes on this machine (fetched if they live elsewhere)."""
        raise NotImplementedError

    def job_paths(self, job_id: str) -> JobPaths:
        raise NotImplementedError

    def claim_next(self) -> JobRecord | None:
        """Move the oldest job this runner may take to `running` and return it."""
        raise NotImplementedError

    def prepare(self, job_id: str) -> JobPaths:
        """The claimed job's directory, holding its trainer config and the checkpoint to
        resume from, if any."""
        raise NotImplementedError

    def checkpoint_saved(self, job_id: str, checkpoint: Path) -> None:
        """The trainer completed `checkpoint`: keep it where the next trainer of the job
        (on whatever machine) finds it."""
        raise NotImplementedError

    def renew_leases(self, job_ids: Iterable[str]) -> set[str]:
        """Extend this runner's hold on `job_ids`; the ids it no longer holds."""
        raise NotImplementedError

    def discard_checkpoints(self, job_id: str) -> None:
        """Delete a cancelled job's checkpoints (nothing can resume it)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- files --------------------------------------------------------------------------

    def add_file(self, record: FileRecord, staged: Path) -> FileRecord:
        """Keep the validated `staged` upload's bytes, then index it; a failure keeps
        neither."""
        self._keep_file_bytes(record.id, staged)
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
            self._remove_file_bytes(record.id)
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
            raise _no_file(file_id)
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
                raise _no_file(file_id)
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
        # After the commit: a crash in between leaves bytes no row names (swept later).
        self._remove_file_bytes(file_id)
        return _file(row)

    def add_job(self, job: JobRecord, config: Mapping[str, Any], *events: EventRecord) -> JobRecord:
        """Queue `job` with the trainer's `config` (written out where it trains, `prepare`)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO jobs (id, created_at, status, model, suffix, training_file,"
                " validation_file, seed, hyperparameters, config)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    json.dumps(config, default=str),
                ),
            )
            insert_events(conn, events)
        return job

    def job_config(self, job_id: str) -> dict[str, Any] | None:
        """The trainer config stored with the job; None for a job queued before configs
        were stored (its `config.json` is already in its directory)."""
        with self._read() as conn:
            row = conn.execute("SELECT config FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise _no_job(job_id)
        return json.loads(row["config"]) if row["config"] else None

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as conn:
            return get_job_row(conn, job_id)

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
            raise _no_job(job_id)
        return str(row["status"])

    def set_process(self, job_id: str, pid: int | None, pid_start: str | None) -> None:
        owned, owner = self._owned()
        with self._write() as conn:
            conn.execute(
                f"UPDATE jobs SET pid = ?, pid_start = ? WHERE id = ?{owned}",
                (pid, pid_start, job_id, *owner),
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
        owned, owner = self._owned()
        with self._write() as conn:
            changed = conn.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?, error = ?, pid = NULL,"
                f" pid_start = NULL, estimated_finish = NULL WHERE id = ? AND status IN ({marks})"
                f"{owned}",
                (
                    to_status,
                    finished,
                    json.dumps(error.to_dict()) if error else None,
                    job_id,
                    *sources,
                    *owner,
                ),
            ).rowcount
            if changed and message is not None:
                insert_events(conn, [make_event(job_id, message, created_at=now, level=level)])
        return bool(changed)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (the runner stops its trainer); idempotent.

        ConflictError for a job that already succeeded or failed.
        """
        now = int(time.time())
        with self._write() as conn:
            job = get_job_row(conn, job_id)
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
            insert_events(conn, [make_event(job_id, "Job cancelled", created_at=now)])
            return get_job_row(conn, job_id)

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
        owned, owner = self._owned()
        with self._write() as conn:
            insert_events(conn, events)
            if updates:
                assignments = ", ".join(f"{name} = ?" for name in updates)
                conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?{owned}",
                    (*updates.values(), job_id, *owner),
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
            get_job_row(conn, job_id)
            start = _cursor(conn, "events", after, "after", job_id=job_id)
            rows = conn.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, start, limit + 1),
            ).fetchall()
        return [_event(row) for row in rows[:limit]], len(rows) > limit


def _cursor(conn: Any, table: str, after: str | None, param: str, job_id: str | None = None) -> int:
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


def insert_events(conn: Any, events: Iterable[EventRecord]) -> None:
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


def get_job_row(conn: Any, job_id: str) -> JobRecord:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise _no_job(job_id)
    return _job(row)


def _file(row: Any) -> FileRecord:
    return FileRecord(
        id=row["id"],
        filename=row["filename"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        purpose=row["purpose"],
        records=row["records"],
        estimated_tokens=row["estimated_tokens"],
    )


def _job(row: Any) -> JobRecord:
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
        # sqlite3.Row tests `in` against values, not keys.
        worker=row["worker"] if "worker" in row.keys() else None,  # noqa: SIM118
    )


def _event(row: Any) -> EventRecord:
    return EventRecord(
        id=row["id"],
        job_id=row["job_id"],
        created_at=row["created_at"],
        level=row["level"],
        message=row["message"],
        type=row["type"],
        data=json.loads(row["data"]) if row["data"] else None,
    )


def _no_job(job_id: str) -> NotFoundError:
    return NotFoundError(f"no such fine-tuning job: {job_id!r}", param="fine_tuning_job_id")


def _no_file(file_id: str) -> NotFoundError:
    return NotFoundError(f"no such file: {file_id!r}", param="file_id")
