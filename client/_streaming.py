"""Server-sent-event streams of typed chunks, sync and async.

The server sends `data: <json>` events and ends with `data: [DONE]`; an error after the
stream started arrives as one `data: {"error": ...}` event (then `[DONE]`), which is raised
here as the matching `APIStatusError`. A stream owns its HTTP response: closing the stream,
leaving its `with` block, or dropping it releases the connection, and the server then aborts
the generation and frees its batch slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
import pydantic

from client._base import stream_error, transport_error
from client.errors import APIResponseValidationError

T = TypeVar("T", bound=pydantic.BaseModel)

DONE = "[DONE]"

# Tasks that close dropped async streams; referenced so they are not collected mid-way.
_closing: set[asyncio.Task[None]] = set()


class SSEDecoder:
    """Turns the lines of an event stream into the data of each event.

    Implements the part of the SSE format the server uses: `data:` fields (several lines
    join with newlines), comments (`:`), other fields ignored, a blank line ends an event.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Consume one line (without its newline); returns an event's data when one ends."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The pending event, if any (at a blank line, or when the body ends without one)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def _parse_event(data: str, item_type: type[T], response: httpx.Response) -> T:
    try:
        payload: Any = json.loads(data)
    except json.JSONDecodeError as exc:
        raise APIResponseValidationError(
            f"stream event is not JSON: {data[:200]!r}", response=response, body=data
        ) from exc
    if isinstance(payload, dict) and "error" in payload:
        raise stream_error(payload, response)
    try:
        return item_type.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise APIResponseValidationError(
            f"stream event is not a valid {item_type.__name__}: {exc}",
            response=response,
            body=payload,
        ) from exc


# The generators are module functions, not methods: a generator frame holding `self` would
# make a reference cycle, and a dropped stream would then wait for the cycle collector
# instead of releasing its connection at once.
def _events(response: httpx.Response, item_type: type[T]) -> Generator[T, None, None]:
    decoder = SSEDecoder()
    try:
        for line in response.iter_lines():
            data = decoder.feed(line)
            if data == DONE:
                return
            if data is not None:
                yield _parse_event(data, item_type, response)
        data = decoder.flush()
        if data is not None and data != DONE:
            yield _parse_event(data, item_type, response)
    except httpx.TransportError as exc:
        raise transport_error(exc, response.request) from exc
    finally:
        response.close()


async def _aevents(response: httpx.Response, item_type: type[T]) -> AsyncGenerator[T, None]:
    decoder = SSEDecoder()
    try:
        async for line in response.aiter_lines():
            data = decoder.feed(line)
            if data == DONE:
                return
            if data is not None:
                yield _parse_event(data, item_type, response)
        data = decoder.flush()
        if data is not None and data != DONE:
            yield _parse_event(data, item_type, response)
    except httpx.TransportError as exc:
        raise transport_error(exc, response.request) from exc
    finally:
        await response.aclose()


class Stream(Generic[T]):
    """An iterator of typed chunks from a streaming response.

    Use it in a `with` block (or call `close()`) when you may stop early; a stream that is
    read to its end, or dropped, closes itself too.
    """

    response: httpx.Response
    """The underlying streaming response (headers, `x-request-id`)."""

    def __init__(self, response: httpx.Response, item_type: type[T]) -> None:
        self.response = response
        self._iterator = _events(response, item_type)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def close(self) -> None:
        """Stop reading and release the connection; the server aborts the generation."""
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Runs during garbage collection or interpreter shutdown (when module globals such
        # as `contextlib` may already be gone): never raise, depend on nothing.
        try:  # noqa: SIM105
            self.response.close()
        except Exception:
            pass


class AsyncStream(Generic[T]):
    """An async iterator of typed chunks from a streaming response.

    Use it in an `async with` block (or `await stream.close()`) when you may stop early.
    A dropped stream is closed on the event loop as a best effort (asyncio only).
    """

    response: httpx.Response
    """The underlying streaming response (headers, `x-request-id`)."""

    def __init__(self, response: httpx.Response, item_type: type[T]) -> None:
        self.response = response
        self._iterator = _aevents(response, item_type)

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._iterator.__anext__()

    async def close(self) -> None:
        """Stop reading and release the connection; the server aborts the generation."""
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        # Closing needs the event loop; from a finalizer it can only be scheduled.
        try:
            if self.response.is_closed:
                return
            loop = asyncio.get_running_loop()
            task = loop.create_task(self.response.aclose())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        except Exception:
            pass
