"""`client.fine_tuning.jobs`: OpenAI-style fine-tuning jobs (`/v1/fine_tuning/jobs`).

A job trains on the server (in its own trainer process) and publishes the result into the
registry; `fine_tuned_model` (`<suffix>@<version>`) is then servable at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio

from client._base import RequestOptions
from client.errors import (
    FineTuningJobCancelledError,
    FineTuningJobFailedError,
    FineTuningJobTimeoutError,
)
from client.resources._resource import AsyncAPIResource, SyncAPIResource, request_body
from client.types import (
    FineTuningHyperparameters,
    FineTuningJob,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningMethodRequest,
    ModelList,
)

if TYPE_CHECKING:
    from client._async_client import AsyncAdapterHubClient
    from client._client import AdapterHubClient

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_POLL_INTERVAL = 1.0
"""Seconds between status checks in `wait()`: a job takes seconds to hours, and each check
is one cheap GET."""


def _job_path(job_id: str) -> str:
    return f"/v1/fine_tuning/jobs/{quote(job_id, safe='')}"


def _create_options(fields: dict[str, Any], extra_body: Mapping[str, Any] | None) -> RequestOptions:
    return RequestOptions("POST", "/v1/fine_tuning/jobs", json=request_body(fields, extra_body))


def _page(after: str | None, limit: int | None) -> dict[str, Any]:
    return {"after": after, "limit": limit}


def finished(job: FineTuningJob) -> FineTuningJob:
    """`job` if it succeeded; the matching exception if it failed or was cancelled."""
    if job.status == "failed":
        raise FineTuningJobFailedError(job)
    if job.status == "cancelled":
        raise FineTuningJobCancelledError(job)
    return job


def supervised_method(
    training_method: str | None, hyperparameters: Mapping[str, Any]
) -> dict[str, Any]:
    """`method` of a job request for `client.train()`."""
    values = dict(hyperparameters)
    if training_method is not None:
        values["training_method"] = training_method
    return {"type": "supervised", "supervised": {"hyperparameters": values}}


def base_model_id(models: ModelList) -> str:
    """The served base model: the entry without a parent."""
    for model in models.data:
        if model.parent is None:
            return model.id
    raise LookupError("the server lists no base model")


class Jobs(SyncAPIResource):
    """Create, follow and cancel fine-tuning jobs."""

    def create(
        self,
        *,
        training_file: str,
        model: str,
        suffix: str | None = None,
        validation_file: str | None = None,
        seed: int | None = None,
        method: FineTuningMethodRequest | Mapping[str, Any] | None = None,
        hyperparameters: FineTuningHyperparameters | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> FineTuningJob:
        """Queue a job that fine-tunes `model` (the server's base model id) on the uploaded
        `training_file` and publishes the result as `suffix@<version>` (without `suffix`, the
        server names it `ft-` plus 8 characters of the job id; the job's `suffix` says which).

        Give hyperparameters in `method` (`{"type": "supervised", "supervised":
        {"hyperparameters": {...}}}`) or in the deprecated top-level `hyperparameters`:
        OpenAI's `n_epochs`, `batch_size`, `learning_rate_multiplier` plus AdapterHub's
        (`training_method`, `lora_r`, `max_steps`, ...; see `FineTuningHyperparameters`).
        Unknown names, files and models are refused with `BadRequestError` before anything
        is queued.
        """
        options = _create_options(
            {
                "training_file": training_file,
                "model": model,
                "suffix": suffix,
                "validation_file": validation_file,
                "seed": seed,
                "method": method,
                "hyperparameters": hyperparameters,
            },
            extra_body,
        )
        return self._client._request(options, FineTuningJob)

    def retrieve(self, job_id: str) -> FineTuningJob:
        """The job now: status, `fine_tuned_model` once published, `error` once failed."""
        return self._client._request(RequestOptions("GET", _job_path(job_id)), FineTuningJob)

    def list(self, *, after: str | None = None, limit: int | None = None) -> FineTuningJobList:
        """One page of jobs, newest first; pass the last id as `after` while `has_more`."""
        options = RequestOptions("GET", "/v1/fine_tuning/jobs", params=_page(after, limit))
        return self._client._request(options, FineTuningJobList)

    def events(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> FineTuningJobEventList:
        """One page of the job's events (progress, metrics, errors), newest first."""
        options = RequestOptions("GET", f"{_job_path(job_id)}/events", params=_page(after, limit))
        return self._client._request(options, FineTuningJobEventList)

    def cancel(self, job_id: str) -> FineTuningJob:
        """Cancel a queued or running job (its trainer is stopped); `ConflictError` once it
        succeeded or failed."""
        options = RequestOptions("POST", f"{_job_path(job_id)}/cancel")
        return self._client._request(options, FineTuningJob)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> FineTuningJob:
        """Poll until the job finishes and return it (`status == "succeeded"`).

        Raises `FineTuningJobFailedError` with the server's reason when it failed,
        `FineTuningJobCancelledError` when it was cancelled, and `FineTuningJobTimeoutError`
        after `timeout` seconds (None: no limit); the job itself is not touched.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if job.status in TERMINAL_STATUSES:
                return finished(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise FineTuningJobTimeoutError(job, timeout or 0.0)
            pause = poll_interval
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)


class AsyncJobs(AsyncAPIResource):
    """Create, follow and cancel fine-tuning jobs."""

    async def create(
        self,
        *,
        training_file: str,
        model: str,
        suffix: str | None = None,
        validation_file: str | None = None,
        seed: int | None = None,
        method: FineTuningMethodRequest | Mapping[str, Any] | None = None,
        hyperparameters: FineTuningHyperparameters | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> FineTuningJob:
        """Queue a fine-tuning job; see `Jobs.create`."""
        options = _create_options(
            {
                "training_file": training_file,
                "model": model,
                "suffix": suffix,
                "validation_file": validation_file,
                "seed": seed,
                "method": method,
                "hyperparameters": hyperparameters,
            },
            extra_body,
        )
        return await self._client._request(options, FineTuningJob)

    async def retrieve(self, job_id: str) -> FineTuningJob:
        """The job now: status, `fine_tuned_model` once published, `error` once failed."""
        return await self._client._request(RequestOptions("GET", _job_path(job_id)), FineTuningJob)

    async def list(
        self, *, after: str | None = None, limit: int | None = None
    ) -> FineTuningJobList:
        """One page of jobs, newest first; pass the last id as `after` while `has_more`."""
        options = RequestOptions("GET", "/v1/fine_tuning/jobs", params=_page(after, limit))
        return await self._client._request(options, FineTuningJobList)

    async def events(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> FineTuningJobEventList:
        """One page of the job's events (progress, metrics, errors), newest first."""
        options = RequestOptions("GET", f"{_job_path(job_id)}/events", params=_page(after, limit))
        return await self._client._request(options, FineTuningJobEventList)

    async def cancel(self, job_id: str) -> FineTuningJob:
        """Cancel a queued or running job; see `Jobs.cancel`."""
        options = RequestOptions("POST", f"{_job_path(job_id)}/cancel")
        return await self._client._request(options, FineTuningJob)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> FineTuningJob:
        """Poll until the job finishes and return it; see `Jobs.wait` (same errors)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if job.status in TERMINAL_STATUSES:
                return finished(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise FineTuningJobTimeoutError(job, timeout or 0.0)
            pause = poll_interval
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            await anyio.sleep(pause)


class FineTuning(SyncAPIResource):
    """`client.fine_tuning`: holds `jobs`, as in the openai package."""

    def __init__(self, client: AdapterHubClient) -> None:
        super().__init__(client)
        self.jobs = Jobs(client)
        """Fine-tuning jobs."""


class AsyncFineTuning(AsyncAPIResource):
    """`client.fine_tuning`: holds `jobs`, as in the openai package."""

    def __init__(self, client: AsyncAdapterHubClient) -> None:
        super().__init__(client)
        self.jobs = AsyncJobs(client)
        """Fine-tuning jobs."""
