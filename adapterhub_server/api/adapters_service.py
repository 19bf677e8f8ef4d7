"""The registry management API's logic, free of HTTP types (routes stay thin).

Blocking registry work (hashing, fsync, SQLite) runs in a worker thread so the event loop
keeps streaming tokens. Deleting a version first evicts it from the engine on the engine
thread; an adapter pinned by a running request is never yanked: the delete answers 409.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol, TypeVar

import anyio

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.json_limits import JsonLimitError, check_text, parse_json
from adapterhub_server.lora.merge import MergeSpec
from adapterhub_server.registry import Registry
from adapterhub_server.registry.errors import InvalidValueError
from adapterhub_server.registry.merge import publish_merge
from client.types import (
    Adapter,
    AdapterDeleted,
    AdapterList,
    AdapterVersion,
    AliasState,
    MergeCreateRequest,
)

T = TypeVar("T")

_CHUNK = 1 << 20


class AdapterHost(Protocol):
    """What the service needs from the engine: retire an adapter between steps."""

    async def retire_adapter(self, key: str, then: Callable[[], T]) -> T: ...


class AdapterAdminService:
    def __init__(self, registry: Registry, engine: AdapterHost) -> None:
        self.registry = registry
        self.engine = engine

    async def upload(
        self,
        *,
        name: str,
        files: Sequence[tuple[str, BinaryIO]],
        alias: str | None,
        description: str | None,
        metadata: str | None,
        sha256: str | None,
    ) -> AdapterVersion:
        """Store the `(filename, content)` parts as a new version of `name`."""
        for param, text in (("name", name), ("alias", alias), ("description", description)):
            _valid_text(text, param)
        meta = _json_object(metadata, "metadata")
        expected = _json_object(sha256, "sha256")
        if expected is not None and not all(isinstance(v, str) for v in expected.values()):
            raise InvalidRequestError("sha256 must map file names to hex strings", param="sha256")
        if not files:
            raise InvalidRequestError(
                "no files: send adapter_config.json and adapter_model.safetensors as `files`",
                param="files",
            )
        parts: dict[str, BinaryIO] = {}
        for filename, content in files:
            _valid_text(filename, "files")
            if filename in parts:
                raise InvalidRequestError(
                    f"two `files` parts are named {filename[:80]!r}; send each file once",
                    param="files",
                )
            parts[filename] = content
        record = await anyio.to_thread.run_sync(
            lambda: self.registry.push(
                parts,
                name,
                alias=alias or None,
                description=description,
                metadata=meta,
                expected_sha256=expected,
            )
        )
        return AdapterVersion.model_validate(record.to_dict())

    async def publish_merge(self, name: str, body: MergeCreateRequest) -> AdapterVersion:
        """Merge the versions `body.ids` name (PEFT's add_weighted_adapter) and store the
        result as a new version of `name`, with the recipe in its lineage."""
        for param, text in (
            ("name", name),
            ("alias", body.alias),
            ("description", body.description),
        ):
            _valid_text(text, param)
        spec = MergeSpec(
            ids=tuple(body.ids),
            weights=tuple(body.weights if body.weights is not None else [1.0] * len(body.ids)),
            strategy=body.merge_strategy,
            density=body.density,
            majority_sign_method=body.majority_sign_method,
        )
        record = await anyio.to_thread.run_sync(
            lambda: publish_merge(
                self.registry,
                name,
                spec,
                alias=body.alias or None,
                description=body.description,
            )
        )
        return AdapterVersion.model_validate(record.to_dict())

    async def list(self) -> AdapterList:
        infos = await anyio.to_thread.run_sync(self.registry.list_adapters)
        return AdapterList(data=[Adapter.model_validate(i.to_dict()) for i in infos])

    async def get(self, name: str) -> Adapter:
        info = await anyio.to_thread.run_sync(lambda: self.registry.get(name))
        return Adapter.model_validate(info.to_dict())

    async def version(self, name: str, version: int) -> AdapterVersion:
        record = await anyio.to_thread.run_sync(lambda: self.registry.resolve(f"{name}@{version}"))
        return AdapterVersion.model_validate(record.to_dict())

    async def open_file(self, name: str, version: int, filename: str) -> Iterator[bytes]:
        """The file's bytes in chunks, after its sha256 was checked against the index."""
        handle = await anyio.to_thread.run_sync(
            lambda: self.registry.open_file(name, version, filename)
        )
        return _chunks(handle)

    async def delete_version(self, name: str, version: int, *, force: bool) -> AdapterDeleted:
        key = f"{name}@{version}"
        await self.engine.retire_adapter(
            key, lambda: self.registry.delete_version(name, version, force=force)
        )
        return AdapterDeleted(name=name, versions=[version])

    async def set_alias(self, name: str, alias: str, version: int) -> AliasState:
        previous = await anyio.to_thread.run_sync(
            lambda: self.registry.set_alias(name, alias, version)
        )
        return AliasState(name=name, alias=alias, version=version, previous=previous)

    async def delete_alias(self, name: str, alias: str) -> AliasState:
        version = await anyio.to_thread.run_sync(lambda: self.registry.delete_alias(name, alias))
        return AliasState(name=name, alias=alias, version=version)


def _valid_text(text: str | None, param: str) -> None:
    if text is None:
        return
    try:
        check_text(text)
    except JsonLimitError as exc:
        raise InvalidValueError(f"{param}: {exc}", param=param) from None


def _json_object(text: str | None, param: str) -> dict[str, Any] | None:
    if text is None or text == "":
        return None
    try:
        value = parse_json(text)
    except JsonLimitError as exc:
        raise InvalidValueError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be a JSON object", param=param)
    return value


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while block := handle.read(_CHUNK):
            yield block
