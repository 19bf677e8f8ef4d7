"""The job queue worker: runs queued jobs as `trainer train` subprocesses, one at a time.

A background thread (never the event loop) claims queued jobs, starts the trainer in its own
process group, copies the trainer's JSON-lines events into the job's event log, and sets the
final status from the events and the exit status. Training never runs in the server process:
a crash, an out-of-memory kill or a hung step of the trainer cannot take serving down.

Stopping the server SIGTERMs running trainers (they save a checkpoint and exit 130) and puts
their jobs back in the queue, to resume with `--resume`. After a crash, `start` finds jobs
still marked running: those with a complete checkpoint are queued again to resume, the others
fail with `server_restarted`. One process per jobs directory runs jobs (an flock decides);
any number may create, list and cancel them.

On a shared registry (`shared_store.py`) any number of workers run jobs: each claims a job
under a lease it renews every tick, hands every completed checkpoint to the store (which
uploads it), and stops a trainer whose lease another worker took over. A worker that dies
stops renewing; once its lease runs out the job resumes on another worker from its last
uploaded checkpoint.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_server.finetune.job_tables import JobPaths, JobTables
from adapterhub_server.finetune.process import (
    BAD_INPUT_EXIT,
    INTERRUPTED_EXIT,
    describe_exit,
    is_alive,
    log_tail,
    process_identity,
    redact_paths,
    signal_group,
    spawn,
    trainer_argv,
)
from adapterhub_server.finetune.records import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    EventRecord,
    JobError,
    make_event,
)
from trainer import latest_checkpoint, read_events

logger = logging.getLogger(__name__)

_SIGNALLED = frozenset({INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL})
"""Exit statuses of a trainer stopped by a signal (the trainer's own 130, or the raw signal)."""
_LEVELS = {"info": "info", "warning": "warn", "warn": "warn", "error": "error"}


@dataclass(frozen=True)
class RunnerConfig:
    """How jobs are run."""

    max_concurrent_jobs: int = 1
    """Trainers running at once. One by default: a second training run on the same
    accelerator mostly competes for memory and compute with the first (and with serving)."""
    trainer_command: tuple[str, ...] = (sys.executable, "-m", "trainer")
    """The trainer's command; `train --config ... --events ... --checkpoint-dir ...` is
    appended. Tests point it at a fake trainer."""
    poll_interval_s: float = 0.5
    """How often running trainers' events are read and queued jobs looked for (a new job or
    a cancel wakes the runner at once)."""
    stop_timeout_s: float = 60.0
    """How long a SIGTERMed trainer may take to save its checkpoint before SIGKILL."""
    trainer_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for the trainer."""

    def __post_init__(self) -> None:
        if self.max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be >= 1")
        if not self.trainer_command:
            raise ValueError("trainer_command must not be empty")
        if self.poll_interval_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("poll_interval_s and stop_timeout_s must be > 0")


@dataclass
class _Running:
    """A trainer this runner started and has not reaped yet."""

    job_id: str
    popen: subprocess.Popen
    paths: JobPaths
    offset: int
    """Bytes of the events file already recorded."""
    failure: str | None = None
    """The message of the trainer's `failed` event, if it sent one."""
    terminated_at: float | None = None
    """When SIGTERM was sent (monotonic seconds); SIGKILL follows after `stop_timeout_s`."""
    killed: bool = False
    checkpoint: Path | None = None
    """The newest complete checkpoint handed to `store.checkpoint_saved`."""
    lost: bool = False
    """Another worker took the job (this one's lease ran out): stop, record nothing."""


@dataclass(frozen=True)
class _Tail:
    """What reading a trainer's new events found."""

    offset: int
    failure: str | None
    succeeded: bool


class JobRunner:
    """Runs the jobs of one `JobTables` (see the module docstring)."""

    def __init__(self, store: JobTables, config: RunnerConfig | None = None) -> None:
        self.store = store
        self.config = config or RunnerConfig()
        self._active: dict[str, _Running] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> bool:
        """Recover from a previous run, then run jobs in a background thread.

        Returns False (and runs nothing) when another process already runs this directory's
        jobs; the jobs created here are queued for that process.
        """
        if self._thread is not None:
            return True
        if self.store.exclusive_runner and not self._lock_runner():
            return False
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="finetune-runner", daemon=True)
        self._thread.start()
        return True

    def _lock_runner(self) -> bool:
        """Become the one runner of a directory's jobs and settle what the last one left."""
        fd = os.open(self.store.runner_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            logger.warning(
                "another process runs the fine-tuning jobs in %s; jobs created here wait for it",
                self.store.root,
            )
            return False
        self._lock_fd = fd
        try:
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        return True

    def stop(self) -> None:
        """Stop running trainers (they checkpoint), requeue their jobs, end the thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._thread = None
        self._release_lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Look at the queue and at cancellations now rather than at the next poll."""
        self._wake.set()

    def trainer_pids(self) -> dict[str, int]:
        """Job id -> pid of each trainer running now."""
        return {job_id: run.popen.pid for job_id, run in list(self._active.items())}

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._tick()
            except Exception:
                # The thread must outlive a bad moment (a locked database, a full disk).
                logger.exception("fine-tuning runner: unexpected error; retrying")
            self._wake.wait(self.config.poll_interval_s)
        self._shutdown()

    def _tick(self) -> None:
        for job_id in self.store.renew_leases(list(self._active)):
            run = self._active[job_id]
            if not run.lost:
                logger.warning("job %s: lease lost to another worker; stopping its trainer", job_id)
                run.lost = True
                self._terminate(run)
        for run in list(self._active.values()):
            self._tail(run)
            returncode = run.popen.poll()
            if returncode is not None:
                self._reap(run, returncode)
            elif run.terminated_at is None and not run.lost:
                if self.store.status(run.job_id) == CANCELLED:
                    logger.info("job %s cancelled: stopping its trainer", run.job_id)
                    self._terminate(run)
            elif (
                not run.killed and time.monotonic() - run.terminated_at > self.config.stop_timeout_s
            ):
                logger.warning("job %s: trainer ignored SIGTERM; killing it", run.job_id)
                signal_group(run.popen.pid, signal.SIGKILL)
                run.killed = True
        while not self._stopping.is_set() and len(self._active) < self.config.max_concurrent_jobs:
            job = self.store.claim_next()
            if job is None:
                break
            self._launch(job.id, job.events_offset)

    def _launch(self, job_id: str, offset: int) -> None:
        paths = self.store.prepare(job_id)
        checkpoint = latest_checkpoint(paths.checkpoints)
        argv = trainer_argv(self.config.trainer_command, paths, resume=checkpoint is not None)
        try:
            popen = spawn(
                argv,
                paths,
                self.config.trainer_env,
                die_with_parent=not self.store.exclusive_runner,
            )
        except OSError as exc:
            error = JobError(
                "trainer_unavailable", redact_paths(f"cannot start the trainer {argv[0]}: {exc}")
            )
            self.store.transition(
                job_id, [RUNNING], FAILED, error=error, message=error.message, level="error"
            )
            return
        self.store.set_process(job_id, popen.pid, process_identity(popen.pid))
        self._active[job_id] = _Running(
            job_id=job_id, popen=popen, paths=paths, offset=offset, checkpoint=checkpoint
        )
        where = f"resuming from checkpoint {checkpoint.name}" if checkpoint else "from the start"
        self.store.add_event(job_id, f"Fine-tuning job started ({where}), trainer pid {popen.pid}")
        logger.info("job %s: started trainer pid %d (%s)", job_id, popen.pid, where)

    def _tail(self, run: _Running) -> None:
        tail = tail_events(self.store, run.job_id, run.paths, run.offset)
        run.offset = tail.offset
        run.failure = tail.failure or run.failure
        checkpoint = latest_checkpoint(run.paths.checkpoints)
        if checkpoint is not None and checkpoint != run.checkpoint and not run.lost:
            self.store.checkpoint_saved(run.job_id, checkpoint)
            run.checkpoint = checkpoint

    def _terminate(self, run: _Running) -> None:
        signal_group(run.popen.pid, signal.SIGTERM)
        run.terminated_at = time.monotonic()

    def _reap(self, run: _Running, returncode: int) -> None:
        """Record a trainer's exit; forget it only once that is stored (if storing fails,
        the next tick tries again: every step here is idempotent)."""
        self._settle(run, returncode)
        del self._active[run.job_id]

    def _settle(self, run: _Running, returncode: int) -> None:
        """The trainer's final events, then the job's status."""
        how = describe_exit(returncode)
        if run.lost:
            logger.info("job %s: trainer ended (%s) after its lease was lost", run.job_id, how)
            return
        self._tail(run)
        self.store.set_process(run.job_id, None, None)
        job = self.store.get_job(run.job_id)
        if job.status != RUNNING:  # cancelled meanwhile: the cancel already set the status
            logger.info("job %s (%s): trainer ended, %s", job.id, job.status, how)
            if job.status == CANCELLED:
                # Nothing can resume a cancelled job; a full-SFT checkpoint is a model's size.
                self.store.discard_checkpoints(run.job_id)
            return
        if self._stopping.is_set() and (returncode in _SIGNALLED or run.terminated_at):
            self._requeue(job.id, run.paths, "the server is shutting down")
            return
        if returncode == 0 and job.fine_tuned_model:
            self.store.transition(
                job.id,
                [RUNNING],
                SUCCEEDED,
                message=f"The job has successfully completed: {job.fine_tuned_model} is servable",
            )
            logger.info("job %s succeeded: %s", job.id, job.fine_tuned_model)
            return
        # What clients read never names the server's files (the trainer names its data,
        # config and checkpoints by path, and a traceback the installation's).
        detail = redact_paths(run.failure or log_tail(run.paths.log) or "no message")
        if returncode == 0:
            error = JobError("no_result", "the trainer finished without publishing an adapter")
        elif returncode == BAD_INPUT_EXIT:
            error = JobError("invalid_input", detail)
        elif returncode in _SIGNALLED:
            error = JobError(
                "trainer_interrupted",
                f"the trainer was stopped by a signal this server did not send ({how}): {detail}",
            )
        else:
            error = JobError("trainer_crashed", f"the trainer crashed ({how}): {detail}")
        self.store.transition(
            job.id,
            [RUNNING],
            FAILED,
            error=error,
            message=f"Job failed: {error.message}",
            level="error",
        )
        logger.warning("job %s failed (%s): %s", job.id, how, error.message)

    def _requeue(self, job_id: str, paths: JobPaths, why: str) -> None:
        checkpoint = latest_checkpoint(paths.checkpoints)
        where = (
            f"from checkpoint {checkpoint.name}"
            if checkpoint
            else "from the start (no checkpoint was saved)"
        )
        self.store.transition(
            job_id,
            [RUNNING],
            QUEUED,
            message=f"Job interrupted: {why}; it will resume {where} when "
            + ("the server runs again" if self.store.exclusive_runner else "a worker claims it"),
        )
        logger.info("job %s requeued (%s); resumes %s", job_id, why, where)

    def _shutdown(self) -> None:
        """Stop every trainer, give it time to checkpoint, and requeue its job."""
        for run in self._active.values():
            # A second SIGTERM tells the trainer to abort without its checkpoint: once only.
            if run.terminated_at is None:
                logger.info("stopping trainer of job %s (pid %d)", run.job_id, run.popen.pid)
                self._terminate(run)
        deadline = time.monotonic() + self.config.stop_timeout_s
        while self._active and time.monotonic() < deadline:
            for run in list(self._active.values()):
                returncode = run.popen.poll()
                try:
                    self._tail(run)
                    if returncode is not None:
                        self._reap(run, returncode)
                except Exception:
                    logger.exception("job %s: could not record the trainer's progress", run.job_id)
            time.sleep(0.05)
        for run in list(self._active.values()):
            logger.warning("trainer of job %s did not stop in time; killing it", run.job_id)
            signal_group(run.popen.pid, signal.SIGKILL)
            try:
                self._reap(run, run.popen.wait())
            except Exception:
                # Left `running` in the store: the next start settles it from its checkpoint.
                logger.exception("job %s: could not record the trainer's exit", run.job_id)

    # -- recovery -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Settle what a previous server left: orphaned trainers and jobs marked running."""
        for job in self.store.jobs_with_process():
            if job.pid is not None and is_alive(job.pid, job.pid_start):
                logger.warning(
                    "job %s: trainer pid %d outlived the previous server; stopping it",
                    job.id,
                    job.pid,
                )
                self._stop_orphan(job.pid, job.pid_start)
            self.store.set_process(job.id, None, None)
        for job in self.store.jobs_with_status(RUNNING):
            paths = self.store.job_paths(job.id)
            tail = tail_events(self.store, job.id, paths, job.events_offset)
            job = self.store.get_job(job.id)
            if tail.succeeded and job.fine_tuned_model:
                self.store.transition(
                    job.id,
                    [RUNNING],
                    SUCCEEDED,
                    message=f"The job has successfully completed: {job.fine_tuned_model} is servable",
                )
            elif tail.failure:
                error = JobError("trainer_failed", tail.failure)
                self.store.transition(
                    job.id, [RUNNING], FAILED, error=error, message=error.message, level="error"
                )
            elif latest_checkpoint(paths.checkpoints) is not None:
                self._requeue(job.id, paths, "the server restarted while it was running")
            else:
                error = JobError(
                    "server_restarted",
                    "the server stopped while this job was running, before the trainer saved a "
                    "checkpoint; create a new job to train again",
                )
                self.store.transition(
                    job.id, [RUNNING], FAILED, error=error, message=error.message, level="error"
                )
                logger.warning("job %s failed: %s", job.id, error.message)

    def _stop_orphan(self, pid: int, identity: str | None) -> None:
        signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        while is_alive(pid, identity) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(pid, identity):
            signal_group(pid, signal.SIGKILL)


def tail_events(store: JobTables, job_id: str, paths: JobPaths, offset: int) -> _Tail:
    """Copy the trainer's events after byte `offset` into the job's log; update the job."""
    events, end = read_events(paths.events, offset)
    if end == offset:
        return _Tail(offset=offset, failure=None, succeeded=False)
    updates: dict[str, Any] = {}
    failure: str | None = None
    succeeded = False
    for event in events:
        kind = event.get("type")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if kind == "metrics" and isinstance(data.get("eta_s"), int | float):
            updates["estimated_finish"] = int(time.time() + data["eta_s"])
        if kind in ("published", "succeeded") and data.get("ref"):
            updates["fine_tuned_model"] = str(data["ref"])
        if kind == "succeeded":
            succeeded = True
            if isinstance(data.get("trained_tokens"), int):
                updates["trained_tokens"] = data["trained_tokens"]
        if kind == "failed":
            failure = redact_paths(
                str(data.get("error") or event.get("message") or "the trainer failed")
            )
    store.record_progress(job_id, [_event(job_id, e) for e in events], events_offset=end, **updates)
    return _Tail(offset=end, failure=failure, succeeded=succeeded)


def _event(job_id: str, event: dict[str, Any]) -> EventRecord:
    """A trainer event (see `trainer.events`) as a job event, its text free of paths."""
    kind = str(event.get("type") or "message")
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    data = {k: redact_paths(v) if isinstance(v, str) else v for k, v in data.items()}
    created = event.get("time")
    return make_event(
        job_id,
        redact_paths(str(event.get("message") or kind)),
        created_at=int(created) if isinstance(created, int | float) else int(time.time()),
        level=_LEVELS.get(str(event.get("level")), "info"),
        type="metrics" if kind in ("metrics", "eval") else "message",
        data={"event": kind, **data},
    )
