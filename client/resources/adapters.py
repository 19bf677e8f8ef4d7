"""`client.adapters`: the versioned adapter registry (`/v1/adapters`).

Uploads send a sha256 per file, so the server refuses files corrupted in transit; downloads
check every file against the sha256 the registry recorded before it is put in place.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import anyio

from client._base import RequestOptions
from client.errors import IntegrityError, NotFoundError
from client.resources._resource import AsyncAPIResource, SyncAPIResource, request_body
from client.types import (
    Adapter,
    AdapterDeleted,
    AdapterList,
    AdapterVersion,
    AliasState,
    MergeStrategy,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What an upload sends from a PEFT directory (the server refuses anything else)."""
_CONTENT_TYPES = {".json": "application/json", ".safetensors": "application/octet-stream"}
_HASH_CHUNK = 1 << 20


def _segment(value: str | int) -> str:
    # Names are validated by the server; quoting keeps a bad one from changing the path.
    return quote(str(value), safe="")


def _version_path(name: str, version: int) -> str:
    return f"/v1/adapters/{_segment(name)}/versions/{_segment(version)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _upload_options(
    path: str | os.PathLike[str],
    name: str,
    alias: str | None,
    description: str | None,
    metadata: Mapping[str, Any] | None,
) -> RequestOptions:
    """The multipart upload of a PEFT directory (hashes its files: run off the event loop)."""
    directory = Path(path)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a PEFT adapter directory")
    present = [directory / f for f in ADAPTER_FILES if (directory / f).is_file()]
    if not present:
        raise FileNotFoundError(f"{directory} holds none of {', '.join(ADAPTER_FILES)}")
    data = {"name": name, "sha256": json.dumps({p.name: _sha256(p) for p in present})}
    if alias is not None:
        data["alias"] = alias
    if description is not None:
        data["description"] = description
    if metadata is not None:
        data["metadata"] = json.dumps(dict(metadata))
    files = [
        ("files", (p.name, p, _CONTENT_TYPES.get(p.suffix, "application/octet-stream")))
        for p in present
    ]
    return RequestOptions("POST", "/v1/adapters", data=data, files=files)


def _merge_options(
    name: str,
    ids: Sequence[str],
    weights: Sequence[float] | None,
    merge_strategy: MergeStrategy,
    density: float | None,
    majority_sign_method: Literal["total", "frequency"],
    alias: str | None,
    description: str | None,
) -> RequestOptions:
    body = request_body(
        {
            "ids": list(ids),
            "weights": list(weights) if weights is not None else None,
            "merge_strategy": merge_strategy,
            "density": density,
            "majority_sign_method": majority_sign_method,
            "alias": alias,
            "description": description,
        },
        None,
    )
    return RequestOptions("POST", f"/v1/adapters/{_segment(name)}/merges", json=body)


def _split_ref(ref: str) -> tuple[str, str]:
    """`name`, `name@3`, `name@alias` -> (name, tag); the tag is "" for the newest version."""
    name, _, tag = ref.partition("@")
    return name, tag


def _alias_version(info: Adapter, alias: str) -> int:
    version = info.aliases.get(alias)
    if version is None:
        raise NotFoundError(
            f"adapter {info.name!r} has no alias {alias!r}",
            status_code=404,
            body={"error": {"message": f"no alias {alias!r}", "code": "not_found"}},
        )
    return version


class _VerifiedFile:
    """Writes a download beside its destination and moves it in place only when its sha256
    matches the registry's, so a failed or corrupted download leaves no file behind."""

    def __init__(self, directory: Path, filename: str, sha256: str) -> None:
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise IntegrityError(f"refusing to write a file named {filename!r}")
        self.target = directory / filename
        self.partial = directory / f".{filename}.partial"
        self.expected = sha256
        self.digest = hashlib.sha256()
        self.handle = open(self.partial, "wb")  # noqa: SIM115 (closed in finish / abort)

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.handle.write(chunk)

    def finish(self) -> None:
        self.handle.close()
        if self.digest.hexdigest() != self.expected:
            self.partial.unlink(missing_ok=True)
            raise IntegrityError(
                f"{self.target.name}: sha256 {self.digest.hexdigest()} differs from the "
                f"registry's {self.expected}"
            )
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)


