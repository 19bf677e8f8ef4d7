"""OpenAI-compatible fine-tuning on the server: uploaded files, a job queue, a trainer runner.

`FineTuningService` is what the `/v1/files` and `/v1/fine_tuning/jobs` routes call;
`FineTuneStore` keeps files, jobs and events (SQLite in WAL mode plus a directory) beside a
directory registry, `SharedFineTuneStore` in a shared registry's database and blob store;
`JobRunner` runs queued jobs as `trainer train` subprocesses that publish into the registry.
"""

from __future__ import annotations

from adapterhub_server.finetune.limits import BaseModelInfo, FineTuningLimits
from adapterhub_server.finetune.runner import JobRunner, RunnerConfig
from adapterhub_server.finetune.service import FineTuningService
from adapterhub_server.finetune.setup import JOBS_DIR_ENV, default_jobs_dir, open_fine_tuning
from adapterhub_server.finetune.store import FineTuneStore

__all__ = [
    "JOBS_DIR_ENV",
    "BaseModelInfo",
    "FineTuneStore",
    "FineTuningLimits",
    "FineTuningService",
    "JobRunner",
    "RunnerConfig",
    "default_jobs_dir",
    "open_fine_tuning",
]
