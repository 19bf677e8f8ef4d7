"""Serve HTTP from the first second: probes answer while the engine loads.

Loading a large base model takes from seconds to minutes. If the HTTP server only started
afterwards, a liveness probe would see a dead process and an orchestrator could restart it
in a loop. `StartupApp` is what uvicorn serves: while the real app is being built on a
background thread, `/health` answers 200 and every other route 503 `not_ready` (with
Retry-After); once built, the real app's lifespan (engine loop, fine-tuning runner) is
entered and every request goes to it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from adapterhub_server.api.app import RequestIdMiddleware
from adapterhub_server.api.errors import NotReadyError, error_response
from client.types import HealthStatus

logger = logging.getLogger(__name__)


class StartupApp:
    """An ASGI app that stands in for the one `load` builds until it is ready.

    `load` runs on a daemon thread (a process stopped mid-load must not wait for it) and
    returns a FastAPI app whose `state.engine` has `drain(timeout)`. If it raises,
    `on_failure` is called with the exception (the server then stops) and `failed` is set.
    """

    def __init__(
        self, load: Callable[[], Any], *, on_failure: Callable[[BaseException], None]
    ) -> None:
        self._load = load
        self._on_failure = on_failure
        self._app: Any | None = None
        self._loading: ASGIApp = RequestIdMiddleware(_answer_while_loading)
        self.failed: BaseException | None = None

    @property
    def loaded(self) -> bool:
        return self._app is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        else:
            await self._loading(scope, receive, send)

    async def drain(self, timeout: float) -> None:
        """Stop admitting and let in-flight requests finish (nothing to do while loading)."""
        if self._app is not None:
            await self._app.state.engine.drain(timeout)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup: answered at once, the load goes on behind
        await send({"type": "lifespan.startup.complete"})
        shutdown = asyncio.ensure_future(receive())
        async with AsyncExitStack() as stack:
            built = self._start_load()
            await asyncio.wait({built, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if built.done() and not shutdown.done():
                error = built.exception()
                if error is None:
                    app = built.result()
                    # Entered here and left on this task at shutdown, as lifespans must be.
                    await stack.enter_async_context(app.router.lifespan_context(app))
                    self._app = app
                    logger.info("engine loaded; serving every route")
                else:
                    self.failed = error
                    logger.error("loading the server failed: %s", error, exc_info=error)
                    self._on_failure(error)
            await shutdown
        await send({"type": "lifespan.shutdown.complete"})

    def _start_load(self) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)

        def run() -> None:
            try:
                app = self._load()
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, app, None)

        threading.Thread(target=run, name="load", daemon=True).start()
        return future


async def _answer_while_loading(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope.get("path") == "/health":
        await JSONResponse(HealthStatus().model_dump(mode="json"))(scope, receive, send)
        return
    await error_response(NotReadyError())(scope, receive, send)