class Adapters(SyncAPIResource):
    """Upload, inspect, download and delete adapter versions; move aliases."""

    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        alias: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AdapterVersion:
        """Store the PEFT adapter in directory `path` as the next version of `name`.

        Sends `adapter_config.json` and `adapter_model.safetensors` with their sha256. The
        version is servable at once as `name`, `name@<version>` and `name@<alias>`. Raises
        `BadRequestError` when the server cannot serve the adapter (wrong base, rank over
        the limit, pickle files, a bad name) and `PayloadTooLargeError` over its size limit.
        """
        options = _upload_options(path, name, alias, description, metadata)
        return self._client._request(options, AdapterVersion)

    def list(self) -> AdapterList:
        """Every adapter with its versions and aliases."""
        return self._client._request(RequestOptions("GET", "/v1/adapters"), AdapterList)

    def get(self, name: str) -> Adapter:
        """One adapter: its newest version, version numbers and aliases."""
        return self._client._request(
            RequestOptions("GET", f"/v1/adapters/{_segment(name)}"), Adapter
        )

    def get_version(self, name: str, version: int) -> AdapterVersion:
        """One version's record: files with sha256 and size, rank, targets, lineage."""
        return self._client._request(
            RequestOptions("GET", _version_path(name, version)), AdapterVersion
        )

    def versions(self, name: str) -> builtins.list[AdapterVersion]:
        """The record of every ready version of `name`, oldest first."""
        return [self.get_version(name, v) for v in self.get(name).versions]

    def resolve(self, ref: str) -> AdapterVersion:
        """The version a reference (`name`, `name@3`, `name@alias`) points at now."""
        name, tag = _split_ref(ref)
        if not tag:
            return self.get(name).latest
        if tag.isdigit():
            return self.get_version(name, int(tag))
        return self.get_version(name, _alias_version(self.get(name), tag))

    def download(self, ref: str, *, to: str | os.PathLike[str]) -> Path:
        """Download the files of `ref` into directory `to` (created if needed), each checked
        against the registry's sha256; returns `to` as a Path. The result is a PEFT
        directory that `PeftModel.from_pretrained` and `upload` accept."""
        record = self.resolve(ref)
        directory = Path(to)
        directory.mkdir(parents=True, exist_ok=True)
        for filename, info in record.files.items():
            options = RequestOptions(
                "GET", f"{_version_path(record.name, record.version)}/files/{_segment(filename)}"
            )
            out = _VerifiedFile(directory, filename, info.sha256)
            try:
                with self._client._request_raw(options) as response:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            except BaseException:
                out.abort()
                raise
            out.finish()
        return directory

    def delete(self, name: str, version: int, *, force: bool = False) -> AdapterDeleted:
        """Delete one version (its number is never reused). `ConflictError` while a running
        request uses it, or while an alias points at it unless `force`."""
        options = RequestOptions(
            "DELETE", _version_path(name, version), params={"force": "true" if force else None}
        )
        return self._client._request(options, AdapterDeleted)

    def merge(
        self,
        name: str,
        *,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: MergeStrategy = "cat",
        density: float | None = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
        alias: str | None = None,
        description: str | None = None,
    ) -> AdapterVersion:
        """Store the merge of the versions `ids` name (`name`, `name@3`, `name@alias`) as a
        new version of `name`, computed as PEFT's `add_weighted_adapter` with the same
        weights (default 1 each), strategy and density; the recipe is kept in its lineage
        (kind `merge:<strategy>`). Needs an admin key. `BadRequestError` for what PEFT
        refuses (ranks or target kinds that do not combine, a rank over the limit),
        `NotFoundError` for an unknown id."""
        options = _merge_options(
            name, ids, weights, merge_strategy, density, majority_sign_method, alias, description
        )
        return self._client._request(options, AdapterVersion)

    def set_alias(self, name: str, alias: str, version: int) -> AliasState:
        """Point `name@alias` at `version` (creating or moving the alias)."""
        options = RequestOptions(
            "PUT",
            f"/v1/adapters/{_segment(name)}/aliases/{_segment(alias)}",
            json={"version": version},
        )
        return self._client._request(options, AliasState)

    def delete_alias(self, name: str, alias: str) -> AliasState:
        """Remove `name@alias`; the version it pointed at stays."""
        options = RequestOptions(
            "DELETE", f"/v1/adapters/{_segment(name)}/aliases/{_segment(alias)}"
        )
        return self._client._request(options, AliasState)


