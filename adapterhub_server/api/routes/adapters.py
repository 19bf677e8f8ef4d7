"""`/v1/adapters`: upload, list, inspect, download, delete, aliases (the registry API)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.responses import StreamingResponse

from adapterhub_server.api.adapters_service import AdapterAdminService
from adapterhub_server.api.json_body import JsonLimitsRoute
from client.types import (
    Adapter,
    AdapterDeleted,
    AdapterList,
    AdapterVersion,
    AliasState,
    AliasUpdate,
    ErrorResponse,
    MergeCreateRequest,
)

router = APIRouter(tags=["adapters"], route_class=JsonLimitsRoute)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid upload or reference"},
    404: {"model": ErrorResponse, "description": "Unknown adapter, version or alias"},
    409: {"model": ErrorResponse, "description": "In use by a running request, or aliased"},
    413: {"model": ErrorResponse, "description": "Upload over the size limit"},
}


_BINARY = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The file's bytes, checked against its recorded sha256",
    }
}


def get_adapter_service(request: Request) -> AdapterAdminService:
    return request.app.state.adapter_service  # type: ignore[no-any-return]


AdminDep = Annotated[AdapterAdminService, Depends(get_adapter_service)]


@router.post("/v1/adapters", status_code=201, response_model=AdapterVersion, responses=_ERRORS)
async def upload_adapter(
    service: AdminDep,
    name: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File()],
    alias: Annotated[str | None, Form()] = None,
    description: Annotated[str | None, Form()] = None,
    metadata: Annotated[str | None, Form(description="JSON object")] = None,
    sha256: Annotated[str | None, Form(description="JSON object: file name -> hex")] = None,
) -> AdapterVersion:
    """Store a new version from PEFT files sent as `files` parts; servable at once."""
    return await service.upload(
        name=name,
        files=[(f.filename or "", f.file) for f in files],
        alias=alias,
        description=description,
        metadata=metadata,
        sha256=sha256,
    )


@router.post(
    "/v1/adapters/{name}/merges",
    status_code=201,
    response_model=AdapterVersion,
    responses=_ERRORS,
)
async def publish_merge(service: AdminDep, name: str, body: MergeCreateRequest) -> AdapterVersion:
    """Store the merge of several versions (PEFT's add_weighted_adapter) as a new version."""
    return await service.publish_merge(name, body)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(service: AdminDep) -> AdapterList:
    return await service.list()


@router.get("/v1/adapters/{name}", response_model=Adapter, responses=_ERRORS)
async def get_adapter(service: AdminDep, name: str) -> Adapter:
    return await service.get(name)


@router.get(
    "/v1/adapters/{name}/versions/{version}", response_model=AdapterVersion, responses=_ERRORS
)
async def get_version(service: AdminDep, name: str, version: int) -> AdapterVersion:
    return await service.version(name, version)


@router.get(
    "/v1/adapters/{name}/versions/{version}/files/{filename}",
    response_class=StreamingResponse,
    responses={**_BINARY, **_ERRORS},
)
async def download_file(
    service: AdminDep, name: str, version: int, filename: str
) -> StreamingResponse:
    chunks = await service.open_file(name, version, filename)
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete(
    "/v1/adapters/{name}/versions/{version}", response_model=AdapterDeleted, responses=_ERRORS
)
async def delete_version(
    service: AdminDep, name: str, version: int, force: bool = False
) -> AdapterDeleted:
    return await service.delete_version(name, version, force=force)


@router.put("/v1/adapters/{name}/aliases/{alias}", response_model=AliasState, responses=_ERRORS)
async def set_alias(service: AdminDep, name: str, alias: str, body: AliasUpdate) -> AliasState:
    return await service.set_alias(name, alias, body.version)


@router.delete("/v1/adapters/{name}/aliases/{alias}", response_model=AliasState, responses=_ERRORS)
async def delete_alias(service: AdminDep, name: str, alias: str) -> AliasState:
    return await service.delete_alias(name, alias)
