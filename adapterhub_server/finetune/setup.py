"""Build the fine-tuning service for a registry: beside a directory, or on a shared index."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from adapterhub_server.finetune.limits import BaseModelInfo, FineTuningLimits
from adapterhub_server.finetune.runner import JobRunner, RunnerConfig
from adapterhub_server.finetune.service import FineTuningService

logger = logging.getLogger(__name__)

JOBS_DIR_ENV = "ADAPTERHUB_JOBS_DIR"


def default_jobs_dir(registry: str | os.PathLike[str] | None) -> Path:
    """`$ADAPTERHUB_JOBS_DIR`, else a `finetune` directory next to a registry directory,
    else (a shared registry: the directory is scratch space only) the user's cache."""
    from adapterhub_server.registry.factory import is_registry_url

    configured = os.environ.get(JOBS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    if registry is not None and not is_registry_url(registry):
        return Path(registry).expanduser().parent / "finetune"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapterhub" / "finetune"


def open_fine_tuning(
    registry: Any,
    location: str | Path,
    *,
    base: BaseModelInfo,
    jobs_dir: Path | None,
    runner: RunnerConfig,
    limits: FineTuningLimits,
    worker: bool,
    lease_s: float,
    blobs_url: str | None,
) -> FineTuningService:
    """The service for `registry` (opened from `location`, a directory or a URL).

    A directory registry keeps jobs beside it and this process trains them. A shared one
    keeps them in its database and blob store; this process trains only when `worker`,
    and its trainers find the registry through the environment (URL and blob store).
    """
    from adapterhub_server.registry.factory import BLOBS_ENV, is_registry_url
    from adapterhub_server.registry.registry import REGISTRY_ENV

    work_dir = jobs_dir or default_jobs_dir(location)
    if not is_registry_url(location):
        return FineTuningService.open(
            work_dir, base=base, registry=Path(location), runner=runner, limits=limits
        )
    from adapterhub_server.finetune.objects import objects_for
    from adapterhub_server.finetune.shared_store import SharedFineTuneStore

    shared = SharedFineTuneStore(
        registry.index,
        objects_for(registry.blobs),
        work_dir,
        model_id=base.model_id,
        base_model=str(base.path),
        lease_s=lease_s,
    )
    env = {**runner.trainer_env, REGISTRY_ENV: str(location)}
    blobs = blobs_url or os.environ.get(BLOBS_ENV)
    if blobs:
        env[BLOBS_ENV] = blobs
    runner = RunnerConfig(
        max_concurrent_jobs=runner.max_concurrent_jobs,
        trainer_command=runner.trainer_command,
        poll_interval_s=runner.poll_interval_s,
        stop_timeout_s=runner.stop_timeout_s,
        trainer_env=env,
    )
    if worker:
        logger.info("fine-tuning worker %s: trains jobs from the shared registry", shared.worker)
    else:
        logger.info(
            "fine-tuning jobs are served from the shared registry; this replica trains none "
            "(start one with --fine-tuning-worker)"
        )
    return FineTuningService(
        shared,
        JobRunner(shared, runner),
        base=base,
        registry=None,
        limits=limits,
        runs_jobs=worker,
    )
