"""What every inference route shares: the service dependency, streaming, disconnects."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from adapterhub_server.api.errors import ClientDisconnectedError
from adapterhub_server.api.service import InferenceService
from adapterhub_server.api.streams import EventStream
from client.types import ErrorResponse

T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown model or adapter"},
    503: {"model": ErrorResponse, "description": "Busy; retry after `Retry-After` seconds"},
}
"""OpenAPI documentation of the error envelope on the inference routes."""

STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream`"}
}


def get_service(request: Request) -> InferenceService:
    """The service `create_app` stored in app state."""
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[InferenceService, Depends(get_service)]


class EventStreamResponse(StreamingResponse):
    """Server-sent events that always release their engine streams.

    Starlette cancels the body iterator when the client disconnects but never closes an
    iterator it has not started, nor one suspended between chunks; closing it here is what
    aborts the engine requests behind it.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        # no-cache and X-Accel-Buffering: proxies must pass each event on at once.
        super().__init__(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


def respond(result: T | EventStream) -> T | Response:
    """A schema as is (FastAPI serializes it), or a stream as server-sent events."""
    if isinstance(result, EventStream):
        return EventStreamResponse(result)
    return result


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    Starlette does not notice a client that leaves while a handler is still computing its
    response, so without this a dropped request would keep its batch slot to the end. The
    body has been read already, so the only message left to receive is the disconnect.
    """
    outcome: list[T] = []
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            outcome.append(await work)
        except Exception as exc:
            errors.append(exc)
        group.cancel_scope.cancel()
    if errors:
        raise errors[0]
    if not outcome:  # only the watcher cancels without an outcome or an error
        raise ClientDisconnectedError()
    return outcome[0]
