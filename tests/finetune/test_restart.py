"""A restart never loses the queue: jobs survive a stop, a crash and an orphaned trainer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import anyio

from adapterhub_server.finetune import FineTuningService
from adapterhub_server.finetune.process import is_alive, process_identity, spawn, trainer_argv
from client.types import FineTuningJobCreateRequest
from tests.finetune.conftest import BASE_ID, fake_runner, jsonl, wait_for

Factory = Callable[..., FineTuningService]


def create_job(service: FineTuningService, suffix: str, **hyperparameters: object) -> str:
    async def go() -> str:
        import io

        file = await service.upload_file(
            filename="train.jsonl", data=io.BytesIO(jsonl()), purpose="fine-tune"
        )
        request = FineTuningJobCreateRequest(
            model=BASE_ID,
            training_file=file.id,
            suffix=suffix,
            hyperparameters=hyperparameters or None,  # type: ignore[arg-type]
        )
        return (await service.create_job(request)).id

    return anyio.run(go)


def status(service: FineTuningService, job_id: str) -> str:
    return service.store.get_job(job_id).status


def settled(service: FineTuningService, job_id: str) -> str:
    return wait_for(
        lambda: (
            status(service, job_id) in ("succeeded", "failed", "cancelled")
            and status(service, job_id)
        ),
        what=f"job {job_id} to finish",
    )


def calls(service: FineTuningService, job_id: str) -> list[list[str]]:
    path = service.store.job_paths(job_id).dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_checkpoint(service: FineTuningService, job_id: str, step: int) -> Path:
    path = service.store.job_paths(job_id).checkpoints / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


def test_a_queued_job_survives_a_restart_and_runs(make_service: Factory) -> None:
    first = make_service()
    job_id = create_job(first, "ok-queued")
    first.stop()  # never ran anything

    second = make_service()
    assert status(second, job_id) == "queued"
    assert second.start()
    assert settled(second, job_id) == "succeeded"
    assert second.store.get_job(job_id).fine_tuned_model == "ok-queued@1"


def test_a_running_job_without_checkpoint_fails_with_the_reason(make_service: Factory) -> None:
    first = make_service()
    job_id = create_job(first, "ok-crashed")
    first.store.claim_next()  # marked running, then the server "crashed"
    first.stop()

    second = make_service()
    second.start()
    job = second.store.get_job(job_id)
    assert job.status == "failed"
    assert job.error is not None
    assert job.error.code == "server_restarted"
    assert "no checkpoint" in job.error.message or "before the trainer saved" in job.error.message
    assert calls(second, job_id) == []
    events, _ = second.store.list_events(job_id)
    assert events[0].level == "error"


def test_a_running_job_with_a_checkpoint_resumes(make_service: Factory) -> None:
    first = make_service()
    job_id = create_job(first, "ok-resumed", max_steps=4)
    first.store.claim_next()
    make_checkpoint(first, job_id, 2)
    first.stop()

    second = make_service()
    second.start()
    assert settled(second, job_id) == "succeeded"
    (argv,) = calls(second, job_id)
    assert "--resume" in argv
    events, _ = second.store.list_events(job_id, limit=100)
    started = [e for e in events if e.data and e.data.get("event") == "started"]
    assert started[0].data["resumed_from_step"] == 2
    assert any("resume from checkpoint step-00000002" in e.message for e in events)


def test_stopping_the_server_checkpoints_and_requeues_then_resumes(make_service: Factory) -> None:
    first = make_service()
    job_id = create_job(first, "slow-graceful", max_steps=100_000)
    first.start()
    pid = wait_for(lambda: first.runner.trainer_pids().get(job_id), what="the trainer")
    wait_for(lambda: first.store.get_job(job_id).events_offset > 0, what="trainer events")
    first.stop()
    assert not is_alive(pid, process_identity(pid))
    job = first.store.get_job(job_id)
    assert job.status == "queued"
    assert job.pid is None
    events, _ = first.store.list_events(job_id)
    assert "resume from checkpoint" in events[0].message
    assert [e.data["event"] for e in events[1:3]] == ["interrupted", "checkpoint"]

    second = make_service()
    second.start()
    wait_for(lambda: len(calls(second, job_id)) == 2, what="the resumed trainer")
    assert "--resume" in calls(second, job_id)[1]
    anyio.run(second.cancel_job, job_id)
    assert settled(second, job_id) == "cancelled"


def test_an_orphaned_trainer_is_stopped_before_its_job_resumes(
    make_service: Factory, tmp_path: Path
) -> None:
    """The previous server was SIGKILLed; its trainer (own process group) kept running."""
    first = make_service()
    job_id = create_job(first, "slow-orphan", max_steps=100_000)
    first.store.claim_next()
    paths = first.store.prepare(job_id)  # what the runner does at launch
    orphan = spawn(trainer_argv(fake_runner().trainer_command, paths, resume=False), paths, {})
    first.store.set_process(job_id, orphan.pid, process_identity(orphan.pid))
    wait_for(lambda: paths.events.exists() and paths.events.stat().st_size > 0, what="orphan")
    first.stop()

    second = make_service()
    second.start()  # SIGTERMs the orphan (it checkpoints), then queues the job to resume
    assert orphan.wait(timeout=30) == 130
    wait_for(lambda: len(calls(second, job_id)) == 2, what="the resumed trainer")
    assert "--resume" in calls(second, job_id)[1]


def test_one_runner_per_jobs_directory(make_service: Factory) -> None:
    first = make_service()
    assert first.start()
    second = make_service()
    assert not second.start()  # the first holds the runner lock
    job_id = create_job(second, "ok-shared")  # ...but jobs can still be created here
    assert settled(first, job_id) == "succeeded"
    first.stop()
    assert second.start()


def test_pid_identity_guards_against_reuse() -> None:
    assert is_alive(os.getpid(), process_identity(os.getpid()))
    assert not is_alive(os.getpid(), "0")  # same pid, another start time: another process
    assert not is_alive(os.getpid(), None)
