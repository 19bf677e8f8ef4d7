"""OpenAI-compatible fine-tuning on the server: uploaded files, a job queue, a trainer runner.

`FineTuningService` is what the `/v1/files` and `/v1/fine_tuning/jobs` routes call;
`FineTuneStore` keeps files, jobs and events (SQLite in WAL mode plus a directory);
`JobRunner` runs queued jobs as `trainer train` subprocesses that publish into the registry.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterhub_server.finetune.limits import BaseModelInfo, FineTuningLimits
from adapterhub_server.finetune.runner import JobRunner, RunnerConfig
from adapterhub_server.finetune.service import FineTuningService
from adapterhub_server.finetune.store import FineTuneStore

JOBS_DIR_ENV = "ADAPTERHUB_JOBS_DIR"


def default_jobs_dir(registry: Path) -> Path:
    """`$ADAPTERHUB_JOBS_DIR`, else a `finetune` directory next to the registry directory."""
    configured = os.environ.get(JOBS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(registry).expanduser().parent / "finetune"


__all__ = [
    "JOBS_DIR_ENV",
    "BaseModelInfo",
    "FineTuneStore",
    "FineTuningLimits",
    "FineTuningService",
    "JobRunner",
    "RunnerConfig",
    "default_jobs_dir",
]
