"""`GET /v1/models`."""

from __future__ import annotations

from fastapi import APIRouter

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.routes.common import ServiceDep
from client.types import ModelList

router = APIRouter(tags=["models"], route_class=JsonLimitsRoute)


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    """The base model, then every adapter that requests can name as `model`."""
    return service.list_models()
