"""`GET /health` (liveness) and `GET /ready` (readiness)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterhub_server.api.errors import NotReadyError
from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.routes.common import ServiceDep
from client.types import ErrorResponse, HealthStatus, ReadyStatus

router = APIRouter(tags=["health"], route_class=JsonLimitsRoute)


@router.get("/health", response_model=HealthStatus)
async def health(service: ServiceDep) -> HealthStatus:
    """Liveness: answers while the process serves HTTP."""
    return service.health()


@router.get(
    "/ready",
    response_model=ReadyStatus,
    responses={503: {"model": ErrorResponse, "description": "Starting or shutting down"}},
)
async def ready(request: Request) -> ReadyStatus:
    """Readiness: 200 while the engine takes requests, 503 (retry later) otherwise.

    Orchestrators keep traffic away while this fails; unlike `/health`, failing it must not
    get the process restarted (the model may simply still be loading).
    """
    if not request.app.state.engine.ready:
        raise NotReadyError()
    return ReadyStatus()
