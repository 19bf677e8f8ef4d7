"""`client.files`: training data for fine-tuning jobs (`/v1/files`, OpenAI's shape)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from client._base import RequestOptions
from client.resources._resource import AsyncAPIResource, SyncAPIResource, jsonable
from client.types import FileDeleted, FileList, FileObject

TrainingData = str | os.PathLike[str] | bytes | Sequence[Mapping[str, Any]]
"""A JSONL file's path, its bytes, or the records themselves (serialised to JSONL in memory):
`{"messages": [...]}` chat records or `{"prompt": ..., "completion": ...}` pairs."""


def to_jsonl(records: Sequence[Mapping[str, Any]]) -> bytes:
    """One JSON object per line, as the server (and `trainer train`) read them."""
    return "".join(
        json.dumps(jsonable(record), ensure_ascii=False) + "\n" for record in records
    ).encode()


def _upload_options(file: TrainingData, purpose: str, filename: str | None) -> RequestOptions:
    content: bytes | Path
    if isinstance(file, bytes):
        content, default_name = file, "data.jsonl"
    elif isinstance(file, str | os.PathLike):
        content = Path(file)
        if not content.is_file():
            raise FileNotFoundError(f"no such file: {content}")
        default_name = content.name
    else:
        content, default_name = to_jsonl(file), "records.jsonl"
    files = [("file", (filename or default_name, content, "application/jsonl"))]
    return RequestOptions("POST", "/v1/files", data={"purpose": purpose}, files=files)


def _file_path(file_id: str) -> str:
    return f"/v1/files/{quote(file_id, safe='')}"


class Files(SyncAPIResource):
    """Upload, list, inspect, download and delete training files."""

    def create(
        self, file: TrainingData, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> FileObject:
        """Upload training data: a JSONL path, its bytes, or a list of records.

        The server checks every line before storing anything; a malformed one is a
        `BadRequestError` whose message names the line. `filename` overrides the name the
        file is listed under.
        """
        return self._client._request(_upload_options(file, purpose, filename), FileObject)

    def list(self) -> FileList:
        """Every stored file, newest first."""
        return self._client._request(RequestOptions("GET", "/v1/files"), FileList)

    def retrieve(self, file_id: str) -> FileObject:
        """One file's metadata."""
        return self._client._request(RequestOptions("GET", _file_path(file_id)), FileObject)

    def content(self, file_id: str) -> bytes:
        """The file's bytes, as uploaded."""
        with self._client._request_raw(
            RequestOptions("GET", f"{_file_path(file_id)}/content")
        ) as response:
            return response.read()

    def delete(self, file_id: str) -> FileDeleted:
        """Delete a file; `ConflictError` while a queued or running job uses it."""
        return self._client._request(RequestOptions("DELETE", _file_path(file_id)), FileDeleted)


class AsyncFiles(AsyncAPIResource):
    """Upload, list, inspect, download and delete training files."""

    async def create(
        self, file: TrainingData, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> FileObject:
        """Upload training data: a JSONL path, its bytes, or a list of records; see
        `Files.create`."""
        return await self._client._request(_upload_options(file, purpose, filename), FileObject)

    async def list(self) -> FileList:
        """Every stored file, newest first."""
        return await self._client._request(RequestOptions("GET", "/v1/files"), FileList)

    async def retrieve(self, file_id: str) -> FileObject:
        """One file's metadata."""
        return await self._client._request(RequestOptions("GET", _file_path(file_id)), FileObject)

    async def content(self, file_id: str) -> bytes:
        """The file's bytes, as uploaded."""
        async with self._client._request_raw(
            RequestOptions("GET", f"{_file_path(file_id)}/content")
        ) as response:
            return await response.aread()

    async def delete(self, file_id: str) -> FileDeleted:
        """Delete a file; `ConflictError` while a queued or running job uses it."""
        return await self._client._request(
            RequestOptions("DELETE", _file_path(file_id)), FileDeleted
        )
