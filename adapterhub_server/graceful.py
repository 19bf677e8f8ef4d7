"""A uvicorn server whose SIGTERM drains in-flight requests and then exits with status 0."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, run `drain` (stop admitting, finish or abort in-flight
    requests) while uvicorn closes its listener and waits for open connections; then the
    app's lifespan shutdown stops the job runner and the engine.

    uvicorn re-raises the captured signal once it has shut down, so that the default action
    (death by signal, exit status 143) still happens; an orchestrator would read that as a
    crash. `run` ignores SIGTERM for that re-raise only, so a drained server exits 0.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    def run(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            super().run(sockets)
        finally:
            signal.signal(signal.SIGTERM, previous)

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
        if self._draining is not None:
            await self._draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Signal handlers run between bytecodes of the loop's own thread: only the
        # thread-safe entry point may touch the loop from here.
        if self._loop is not None and self._draining is None:
            logger.info("received %s: draining in-flight requests", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
