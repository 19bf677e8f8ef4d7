"""`POST /v1/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.routes.common import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    ServiceDep,
    cancel_on_disconnect,
    respond,
)
from client.types import Completion, CompletionRequest

router = APIRouter(tags=["inference"], route_class=JsonLimitsRoute)


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**STREAM_RESPONSE, **ERROR_RESPONSES},
)
async def create_completion(
    body: CompletionRequest, request: Request, service: ServiceDep
) -> Completion | Response:
    """Continue one or more prompts with the base model or an adapter."""
    return respond(await cancel_on_disconnect(request, service.create_completion(body)))
