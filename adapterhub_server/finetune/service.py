"""What the `/v1/files` and `/v1/fine_tuning/jobs` routes call, free of HTTP types.

Blocking work (copying and validating an upload, SQLite, fsync) runs in a worker thread so
the event loop keeps streaming tokens; training itself runs in a trainer subprocess started
by the `JobRunner`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import BinaryIO

import anyio

from adapterhub_server.errors import AdapterHubError, InvalidRequestError, NotFoundError
from adapterhub_server.finetune.hyperparameters import plan_training
from adapterhub_server.finetune.job_tables import JobTables
from adapterhub_server.finetune.limits import MAX_SEED, BaseModelInfo, FineTuningLimits
from adapterhub_server.finetune.process import redact_paths
from adapterhub_server.finetune.records import (
    QUEUED,
    EventRecord,
    FileRecord,
    JobRecord,
    make_event,
    new_id,
)
from adapterhub_server.finetune.runner import JobRunner, RunnerConfig
from adapterhub_server.finetune.store import FineTuneStore
from adapterhub_server.lora.adapter import validate_adapter_name
from client.types import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCreateRequest,
    FineTuningJobError,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobHyperparameters,
    FineTuningJobList,
    FineTuningJobMethod,
    FineTuningJobSupervised,
)
from trainer import DataError, JsonlStats, scan_jsonl

PURPOSE = "fine-tune"
DEFAULT_NAME_PREFIX = "ft-"
"""A job without `suffix` publishes under this plus 8 characters of its id."""
_COPY_CHUNK = 1 << 20
_MAX_FILENAME = 255


class FineTuningService:
    """Files and fine-tuning jobs over one store (`FineTuneStore` beside a directory
    registry, `SharedFineTuneStore` on a shared one), run by one `JobRunner`."""

    def __init__(
        self,
        store: JobTables,
        runner: JobRunner,
        *,
        base: BaseModelInfo,
        registry: Path | None,
        limits: FineTuningLimits | None = None,
        runs_jobs: bool = True,
    ) -> None:
        """`registry`: the directory jobs publish into; None for a shared registry, which
        the trainer finds in its environment (`ADAPTERHUB_REGISTRY`, so the database
        password is never written into a job's config)."""
        self.store = store
        self.runner = runner
        self.base = base
        self.registry = registry
        self.limits = limits or FineTuningLimits()
        self.runs_jobs = runs_jobs
        """Whether this process trains (False: a cluster replica that is not a worker)."""

    @classmethod
    def open(
        cls,
        jobs_dir: Path,
        *,
        base: BaseModelInfo,
        registry: Path,
        runner: RunnerConfig | None = None,
        limits: FineTuningLimits | None = None,
    ) -> FineTuningService:
        """Open (creating if needed) the jobs directory; the runner is not started yet."""
        store = FineTuneStore(jobs_dir)
        return cls(store, JobRunner(store, runner), base=base, registry=registry, limits=limits)

    def start(self) -> bool:
        """Start running jobs (see `JobRunner.start`); False when this process runs none."""
        return self.runs_jobs and self.runner.start()

    def stop(self) -> None:
        """Stop the runner; running jobs are requeued to resume on the next start."""
        self.runner.stop()
        self.store.close()

    # -- files --------------------------------------------------------------------------

    async def upload_file(self, *, filename: str, data: BinaryIO, purpose: str) -> FileObject:
        """Store a JSONL training file after checking every line; nothing is kept if one is bad.

        The upload is copied to disk and checked one line at a time, so memory stays bounded
        whatever its size; its record count and token estimate are stored with it for job
        creation. A bad line is a 400 (`invalid_value`) naming the line.
        """
        if purpose != PURPOSE:
            raise InvalidRequestError(
                f"purpose must be {PURPOSE!r} (the only files this server stores are training "
                f"data), got {purpose!r}",
                param="purpose",
            )
        record = await anyio.to_thread.run_sync(lambda: self._store_upload(filename, data))
        return _file(record)

    def _store_upload(self, filename: str, data: BinaryIO) -> FileRecord:
        name = _clean_filename(filename)
        staged = self.store.staging_path()
        try:
            with open(staged, "wb") as out:
                shutil.copyfileobj(data, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            try:
                # Messages name the file as the client named it, never by our path.
                stats = scan_jsonl(staged, name=name)
            except DataError as exc:
                raise DataError(exc.message, param="file") from None
            record = FileRecord(
                id=new_id("file"),
                filename=name,
                bytes=staged.stat().st_size,
                created_at=int(time.time()),
                purpose=PURPOSE,
                records=stats.records,
                estimated_tokens=stats.estimated_tokens,
            )
            return self.store.add_file(record, staged)
        finally:
            staged.unlink(missing_ok=True)

    async def list_files(self) -> FileList:
        records = await anyio.to_thread.run_sync(self.store.list_files)
        return FileList(data=[_file(r) for r in records])

    async def get_file(self, file_id: str) -> FileObject:
        return _file(await anyio.to_thread.run_sync(lambda: self.store.get_file(file_id)))

    async def file_content(self, file_id: str) -> Path:
        """The stored file's path (the route streams it)."""
        record = await anyio.to_thread.run_sync(lambda: self.store.get_file(file_id))
        return await anyio.to_thread.run_sync(lambda: self.store.local_file(record.id))

    async def delete_file(self, file_id: str) -> FileDeleted:
        record = await anyio.to_thread.run_sync(lambda: self.store.delete_file(file_id))
        return FileDeleted(id=record.id)

    # -- jobs ---------------------------------------------------------------------------

    async def create_job(self, request: FineTuningJobCreateRequest) -> FineTuningJob:
        """Validate everything the trainer would, then queue the job."""
        job = await anyio.to_thread.run_sync(lambda: self._create_job(request))
        self.runner.wake()
        return job_to_wire(job)

    def _create_job(self, request: FineTuningJobCreateRequest) -> JobRecord:
        if request.model != self.base.model_id:
            raise InvalidRequestError(
                f"model must be this server's base model {self.base.model_id!r}, got "
                f"{request.model!r}: jobs train adapters for the model the server runs",
                param="model",
            )
        if request.suffix is not None:
            try:
                validate_adapter_name(request.suffix)
            except AdapterHubError as exc:
                raise InvalidRequestError(
                    f"suffix (the adapter name to publish under): {exc.message}", param="suffix"
                ) from None
        if request.seed is not None and request.seed > MAX_SEED:
            raise InvalidRequestError(
                f"seed: must be at most {MAX_SEED}, got {request.seed}", param="seed"
            )
        training = self._usable_file(request.training_file, "training_file")
        validation = (
            self._usable_file(request.validation_file, "validation_file")
            if request.validation_file
            else None
        )
        job_id = new_id("ftjob")
        name = request.suffix or default_adapter_name(job_id)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        plan = plan_training(
            request,
            name=name,
            data=self.store.file_path(training.id),
            train_stats=self._file_stats(training, "training_file"),
            eval_data=self.store.file_path(validation.id) if validation else None,
            eval_stats=self._file_stats(validation, "validation_file") if validation else None,
            base=self.base,
            limits=self.limits,
            registry=self.registry,
            seed=seed,
            description=f"fine-tuning job {job_id} on {training.filename} ({training.id})",
            output_dir=self.store.job_paths(job_id).dir / "output",
        )
        now = int(time.time())
        job = JobRecord(
            id=job_id,
            created_at=now,
            status=QUEUED,
            model=self.base.model_id,
            suffix=name,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            seed=seed,
            hyperparameters=plan.hyperparameters.model_dump(mode="json"),
        )
        self.store.add_job(
            job,
            plan.config,
            make_event(job_id, f"Created fine-tuning job: {job_id}", created_at=now),
        )
        return job

    def _usable_file(self, file_id: str, param: str) -> FileRecord:
        try:
            return self.store.get_file(file_id)
        except NotFoundError:
            raise InvalidRequestError(
                f"{param}: no uploaded file {file_id!r}; upload it with POST /v1/files first",
                param=param,
            ) from None

    def _file_stats(self, record: FileRecord, param: str) -> JsonlStats:
        """The statistics stored at upload; a file uploaded before they were kept is scanned
        once (line by line, in this worker thread) and its statistics are stored."""
        if record.records is not None and record.estimated_tokens is not None:
            return JsonlStats(records=record.records, estimated_tokens=record.estimated_tokens)
        try:
            stats = scan_jsonl(self.store.file_path(record.id), name=record.id)
        except DataError as exc:
            raise DataError(redact_paths(exc.message), param=param) from None
        self.store.set_file_stats(record.id, stats.records, stats.estimated_tokens)
        return stats

    async def list_jobs(self, *, after: str | None, limit: int) -> FineTuningJobList:
        jobs, more = await anyio.to_thread.run_sync(
            lambda: self.store.list_jobs(after=after, limit=limit)
        )
        return FineTuningJobList(data=[job_to_wire(j) for j in jobs], has_more=more)

    async def get_job(self, job_id: str) -> FineTuningJob:
        return job_to_wire(await anyio.to_thread.run_sync(lambda: self.store.get_job(job_id)))

    async def list_events(
        self, job_id: str, *, after: str | None, limit: int
    ) -> FineTuningJobEventList:
        events, more = await anyio.to_thread.run_sync(
            lambda: self.store.list_events(job_id, after=after, limit=limit)
        )
        return FineTuningJobEventList(data=[_event(e) for e in events], has_more=more)

    async def cancel_job(self, job_id: str) -> FineTuningJob:
        """Cancel a queued or running job; the runner SIGTERMs a running trainer at once.

        Idempotent for a cancelled job; ConflictError (409) for one that already succeeded
        or failed.
        """
        job = await anyio.to_thread.run_sync(lambda: self.store.cancel(job_id))
        self.runner.wake()
        return job_to_wire(job)


def default_adapter_name(job_id: str) -> str:
    """`ft-` and the first 8 characters of the job id after its `ftjob-` prefix (its random
    part): the adapter name of a job created without `suffix`, as OpenAI names such models
    by the job."""
    return DEFAULT_NAME_PREFIX + job_id.removeprefix("ftjob-")[:8]


def job_to_wire(job: JobRecord) -> FineTuningJob:
    hyperparameters = FineTuningJobHyperparameters.model_validate(job.hyperparameters)
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        status=job.status,  # type: ignore[arg-type]
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=hyperparameters,
        method=FineTuningJobMethod(
            supervised=FineTuningJobSupervised(hyperparameters=hyperparameters)
        ),
        seed=job.seed,
        trained_tokens=job.trained_tokens,
        error=FineTuningJobError(**job.error.to_dict()) if job.error else None,
        estimated_finish=job.estimated_finish,
        suffix=job.suffix,
    )


def _file(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
    )


def _event(event: EventRecord) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=event.id,
        created_at=event.created_at,
        level=event.level,  # type: ignore[arg-type]
        message=event.message,
        type=event.type,  # type: ignore[arg-type]
        data=event.data,
    )


def _clean_filename(filename: str) -> str:
    """The base name only (it is metadata, never a path), at most 255 characters."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:_MAX_FILENAME] or "upload.jsonl"
