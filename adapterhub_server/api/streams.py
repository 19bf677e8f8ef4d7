"""Engine streams as API responses: reading, merging and closing them, and SSE frames.

Lifetimes: every engine stream handed to these helpers is closed (`aclose`) on every path,
including cancellation, because closing it is what aborts the request and frees its batch
slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

from adapterhub_server.api.errors import GenerationFailedError, describe_error
from adapterhub_server.engine.outputs import RequestOutput, TokenLogprob
from adapterhub_server.errors import AdapterNotFoundError, AdapterValidationError
from adapterhub_server.lora.merge import MergeError
from client.types import FinishReason

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE_FRAME = "data: [DONE]\n\n"


class EventStream:
    """The server-sent-event frames of one streamed response.

    It owns the engine streams it reads: `aclose()` closes them even if iteration never
    started, which a bare async generator would not do.
    """

    def __init__(self, frames: AsyncGenerator[str, None], streams: Sequence[PrimedStream]) -> None:
        self._frames = frames
        self._streams = list(streams)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._frames

    async def aclose(self) -> None:
        """Stop the stream and abort whatever the engine is still generating for it."""
        with anyio.CancelScope(shield=True):
            try:
                await self._frames.aclose()
            finally:
                await close_all(self._streams)


# --- engine stream plumbing -------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Identity of one API call, shared by its response and every chunk of its stream."""

    id: str
    created: int
    model: str
    include_usage: bool


@dataclass
class ChoiceResult:
    """What one choice has produced so far."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Per prompt token, when the request asked (the engine sends them once, first)."""

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason = finish_reason(out)


class PrimedStream:
    """An engine stream whose first output has already been received."""

    def __init__(
        self,
        iterator: AsyncIterator[RequestOutput],
        first: RequestOutput,
        *,
        on_close: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        """`on_close` gets the last output read (cumulative token counts), once."""
        self._iterator = iterator
        self._first: RequestOutput | None = first
        self._done = first.finished
        self._last = first
        self._on_close = on_close

    def __aiter__(self) -> PrimedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        if self._done:
            raise StopAsyncIteration
        try:
            out = await anext(self._iterator)
        except StopAsyncIteration:
            raise GenerationFailedError(
                "the engine ended the request without finishing it"
            ) from None
        self._done = out.finished
        self._last = out
        return out

    async def aclose(self) -> None:
        # Streams are closed more than once (by their reader and by their owner).
        report, self._on_close = self._on_close, None
        try:
            await _aclose(self._iterator)
        finally:
            if report is not None:
                report(self._last)


async def first_output(iterator: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        raise GenerationFailedError("the engine produced no output") from None


async def gather(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all concurrently; the first failure cancels the others and is raised.

    Like `asyncio.gather`, except that no task outlives the call: a stream still being read
    by a stray task could be neither closed nor aborted.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and (error := task.exception()) is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(stream: PrimedStream) -> ChoiceResult:
    result = ChoiceResult()
    async for out in stream:
        raise_if_failed(out)
        result.add(out)
    return result


async def collect_all(streams: Sequence[PrimedStream]) -> list[ChoiceResult]:
    """Run every stream to its end; close all of them whatever happens."""
    try:
        if len(streams) == 1:
            return [await collect(streams[0])]
        return await gather([collect(s) for s in streams])
    finally:
        await close_all(streams)


async def merge_streams(
    streams: Sequence[PrimedStream],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several streams as they arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, out
    finally:
        with anyio.CancelScope(shield=True):
            for task in pending:
                task.cancel()
            # Let the cancelled reads unwind before anyone closes the streams under them.
            await asyncio.gather(*pending, return_exceptions=True)


async def sse_frames(
    streams: Sequence[PrimedStream],
    totals: list[ChoiceResult],
    frame: Callable[[int, RequestOutput], str | None],
    usage_frame: Callable[[], str] | None,
    *,
    opening: Sequence[str] = (),
) -> AsyncGenerator[str, None]:
    """SSE frames: `opening`, one per output of `streams`, usage (if asked), `[DONE]`.

    A failure after the response has started can only be reported in-band: it becomes an
    error event, followed by `[DONE]` so clients stop reading.
    """
    try:
        for text in opening:
            yield text
        # aclosing: the merge's read-ahead tasks must end before the streams are closed.
        async with aclosing(merge_streams(streams)) as outputs:
            async for index, out in outputs:
                raise_if_failed(out)
                totals[index].add(out)
                if out.text or out.logprobs or out.finished:
                    text = frame(index, out)
                    if text is not None:  # None: the reader holds this output back
                        yield text
        if usage_frame is not None:
            yield usage_frame()
    except Exception as exc:
        status, body, _ = describe_error(exc)
        if status >= 500:
            logger.error("stream failed after the response started", exc_info=exc)
        yield sse_frame(body)
    finally:
        await close_all(streams)
    yield DONE_FRAME


ADMISSION_CODES = (AdapterNotFoundError.code, AdapterValidationError.code, MergeError.code)
"""Error codes of requests that failed while their adapter was being loaded or merged."""


def raise_if_failed(out: RequestOutput) -> None:
    if out.finished and out.finish_reason == "error":
        # Admission failures of the adapter answer as they would have before queueing.
        if out.error_code == AdapterNotFoundError.code:
            raise AdapterNotFoundError(out.error or "adapter not found", param="model")
        if out.error_code == MergeError.code:
            raise MergeError(out.error or "invalid merge", param="merged_adapters")
        if out.error_code == AdapterValidationError.code:
            raise AdapterValidationError(out.error or "invalid adapter", param="model")
        raise GenerationFailedError(
            out.error or "generation failed", code=out.error_code or "generation_failed"
        )
    if out.finished and out.finish_reason == "abort":
        raise GenerationFailedError(
            "the request was aborted by the server", code=out.error_code or "request_aborted"
        )


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def close_all(iterators: Sequence[Any]) -> None:
    """Close every stream, shielded: this runs while the request is being cancelled."""
    with anyio.CancelScope(shield=True):
        for iterator in iterators:
            try:
                await _aclose(iterator)
            except Exception:
                logger.exception("closing an engine stream failed")


def finish_reason(out: RequestOutput) -> FinishReason | None:
    """The OpenAI finish reason of a finished output; None before the end."""
    if not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


def sse_frame(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"
