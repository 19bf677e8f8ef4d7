"""`client.models`: what requests can name as `model` (`GET /v1/models`)."""

from __future__ import annotations

from client._base import RequestOptions
from client.resources._resource import AsyncAPIResource, SyncAPIResource
from client.types import ModelList

_LIST = RequestOptions("GET", "/v1/models")


class Models(SyncAPIResource):
    """The base model and the servable adapters."""

    def list(self) -> ModelList:
        """The base model first (`parent` is None), then every adapter (`parent` = base id)."""
        return self._client._request(_LIST, ModelList)


class AsyncModels(AsyncAPIResource):
    """The base model and the servable adapters."""

    async def list(self) -> ModelList:
        """The base model first (`parent` is None), then every adapter (`parent` = base id)."""
        return await self._client._request(_LIST, ModelList)
