"""`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, shaped as vLLM's.

Success answers 200 with vLLM's plain-text message; errors use the usual error envelope
(400 for a bad request or an adapter already loaded with other content, 404 for unloading
a name this replica does not serve), as vLLM answers them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import PlainTextResponse

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.api.lora_admin import LoadRequest, LoraAdminService
from client.types import ErrorResponse

router = APIRouter(tags=["adapters"], route_class=JsonLimitsRoute)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request or path, or already loaded"},
    404: {"model": ErrorResponse, "description": "Not loaded on this replica"},
}
_TEXT = {200: {"content": {"text/plain": {}}, "description": "vLLM's success message"}}


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's request fields."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    base_model_name: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None
    """Sent by some vLLM clients; vLLM itself ignores it on unload, and so does this."""


def get_lora_admin(request: Request) -> LoraAdminService:
    return request.app.state.lora_admin_service  # type: ignore[no-any-return]


LoraAdminDep = Annotated[LoraAdminService, Depends(get_lora_admin)]


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    responses={**_TEXT, **_ERRORS},
)
async def load_lora_adapter(
    service: LoraAdminDep, body: LoadLoRAAdapterRequest
) -> PlainTextResponse:
    """Import (if new) and serve an adapter under `lora_name` on this replica."""
    message = await service.load(LoadRequest(**body.model_dump()))
    return PlainTextResponse(message)


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    responses={**_TEXT, **_ERRORS},
)
async def unload_lora_adapter(
    service: LoraAdminDep, body: UnloadLoRAAdapterRequest
) -> PlainTextResponse:
    """Stop serving `lora_name` on this replica; its registry versions stay."""
    return PlainTextResponse(await service.unload(body.lora_name))
