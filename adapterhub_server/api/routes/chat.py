"""`POST /v1/chat/completions`."""

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
from client.types import ChatCompletion, ChatCompletionRequest

router = APIRouter(tags=["inference"], route_class=JsonLimitsRoute)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**STREAM_RESPONSE, **ERROR_RESPONSES},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletion | Response:
    """Reply to a conversation, rendered with the base model's chat template."""
    return respond(await cancel_on_disconnect(request, service.create_chat_completion(body)))
