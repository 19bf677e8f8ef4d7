"""`GET /health`."""

from __future__ import annotations

from fastapi import APIRouter

from adapterhub_server.api.routes.common import ServiceDep
from client.types import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthStatus)
async def health(service: ServiceDep) -> HealthStatus:
    """Liveness: answers while the process serves HTTP."""
    return service.health()
