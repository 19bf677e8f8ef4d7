"""`POST /tokenize` and `POST /detokenize` (vLLM's paths and shapes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.routes.common import ERROR_RESPONSES
from adapterhub_server.api.tokenize_service import TokenizeService
from client.types import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["tokenizer"], route_class=JsonLimitsRoute)


def get_tokenize_service(request: Request) -> TokenizeService:
    """The service `create_app` stored in app state."""
    return request.app.state.tokenize_service  # type: ignore[no-any-return]


TokenizeServiceDep = Annotated[TokenizeService, Depends(get_tokenize_service)]


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, service: TokenizeServiceDep) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered as chat requests render them."""
    return await service.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, service: TokenizeServiceDep) -> DetokenizeResponse:
    """The text of token ids."""
    return await service.detokenize(body)
