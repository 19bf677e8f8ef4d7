"""`/v1/files`: upload, list, inspect, download and delete fine-tuning data (OpenAI's shape)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.responses import FileResponse

from adapterhub_server.api.json_body import JsonLimitsRoute
from adapterhub_server.finetune.service import FineTuningService
from client.types import ErrorResponse, FileDeleted, FileList, FileObject

router = APIRouter(tags=["files"], route_class=JsonLimitsRoute)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Wrong purpose, or a malformed JSONL line"},
    404: {"model": ErrorResponse, "description": "Unknown file id"},
    409: {"model": ErrorResponse, "description": "Used by a queued or running job"},
    413: {"model": ErrorResponse, "description": "Upload over the size limit"},
}


def get_fine_tuning_service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning_service  # type: ignore[no-any-return]


FineTuningDep = Annotated[FineTuningService, Depends(get_fine_tuning_service)]


@router.post("/v1/files", response_model=FileObject, responses=_ERRORS)
async def upload_file(
    service: FineTuningDep,
    file: Annotated[UploadFile, File(description="JSONL training data")],
    purpose: Annotated[str, Form(description="must be `fine-tune`")],
) -> FileObject:
    """Store a JSONL file after validating every line (a bad line: 400, nothing stored)."""
    return await service.upload_file(
        filename=file.filename or "upload.jsonl", data=file.file, purpose=purpose
    )


@router.get("/v1/files", response_model=FileList)
async def list_files(service: FineTuningDep) -> FileList:
    return await service.list_files()


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=_ERRORS)
async def get_file(service: FineTuningDep, file_id: str) -> FileObject:
    return await service.get_file(file_id)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
            "description": "The file as uploaded",
        },
        **_ERRORS,
    },
)
async def file_content(service: FineTuningDep, file_id: str) -> FileResponse:
    return FileResponse(await service.file_content(file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=_ERRORS)
async def delete_file(service: FineTuningDep, file_id: str) -> FileDeleted:
    return await service.delete_file(file_id)
