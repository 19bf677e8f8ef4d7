"""Base classes of the resources and the request-body helper they share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pydantic

if TYPE_CHECKING:
    from client._async_client import AsyncAdapterHubClient
    from client._client import AdapterHubClient


class SyncAPIResource:
    """A group of endpoints (`client.models`, `client.adapters`, ...) of the sync client."""

    def __init__(self, client: AdapterHubClient) -> None:
        self._client = client


class AsyncAPIResource:
    """A group of endpoints of the async client."""

    def __init__(self, client: AsyncAdapterHubClient) -> None:
        self._client = client


def jsonable(value: Any) -> Any:
    """`value` with pydantic models turned into plain JSON data (unset fields left out,
    fields under their wire names: `schema`, not `schema_`)."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json", exclude_none=True, by_alias=True)
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def request_body(fields: Mapping[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON body of the fields that were given: None means "the server's default", so it
    is left out rather than sent as null. `extra_body` adds fields this client does not
    know (a newer server's extensions) and wins over the named ones."""
    body = {name: jsonable(value) for name, value in fields.items() if value is not None}
    if extra_body:
        body.update(jsonable(extra_body))
    return body