class AsyncAdapters(AsyncAPIResource):
    """Upload, inspect, download and delete adapter versions; move aliases."""

    async def upload(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        alias: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AdapterVersion:
        """Store the PEFT adapter in directory `path` as the next version of `name`; see
        `Adapters.upload`."""
        # Hashing a large safetensors file would stall the event loop.
        options = await anyio.to_thread.run_sync(
            lambda: _upload_options(path, name, alias, description, metadata)
        )
        return await self._client._request(options, AdapterVersion)

    async def list(self) -> AdapterList:
        """Every adapter with its versions and aliases."""
        return await self._client._request(RequestOptions("GET", "/v1/adapters"), AdapterList)

    async def get(self, name: str) -> Adapter:
        """One adapter: its newest version, version numbers and aliases."""
        return await self._client._request(
            RequestOptions("GET", f"/v1/adapters/{_segment(name)}"), Adapter
        )

    async def get_version(self, name: str, version: int) -> AdapterVersion:
        """One version's record: files with sha256 and size, rank, targets, lineage."""
        return await self._client._request(
            RequestOptions("GET", _version_path(name, version)), AdapterVersion
        )

    async def versions(self, name: str) -> builtins.list[AdapterVersion]:
        """The record of every ready version of `name`, oldest first."""
        info = await self.get(name)
        return [await self.get_version(name, v) for v in info.versions]

    async def resolve(self, ref: str) -> AdapterVersion:
        """The version a reference (`name`, `name@3`, `name@alias`) points at now."""
        name, tag = _split_ref(ref)
        if not tag:
            return (await self.get(name)).latest
        if tag.isdigit():
            return await self.get_version(name, int(tag))
        return await self.get_version(name, _alias_version(await self.get(name), tag))

    async def download(self, ref: str, *, to: str | os.PathLike[str]) -> Path:
        """Download the files of `ref` into directory `to`, each checked against the
        registry's sha256; see `Adapters.download`."""
        record = await self.resolve(ref)
        directory = Path(to)
        directory.mkdir(parents=True, exist_ok=True)
        for filename, info in record.files.items():
            options = RequestOptions(
                "GET", f"{_version_path(record.name, record.version)}/files/{_segment(filename)}"
            )
            out = _VerifiedFile(directory, filename, info.sha256)
            try:
                async with self._client._request_raw(options) as response:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
            except BaseException:
                out.abort()
                raise
            out.finish()
        return directory

    async def delete(self, name: str, version: int, *, force: bool = False) -> AdapterDeleted:
        """Delete one version; see `Adapters.delete`."""
        options = RequestOptions(
            "DELETE", _version_path(name, version), params={"force": "true" if force else None}
        )
        return await self._client._request(options, AdapterDeleted)

    async def merge(
        self,
        name: str,
        *,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: MergeStrategy = "cat",
        density: float | None = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
        alias: str | None = None,
        description: str | None = None,
    ) -> AdapterVersion:
        """Store the merge of the versions `ids` name as a new version; see `Adapters.merge`."""
        options = _merge_options(
            name, ids, weights, merge_strategy, density, majority_sign_method, alias, description
        )
        return await self._client._request(options, AdapterVersion)

    async def set_alias(self, name: str, alias: str, version: int) -> AliasState:
        """Point `name@alias` at `version` (creating or moving the alias)."""
        options = RequestOptions(
            "PUT",
            f"/v1/adapters/{_segment(name)}/aliases/{_segment(alias)}",
            json={"version": version},
        )
        return await self._client._request(options, AliasState)

    async def delete_alias(self, name: str, alias: str) -> AliasState:
        """Remove `name@alias`; the version it pointed at stays."""
        options = RequestOptions(
            "DELETE", f"/v1/adapters/{_segment(name)}/aliases/{_segment(alias)}"
        )
        return await self._client._request(options, AliasState)
