"""`/v1/fine_tuning/jobs`: create, list, inspect, follow and cancel jobs (OpenAI's shape)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.routes.files import FineTuningDep
from client.types import (
    ErrorResponse,
    FineTuningJob,
    FineTuningJobCreateRequest,
    FineTuningJobEventList,
    FineTuningJobList,
)

router = APIRouter(tags=["fine-tuning"], route_class=JsonLimitsRoute)

_ERRORS = {
    400: {
        "model": ErrorResponse,
        "description": "Invalid request, file, model or value, or a hyperparameter or total "
        "work over the server's limits",
    },
    404: {"model": ErrorResponse, "description": "Unknown job id"},
    409: {"model": ErrorResponse, "description": "The job already succeeded or failed"},
}

Limit = Annotated[int, Query(ge=1, le=100, description="page size")]
After = Annotated[str | None, Query(description="id of the last item of the previous page")]


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, responses=_ERRORS)
async def create_job(service: FineTuningDep, body: FineTuningJobCreateRequest) -> FineTuningJob:
    """Queue a job; it trains in a trainer subprocess and publishes `suffix@<version>`
    (without `suffix`: `ft-` and 8 characters of the job id). Every hyperparameter and the
    job's estimated total work are checked against the server's limits first (400)."""
    return await service.create_job(body)


@router.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList, responses=_ERRORS)
async def list_jobs(
    service: FineTuningDep, after: After = None, limit: Limit = 20
) -> FineTuningJobList:
    """Jobs, newest first."""
    return await service.list_jobs(after=after, limit=limit)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob, responses=_ERRORS)
async def get_job(service: FineTuningDep, job_id: str) -> FineTuningJob:
    return await service.get_job(job_id)


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/events",
    response_model=FineTuningJobEventList,
    responses=_ERRORS,
)
async def list_events(
    service: FineTuningDep, job_id: str, after: After = None, limit: Limit = 20
) -> FineTuningJobEventList:
    """The job's events, newest first."""
    return await service.list_events(job_id, after=after, limit=limit)


@router.post(
    "/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob, responses=_ERRORS
)
async def cancel_job(service: FineTuningDep, job_id: str) -> FineTuningJob:
    """Cancel a queued or running job (its trainer is stopped); repeating it is harmless."""
    return await service.cancel_job(job_id)
