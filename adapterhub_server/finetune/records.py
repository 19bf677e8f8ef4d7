"""What the fine-tuning store keeps: uploaded files, jobs and their events, as plain records."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

ACTIVE_STATUSES = frozenset({"validating_files", QUEUED, RUNNING})
"""A job in one of these still needs its files and may still change."""
TERMINAL_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})
"""Final: a job never leaves these."""


def new_id(prefix: str) -> str:
    """`<prefix>-<24 hex>`, OpenAI's id style (`file-...`, `ftjob-...`, `ftevent-...`)."""
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRecord:
    """An uploaded, validated training file."""

    id: str
    """`file-<hex>`; the stored file is `<jobs_dir>/files/<id>.jsonl`."""
    filename: str
    """The client's file name, kept as metadata only."""
    bytes: int
    created_at: int
    """Unix seconds."""
    purpose: str = "fine-tune"
    records: int | None = None
    """Training records (non-blank lines), counted at upload; None for a file uploaded
    before counts were kept (counted when a job first uses it)."""
    estimated_tokens: int | None = None
    """Tokens the records should tokenize to (`trainer.data.estimate_tokens`), summed at
    upload; None as for `records`."""


@dataclass(frozen=True)
class JobError:
    """Why a job failed: OpenAI's `{"code", "message", "param"}`."""

    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass(frozen=True)
class JobRecord:
    """One fine-tuning job as stored. The trainer's own settings are in the job's config file."""

    id: str
    """`ftjob-<hex>`; the job's files live in `<jobs_dir>/jobs/<id>/`."""
    created_at: int
    status: str
    model: str
    """The served base model id."""
    suffix: str
    """Adapter name the result is published under."""
    training_file: str
    validation_file: str | None
    seed: int
    hyperparameters: dict[str, Any]
    """The resolved wire hyperparameters (`FineTuningJobHyperparameters` as a dict)."""
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    """Registry reference `suffix@version`, once the trainer published it."""
    trained_tokens: int | None = None
    error: JobError | None = None
    estimated_finish: int | None = None
    events_offset: int = 0
    """Bytes of the trainer's events file already copied into the event table."""
    pid: int | None = None
    """Process (and process group) id of the trainer while the job runs."""
    pid_start: str | None = None
    """The trainer process's start time as the kernel reports it, so that a reused pid is
    never mistaken for the trainer after a restart."""
    attempts: int = 0
    """How many times a trainer was started for this job (more than one after a resume)."""
    worker: str | None = None
    """The worker holding the job's lease (shared registries only; see `shared_store`)."""


@dataclass(frozen=True)
class EventRecord:
    """One entry of a job's event log."""

    id: str
    job_id: str
    created_at: int
    level: str
    """`info`, `warn` or `error`."""
    message: str
    type: str = "message"
    """`message` or `metrics`."""
    data: dict[str, Any] | None = field(default=None)


def make_event(
    job_id: str,
    message: str,
    *,
    created_at: int,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> EventRecord:
    """A new event with a fresh id."""
    return EventRecord(
        id=new_id("ftevent"),
        job_id=job_id,
        created_at=created_at,
        level=level,
        message=message,
        type=type,
        data=data,
    )
